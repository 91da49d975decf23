"""bench/bench_evaluate.py times toist's two backends side by side: each must pay for its own
data checks. A mask check passed is remembered on the prediction objects, and both backends
evaluated the same objects, so the one timed second for a task skipped the checks (each paid
them on half the tasks, and the speed-up it printed was ~10 % too good)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_each_backend_checks_every_image_s_masks(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_evaluate
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import toist_core.eval.predictions as predictions

    checked = []
    real = predictions.first_bad_counts

    def counting(counts, sizes):
        checked.append(len(counts))
        return real(counts, sizes)

    monkeypatch.setattr(predictions, "first_bad_counts", counting)
    images, tasks = 6, 2
    monkeypatch.setattr(sys, "argv", ["bench_evaluate.py", "--images", str(images), "--tasks", str(tasks), "--dets",
                                      "5", "--iou-types", "segm", "--no-plain", "--data", str(tmp_path)])
    bench_evaluate.main()
    assert "faster-coco-eval" in capsys.readouterr().out
    assert len(checked) == 2 * tasks * images, checked   # both backends, every task, every image
