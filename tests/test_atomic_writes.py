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


@contextlib.contextmanager
def _umask(mask: int):
    import os

    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_written_files_and_model_directories_are_readable_by_others():
    """mkstemp / mkdtemp / safetensors write owner-only (0600 / 0700): a model directory exported
    by one user was unreadable for the node running as another, and a folder replaced by an
    export lost its permissions."""
    import tempfile

    from toist_core.checkpoint import save_model_dir
    from toist_core.config import preset
    from toist_core.inference import TaskSegmenter

    segmenter = TaskSegmenter.from_config("tiny", seed=0, device="cpu")
    with _umask(0o022), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = save_model_dir(segmenter.model, root / "model", preset("tiny"))
        assert _mode(model_dir) == 0o755
        files = [p for p in model_dir.rglob("*") if p.is_file()]
        assert files and {_mode(p) for p in files} == {0o644}, {p.name: oct(_mode(p)) for p in files}
        assert {_mode(p) for p in model_dir.rglob("*") if p.is_dir()} <= {0o755}
        model_dir.chmod(0o750)  # the owner's choice for the folder is kept when it is replaced
        save_model_dir(segmenter.model, model_dir, preset("tiny"))
        assert _mode(model_dir) == 0o750 and _mode(model_dir / "model.safetensors") == 0o644
        table = WRITERS["predictions.json"](root / "predictions.json")
        assert _mode(table) == 0o644
        table.chmod(0o600)  # a replaced file keeps its mode
        WRITERS["predictions.json"](table)
        assert _mode(table) == 0o600
    with _umask(0o077), tempfile.TemporaryDirectory() as tmp:  # and the umask is still the user's
        assert _mode(WRITERS["predictions.json"](Path(tmp) / "p.json")) == 0o600


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Neither rename nor exchange can move a mount point: the export used to fail at the swap,
    with a bare OSError, after writing the whole model beside it."""
    import os

    from toist_core.checkpoint import atomic_dir

    mount = tmp_path / "usb"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == mount)
    written = []
    with pytest.raises(OSError, match=rf"{mount}: a mount point: .* give a folder inside it"):
        atomic_dir.write_directory(mount, written.append)
    assert written == [] and sorted(tmp_path.iterdir()) == [mount]
    # toist export says so before it reads the checkpoint (minutes for a 6 GB file), not after.
    from toist_core.checkpoint import CheckpointError, export_model_dir

    with pytest.raises(CheckpointError, match=rf"^{mount}: a mount point: .* give a folder inside it"):
        export_model_dir(tmp_path / "not_read.pth", mount)
    (tmp_path / "link").symlink_to(mount)
    with pytest.raises(CheckpointError, match=r"link: a mount point"):
        export_model_dir(tmp_path / "not_read.pth", tmp_path / "link")
    # A caller that cannot take a folder inside it (a training run exports to <output_dir>/model)
    # gives its own advice, not "e.g. .../model/model".
    from toist_core.checkpoint.model_dir import check_replaceable

    with pytest.raises(CheckpointError, match=r": a mount point: .*; choose another output_dir$"):
        check_replaceable(mount, remedy="choose another output_dir")


def test_the_two_rename_fallback_keeps_the_old_directory_when_the_new_cannot_go_in(tmp_path, monkeypatch):
    """Where renameat2 is missing (not Linux), a failure after the old tree was moved aside and
    before the new one went in left no target and the old model in an unlocked staging folder,
    which the next export's clean-up deleted."""
    import os

    from toist_core.checkpoint import atomic_dir

    monkeypatch.setattr(atomic_dir.ctypes, "CDLL", lambda *args, **kwargs: object())   # no renameat2
    target = tmp_path / "model"
    atomic_dir.write_directory(target, lambda staging: (staging / "who").write_text("old"))
    atomic_dir.write_directory(target, lambda staging: (staging / "who").write_text("new"))   # the fallback
    assert (target / "who").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    real_rename = os.rename

    def failing_new_into_place(src, dst):
        if Path(dst) == target and Path(src).name.startswith(".model.staging-"):   # the new tree into place
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic_dir.os, "rename", failing_new_into_place)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_dir.write_directory(target, lambda staging: (staging / "who").write_text("newer"))
    monkeypatch.setattr(atomic_dir.os, "rename", real_rename)
    assert (target / "who").read_text() == "new"
    atomic_dir.remove_stale(target)
    assert (target / "who").read_text() == "new"
