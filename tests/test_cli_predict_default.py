"""``toist predict`` without ``--checkpoint``: the embedded default model, announced on stderr."""

import json

import numpy as np
import pytest

from toist_core import cli
from toist_core.checkpoint import default_model as default_model_module
from toist_core.checkpoint import default_model_dir
from toist_core.visualize import save_rgb


@pytest.fixture
def scene(tmp_path):
    """A small generated image: a red block on a grey gradient."""
    image = np.tile(np.linspace(60, 200, 128, dtype=np.uint8)[None, :, None], (96, 1, 3))
    image[30:70, 40:90] = (200, 30, 30)
    path = tmp_path / "scene.png"
    save_rgb(path, image)
    return path


@pytest.mark.skipif(default_model_dir() is None, reason="the embedded default model is not in this checkout")
def test_predict_without_checkpoint_runs_the_default_model(tmp_path, scene, capsys):
    out = tmp_path / "out"
    assert cli.main(["predict", "--task", "2", str(scene), "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "embedded default model" in line]
    assert len(notes) == 1, captured.err
    assert str(default_model_dir()) in notes[0] and "SYNTHETIC COCO-Tasks scenes only" in notes[0]
    assert "MODEL_CARD.md" in notes[0]
    result = json.loads((out / "scene.json").read_text())
    assert result["task_id"] == 2 and (result["height"], result["width"]) == (96, 128)
    # The default model has masks (it finds one instance on this scene: an empty list would pass).
    assert result["instances"] and all("segmentation" in item for item in result["instances"])
    assert (out / "scene.png").is_file()


def test_predict_names_the_remedy_when_the_default_model_is_missing(tmp_path, scene, capsys, monkeypatch):
    monkeypatch.setattr(default_model_module, "DEFAULT_MODEL_DIR", tmp_path / "gone")
    assert cli.main(["predict", "--task", "2", str(scene), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "embedded default model is missing" in err and "make default-model" in err and "gone" in err


def test_checkpoint_and_preset_still_exclude_each_other(scene, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["predict", "--checkpoint", "x.pth", "--preset", "tiny", "--task", "2", str(scene),
                  "--out", str(tmp_path)])
