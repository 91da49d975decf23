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

from toist_core.data.synth import generate  # noqa: E402
from toist_core.model import build_model, load_tokenizer  # noqa: E402
from training.config import load_config  # noqa: E402
from training.distributed import DistEnv  # noqa: E402
from training.evaluate import build_validation_set, evaluate  # noqa: E402
from training.loops import BEST, Trainer  # noqa: E402
from training.checkpointing import load_training_checkpoint  # noqa: E402

CONFIGS = REPO / "training" / "configs"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/toist_learning_proof")
    parser.add_argument("--tasks", default="1,2")
    parser.add_argument("--train-images", type=int, default=96, help="train image pool (shared by the tasks)")
    parser.add_argument("--test-images", type=int, default=40, help="test image pool")
    parser.add_argument("--epochs", type=int, default=60, help="epochs of the teacher and the plain student")
    parser.add_argument("--distill-epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--queries", type=int, default=10, help="decoder queries of the tiny model")
    parser.add_argument("--lr", type=float, default=1e-4, help="lr of every group (random-init tiny model)")
    parser.add_argument("--min-size", type=int, default=96, help="smallest synthetic image side")
    parser.add_argument("--max-size", type=int, default=128, help="largest synthetic image side")
    parser.add_argument("--max-objects", type=int, default=3, help="objects drawn per synthetic image (at most)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--freeze-backbone", action="store_true",
                        help="keep the ResNet's random weights fixed (faster, but learns far less)")
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
              f"runtime.threads={args.threads}", "runtime.progress=false", "eval.every_epochs=10",
              "eval.holdout_fraction=0.1", f"optim.lr={args.lr}", f"optim.lr_backbone={args.lr}",
              f"optim.text_encoder_lr={args.lr}", f"model.backbone.train={str(not args.freeze_backbone).lower()}",
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
    # The teacher is evaluated on its own input, each image's noun caption (training.evaluate
    # does that for stage "noun"), the students on the pronoun caption.
    noun_cfg = load_config(CONFIGS / "tiny_noun.yaml", [*common, "eval.split=test", "eval.max_images=null",
                                                        f"output_dir={out / 'eval'}"])
    val = build_validation_set(test_cfg)
    tokenizer = load_tokenizer(test_cfg.model.text.tokenizer)
    results = {}

    torch.manual_seed(0)
    untrained = build_model(test_cfg.model, tokenizer=tokenizer)
    results["untrained (pronoun)"] = evaluate(untrained, val, test_cfg, env)["mAP50/bbox"]
    results["untrained (noun captions)"] = evaluate(untrained, val, noun_cfg, env)["mAP50/bbox"]
    teacher = load_ema(teacher_dir, test_cfg, tokenizer)
    results["teacher (noun captions)"] = evaluate(teacher, val, noun_cfg, env)["mAP50/bbox"]
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


if __name__ == "__main__":
    sys.exit(main())
