"""Box / mask mAP@0.5 of the embedded default model on its synthetic test split, by how frames are
padded: one at a time without padding (``pad_multiple`` 1), one at a time padded to a multiple
of 32 (the default; what the node and ``toist evaluate`` run) and in padded batches of 8 (the
recipe's evaluation, ``loader.eval_batch_size``: the figures of ``metrics.json``).

    python bench/bench_padding_accuracy.py          # ~3 min on 2 CPU cores

The test split is generated as the recipe generates it (``bench_precision_accuracy.write_test_split``);
every query is kept, as the reference evaluates. The figures are in docs/inference.md
(``pad_multiple``) and docs/default_model.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision_accuracy import DEFAULT_MODEL, write_test_split  # noqa: E402  (sets the paths)

from default_model import RecipeSettings  # noqa: E402
from toist_core.cli.evaluate import REFERENCE_MAX_INSTANCES, predict_tasks  # noqa: E402
from toist_core.eval.evaluator import evaluate_tasks, task_files  # noqa: E402
from toist_core.inference import TaskSegmenter  # noqa: E402

# (label, pad_multiple, images per forward pass)
WAYS = (("one frame at a time, no padding", 1, 1), ("one frame at a time, padded to 32", 32, 1),
        ("padded batches of 8 (the recipe's evaluation)", 32, 8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory (default: the embedded one)")
    args = parser.parse_args()
    settings = RecipeSettings()
    loaded = TaskSegmenter.from_pretrained(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_test_split(settings, Path(tmp))
        files = task_files(root, settings.tasks, split="test")
        print(f"{args.model}: test split of {settings.test_images} images per task, tasks {settings.tasks}, input "
              f"short side {loaded.inference.short_side}")
        for label, pad, batch in WAYS:
            inference = dataclasses.replace(loaded.inference, pad_multiple=pad, score_threshold=0.0,
                                            max_instances=REFERENCE_MAX_INSTANCES, duplicate_iou=None)
            segmenter = TaskSegmenter(loaded.model, device="cpu", memory_bank=loaded.memory_bank,
                                      pronoun=loaded.pronoun, inference=inference, config=loaded.config,
                                      vocabulary=loaded.vocabulary)
            predictions = predict_tasks(segmenter, files, root / "images" / "val2014", batch_size=batch,
                                        log=io.StringIO())
            result = evaluate_tasks(files, predictions)
            print(f"  {label:48s} box mAP@0.5 {result.mean_ap50('bbox'):.3f}  mask mAP@0.5 "
                  f"{result.mean_ap50('segm'):.3f}", flush=True)


if __name__ == "__main__":
    main()
