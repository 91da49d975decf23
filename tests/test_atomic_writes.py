"""Files written from configs and results are replaced whole or not at all: a write cut short
(here: the file-size limit of the process, as a full disk would) leaves the previous file as it
was and no temporary file behind."""

import contextlib
import resource
from pathlib import Path

import numpy as np
import pytest

from toist_core.eval.evaluator import EvaluationResult, TaskResult
from toist_core.eval.predictions import ImagePredictions, load_predictions, save_predictions
from toist_core.eval.tables import write_tables
from training.checkpointing import atomic_save
from training.config import load_config, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"
OLD = "the previous file\n"
LIMIT = 256   # bytes: more than OLD, less than any new content below


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _result() -> EvaluationResult:
    task = TaskResult(1, 4, 2, 3, ap50={"bbox": 0.5}, ap={"bbox": 0.25}, ap50_with_targets={"bbox": 0.75})
    return EvaluationResult([task], ("bbox",))


def _predictions() -> dict:
    """Random numbers: gzip cannot squeeze them under LIMIT."""
    rng = np.random.default_rng(0)
    boxes = np.sort(rng.uniform(0, 100, (5, 12, 4)), axis=-1)
    return {1: {image: ImagePredictions(boxes[image], rng.uniform(0, 1, 12)) for image in range(5)}}


WRITERS = {
    "config.yaml": lambda path: save_config(load_config(CONFIGS / "tiny_pronoun.yaml"), path),
    "predictions.json": lambda path: save_predictions(path, _predictions()),
    "predictions.json.gz": lambda path: save_predictions(path, _predictions()),
    "results.md": lambda path: write_tables(_result(), path.parent),
    "checkpoint.pth": lambda path: atomic_save({"weights": np.arange(1000).tolist()}, path),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_write_cut_short_leaves_the_previous_file(tmp_path, name):
    path = tmp_path / name
    path.write_text(OLD)
    with _file_size_limit(LIMIT), pytest.raises(OSError):
        WRITERS[name](path)
    assert path.read_text() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    WRITERS[name](path)   # without the limit the new file replaces the old one
    assert path.read_bytes() != OLD.encode()


def test_saved_predictions_read_back(tmp_path):
    for name in ("p.json", "p.json.gz"):
        loaded = load_predictions(save_predictions(tmp_path / name, _predictions()))
        assert sorted(loaded[1]) == list(range(5))
        assert np.allclose(loaded[1][3].boxes, _predictions()[1][3].boxes, atol=1e-3)   # saved to 3 decimals
