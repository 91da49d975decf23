"""Learning proof on CPU: the tiny TOIST models learn the synthetic COCO-Tasks.

Generates a synthetic COCO-Tasks tree (train + test splits), then trains with the real
training pipeline (``training.loops.Trainer``, the tiny_* configs):

1. the teacher on noun captions (``tiny_noun.yaml``),
2. the plain student on pronoun captions (``tiny_pronoun.yaml``),
3. the distilled student (``tiny_distill.yaml``), initialised from 1 and 2 as in the paper,

each selecting its best checkpoint on a holdout of the training images, and reports mAP@0.5
(box, mean over tasks, the paper metric) on the *test* split, never seen in training, for each
model's EMA weights and for an untrained model of the same configuration:

    python bench/bench_learning_proof.py --out /tmp/toist_learning_proof

Takes about an hour on 2 CPU cores with the defaults; ``--quick`` runs a few updates only
(checks the script, proves nothing). Prints a table and writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from toist_core.data.captions import noun_targets  # noqa: E402
from toist_core.data.coco_tasks import CocoTasksDataset  # noqa: E402
from toist_core.data.synth import generate  # noqa: E402
from toist_core.eval.evaluator import evaluate_tasks, load_ground_truth  # noqa: E402
from toist_core.eval.predictions import ImagePredictions  # noqa: E402
from toist_core.inference import TaskSegmenter, TaskState  # noqa: E402
from toist_core.model import build_model, load_tokenizer  # noqa: E402
from training.config import load_config  # noqa: E402
from training.distributed import DistEnv  # noqa: E402
from training.evaluate import build_validation_set, evaluate, inference_config  # noqa: E402
from training.loops import BEST, Trainer  # noqa: E402
from training.checkpointing import load_training_checkpoint  # noqa: E402

CONFIGS = REPO / "training" / "configs"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/toist_learning_proof")
    parser.add_argument("--tasks", default="1,2")
    parser.add_argument("--train-images", type=int, default=64, help="train image pool (shared by the tasks)")
    parser.add_argument("--test-images", type=int, default=40, help="test image pool")
    parser.add_argument("--epochs", type=int, default=25, help="epochs of the teacher and the plain student")
    parser.add_argument("--distill-epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--queries", type=int, default=10, help="decoder queries of the tiny model")
    parser.add_argument("--lr", type=float, default=5e-4, help="lr of every group (random-init tiny model)")
    parser.add_argument("--min-size", type=int, default=96, help="smallest synthetic image side")
    parser.add_argument("--max-size", type=int, default=128, help="largest synthetic image side")
    parser.add_argument("--max-objects", type=int, default=3, help="objects drawn per synthetic image (at most)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few updates per stage (script check only)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [int(t) for t in args.tasks.split(",")]
    data = out / "synth"
    if not (data / "synth.json").exists():
        generate(data, tasks=tasks, splits=("train",), images_per_split=args.train_images,
                 min_size=args.min_size, max_size=args.max_size, max_objects=args.max_objects, seed=7)
        generate(data, tasks=tasks, splits=("test",), images_per_split=args.test_images,
                 min_size=args.min_size, max_size=args.max_size, max_objects=args.max_objects, seed=7)
    common = [f"data.root={data}", f"data.tasks=[{','.join(map(str, tasks))}]",
              f"model.num_queries={args.queries}", f"loader.batch_size={args.batch_size}",
              f"runtime.threads={args.threads}", "runtime.progress=false", "eval.every_epochs=2",
              "eval.holdout_fraction=0.1", f"optim.lr={args.lr}", f"optim.lr_backbone={args.lr}",
              f"optim.text_encoder_lr={args.lr}",
              # image sizes around the synthetic ones (the reference's 480..800 / 800 scaled down)
              f"data.train_sizes=[{args.min_size},{(args.min_size + args.max_size) // 2},{args.max_size}]",
              f"data.max_size={2 * args.max_size}", f"data.crop_resize_sizes=[{args.min_size},{args.max_size}]",
              f"data.crop_min_size={args.min_size * 2 // 3}", f"data.crop_max_size={args.max_size}",
              f"data.test_size={(args.min_size + args.max_size) // 2}"]
    if args.quick:
        common += ["schedule.max_steps=3", "eval.max_images=3"]
    torch.set_num_threads(args.threads)
    env = DistEnv()
    timings = {}

    def train(name: str, config: str, epochs: int, *extra: str) -> Path:
        run_dir = out / name
        if (run_dir / "done").exists():
            return run_dir
        cfg = load_config(CONFIGS / config, [*common, f"output_dir={run_dir}", f"schedule.epochs={epochs}",
                                             f"schedule.lr_drop={max(1, int(epochs * 0.75))}", *extra])
        resume = run_dir / "checkpoint.pth"
        started = time.perf_counter()
        result = Trainer(cfg, env, resume=str(resume) if resume.exists() else None).run()
        timings[name] = time.perf_counter() - started
        print(f"[{name}] {result.step} updates in {timings[name] / 60:.1f} min; best {result.best}", flush=True)
        (run_dir / "done").write_text(json.dumps({"best": result.best, "seconds": timings[name]}))
        return run_dir

    teacher_dir = train("teacher_noun", "tiny_noun.yaml", args.epochs)
    student_dir = train("student_pronoun", "tiny_pronoun.yaml", args.epochs)
    distill_dir = train("student_distilled", "tiny_distill.yaml", args.distill_epochs,
                        f"init.load={student_dir / BEST}", f"init.load_noun={teacher_dir / BEST}",
                        f"loader.batch_size={max(1, args.batch_size // 2)}")

    # ---- evaluation on the test split (held out from every stage)
    test_cfg = load_config(CONFIGS / "tiny_pronoun.yaml", [*common, "eval.split=test", "eval.max_images=null",
                                                           f"output_dir={out / 'eval'}"])
    val = build_validation_set(test_cfg)
    tokenizer = load_tokenizer(test_cfg.model.text.tokenizer)
    results = {}

    torch.manual_seed(0)
    untrained = build_model(test_cfg.model, tokenizer=tokenizer)
    results["untrained (pronoun)"] = evaluate(untrained, val, test_cfg, env)["mAP50/bbox"]
    results["untrained (noun captions)"] = noun_caption_map(untrained, val, test_cfg)
    teacher = load_ema(teacher_dir, test_cfg, tokenizer)
    results["teacher (noun captions)"] = noun_caption_map(teacher, val, test_cfg)
    results["teacher (pronoun captions)"] = evaluate(teacher, val, test_cfg, env)["mAP50/bbox"]
    student = load_ema(student_dir, test_cfg, tokenizer)
    results["plain student (pronoun)"] = evaluate(student, val, test_cfg, env)["mAP50/bbox"]
    distilled, bank = load_ema(distill_dir, test_cfg, tokenizer, with_bank=True)
    results["distilled student (pronoun, CCR)"] = evaluate(distilled, val, test_cfg, env, bank)["mAP50/bbox"]

    print(f"\nmAP@0.5 (box) on the synthetic test split: tasks {tasks}, {val.num_images} (task, image) pairs\n")
    print("| model | mAP@0.5 |\n|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} |")
    (out / "results.json").write_text(json.dumps({"mAP50_box_test": results, "tasks": tasks,
                                                  "test_pairs": val.num_images, "args": vars(args)}, indent=1))
    return 0


def load_ema(run_dir: Path, cfg, tokenizer, with_bank: bool = False):
    """The EMA weights of a run's best checkpoint (the reference evaluates EMA weights)."""
    ckpt = load_training_checkpoint(run_dir / BEST)
    model = build_model(cfg.model, tokenizer=tokenizer)
    model.load_state_dict(ckpt["model_ema"])
    if not with_bank:
        return model
    from toist_core.checkpoint import build_memory_bank

    return model, build_memory_bank(ckpt["cluster_criterion"])


@torch.no_grad()
def noun_caption_map(model, val, cfg) -> float:
    """mAP@0.5 with the teacher's input: each test image's noun caption (built from its
    ground-truth classes, as ``--verb_noun_input``; the empty caption when it has none)."""
    segmenter = TaskSegmenter(model, device="cpu", inference=inference_config(cfg), config=cfg.model)
    predictions = {}
    for task, path in sorted(val.ann_files.items()):
        dataset = CocoTasksDataset(path, val.image_dir, caption_mode="noun", check_images=False)
        task_file = dataset.files[0]
        wanted = set(val.image_ids[task])
        preds = {}
        for index in range(len(dataset)):
            _, record = dataset.sample_info(index)
            if record.id not in wanted:
                continue
            categories = [a.coco_category_id for a in task_file.image_annotations(record.id)
                          if a.is_preferred and not a.iscrowd]
            caption = noun_targets(task, categories, dataset.id2name).caption
            state = TaskState(caption, None, model.encode_text([caption]), ())
            out = segmenter.predict_batch([dataset.load_image(index).permute(1, 2, 0).numpy()], state)[0]
            preds[record.id] = ImagePredictions.from_arrays(out.boxes, out.scores)
        predictions[task] = preds
    ground_truths = {task: load_ground_truth(path) for task, path in val.ann_files.items()}
    return evaluate_tasks(ground_truths, predictions, ("bbox",), val.image_ids).mean_ap50("bbox")


if __name__ == "__main__":
    sys.exit(main())
