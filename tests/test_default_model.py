"""The embedded default model: its recipe end to end (a quick run), the committed model directory
(loads, its card and metrics agree, it finds the right objects in held-out synthetic scenes),
and the node's fallback when it is missing."""

import json
from pathlib import Path

import numpy as np
import pytest

from toist_core.config import InferenceConfig
from toist_core.inference import TaskSegmenter
from toist_ros.demo_scenes import held_out_scenes, model_metrics, right_instances
from toist_ros.model_loader import DEFAULT_MODEL_DIR, FALLBACK_MODEL_NOTE, default_model_dir, load_model
from training import default_model as recipe
from training.stage_processes import RecipeRefused

# pycocotools calls np.array(copy=False) on its own objects (numpy 2 warns); not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MODELS = ["untrained", "teacher (noun captions)", "teacher (pronoun captions)", "plain student", "distilled student"]


def test_recipe_quick_run_trains_every_stage_and_exports_a_model(tmp_path, capfd):
    # capfd, not capsys: the stages train in spawned worker processes that write to the inherited fds.
    out = tmp_path / "recipe"
    assert recipe.main(["--out", str(out), "--quick"]) == 0
    printed = capfd.readouterr().out
    model_dir = out / "model"
    for name in ("config.yaml", "model.safetensors", "memory_bank.safetensors", "MODEL_CARD.md", "metrics.json"):
        assert (model_dir / name).is_file(), name
    metrics = model_metrics(model_dir)
    assert list(metrics["rows"]) == MODELS
    assert "mAP50/segm" in metrics["rows"]["distilled student"] and "mAP50/segm" not in metrics["rows"]["untrained"]
    for name in ("plain student", "distilled student"):   # masks measured against their instances too
        assert {"mask_pairwise_iou_median", "mask_inside_box_mean", "published_pairwise_iou_median",
                "published_instances_per_image"} <= set(metrics["rows"][name]), name
    assert recipe.results_table(metrics) in printed and recipe.results_table(metrics) in \
        (model_dir / "MODEL_CARD.md").read_text()
    for stage in ("pretrain", "teacher", "student", "distilled", "student_masks", "distilled_masks"):
        assert (out / stage / recipe.DONE).is_file(), stage
    # The exported directory is what the node loads: a distilled segmentation model with its bank.
    seg = TaskSegmenter.from_pretrained(model_dir, device="cpu")
    assert seg.memory_bank is not None and seg.config.masks and seg.config.backbone.name == "mobilenet_v2"
    assert seg.inference.short_side == recipe.RecipeSettings(**metrics["settings"]).input_size.short_side
    assert seg.trained_tasks == tuple(metrics["settings"]["tasks"])
    scene = held_out_scenes(metrics["settings"], task_id=1, count=1)[0]
    seg.set_task(1)
    prediction = seg.predict(scene.pixels)
    assert prediction.masks is not None and prediction.masks.shape[1:] == scene.pixels.shape[:2]
    # A second run finds every stage done and only evaluates and exports again; the training time
    # it reports is still the first run's (plus the second's few seconds of nothing).
    assert recipe.main(["--out", str(out), "--quick"]) == 0
    second = capfd.readouterr()
    assert "updates/epoch" not in second.err and recipe.results_table(metrics) in second.out
    assert model_metrics(model_dir)["training_wall_minutes"] >= metrics["training_wall_minutes"] > 0


def test_install_replaces_the_destination_whole(tmp_path):
    source, destination = tmp_path / "model", tmp_path / "assets" / "default_model"
    source.mkdir()
    (source / "config.yaml").write_text("new")
    destination.mkdir(parents=True)
    (destination / "stale.bin").write_text("old")
    recipe.install(source, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["config.yaml"]
    assert not destination.with_name("default_model.new").exists()


@pytest.fixture(scope="module")
def committed():
    assert default_model_dir() is not None, f"the trained default model is missing from {DEFAULT_MODEL_DIR}"
    return model_metrics(DEFAULT_MODEL_DIR)


def test_committed_card_and_metrics_agree(committed):
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert recipe.results_table(committed) in card
    assert "synthetic" in card.lower() and "real photos" in card
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 40e6, f"the committed default model takes {size / 1e6:.1f} MB"


def test_the_real_photo_figures_are_what_the_node_gives(committed):
    """README, model card and metrics.json said 20 instances on the demo's real photos: the recipe
    predicted them without masks (duplicates found by box overlap), the node computes masks (by
    mask overlap) and returned 17. The committed figures are the packaged model's at the node's
    settings, and the README's sentence says them."""
    pytest.importorskip("skimage", reason="scikit-image (the demo's photos) is installed by `make setup`")
    scores = recipe.real_photo_scores(DEFAULT_MODEL_DIR, committed["settings"]["tasks"])
    assert scores == committed["real_photos"]
    assert recipe.real_photo_summary(scores) in (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    found = [v for values in scores.values() for v in values]
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert (f"returns {len(found)} instances over the {len(scores)} (photo, task) pairs, "
            f"{sum(map(bool, scores.values()))} pairs with at least one, at scores "
            f"{min(found):.2f}-{max(found):.2f}") in readme


def test_the_node_and_toist_core_name_the_same_default_model():
    from toist_core import checkpoint

    assert DEFAULT_MODEL_DIR == checkpoint.DEFAULT_MODEL_DIR
    assert default_model_dir() == checkpoint.default_model_dir()


def test_committed_students_read_the_verb_and_distillation_stays_close_to_the_plain_student(committed):
    """Both students, trained on pronoun captions, beat the noun teacher reading the same pronoun
    captions by a wide margin; the distilled student stays within 0.05 box mAP@0.5 of the plain one
    it starts from. The distilled student is a little above it (0.602 against 0.594, distilling at
    lr 5e-5; at 2e-4 it was 0.568), but the gain is within what the ablations move (SBTL off 0.622,
    CCR off 0.606): docs/default_model.md. A retrain that breaks distillation fails here."""
    rows = committed["rows"]
    teacher = rows["teacher (pronoun captions)"]["mAP50/bbox"]
    plain, distilled = rows["plain student"]["mAP50/bbox"], rows["distilled student"]["mAP50/bbox"]
    assert min(plain, distilled) > teacher + 0.05, rows
    assert distilled > plain - 0.05, rows


def test_committed_model_is_far_above_an_untrained_one(committed):
    rows = committed["rows"]
    untrained = rows["untrained"]["mAP50/bbox"]
    for name in ("teacher (noun captions)", "plain student", "distilled student"):
        assert rows[name]["mAP50/bbox"] > max(0.05, 10 * untrained), (name, rows[name], untrained)


def _verdicts(seg: TaskSegmenter, settings: dict, count: int = 5) -> tuple[list[bool], list[bool]]:
    """Per held-out scene of each of the model's tasks (the demo's: the first ``count`` of each):
    is the best-scoring instance a preferred object, and is any instance one?"""
    top, anywhere = [], []
    for task in settings["tasks"]:
        seg.set_task(task)
        for scene in held_out_scenes(settings, task, count=count):
            prediction = seg.predict(scene.pixels)
            right = right_instances(prediction.boxes, scene.preferred_boxes) if len(prediction) else []
            top.append(bool(len(right)) and bool(right[0]))
            anywhere.append(bool(np.any(right)))
    return top, anywhere


def test_committed_model_finds_the_right_objects_in_held_out_scenes(committed):
    """The demo's check without ROS, on the demo's scenes: a preferred object is among the
    instances on most of them, the top instance is one far more often than for the same network
    untrained, and on at least 15 of the 20 scenes (the issue's target; with every instance kept, as
    here, 17 measured and 58 of 80 over 20 scenes per task; at the node's score threshold 0.5, 16
    and 55: docs/default_model.md)."""
    settings = committed["settings"]
    segmenter = TaskSegmenter.from_pretrained(DEFAULT_MODEL_DIR, device="cpu",
                                              inference=InferenceConfig(score_threshold=0.0))
    # The directory records the size it was trained at (what the node and the demo then use).
    assert segmenter.inference.short_side == recipe.RecipeSettings(**settings).input_size.short_side
    top, anywhere = _verdicts(segmenter, settings)
    untrained_top, _ = _verdicts(TaskSegmenter.from_config(segmenter.config, device="cpu",
                                                           inference=segmenter.inference, seed=0), settings)
    assert sum(anywhere) > len(anywhere) / 2, anywhere
    assert sum(top) >= sum(untrained_top) + 3, (top, untrained_top)
    assert sum(top) >= 15, top


def test_committed_masks_belong_to_their_instances(committed):
    """The masks the node publishes, measured here on the demo's held-out scenes at the node's
    default settings. Before the EMA fix every instance of an image had the same mask (median
    IoU 1.00 between instances, also between instances whose boxes are apart; 45 % of a mask
    inside its box; mask mAP@0.5 0.105 against box 0.315). Now masks lie mostly in their boxes
    (>= 80 %, the issue's target) and mask mAP keeps up with box mAP. What was left of "the same
    mask twice" was one object answered by two queries (their masks coincide): the node drops the
    lower-scoring of two instances whose masks overlap with IoU above ``duplicate_iou`` (0.7), so
    what it publishes are different objects: the issue's median IoU between the instances of one
    image < 0.3 holds on the recipe's test split (metrics.json: 0.88 with every instance kept,
    0.00 published)."""
    from toist_core.eval.mask_sanity import mask_box_agreement

    settings = committed["settings"]
    published = TaskSegmenter.from_pretrained(DEFAULT_MODEL_DIR, device="cpu")
    every = TaskSegmenter.from_pretrained(DEFAULT_MODEL_DIR, device="cpu", inference=InferenceConfig(duplicate_iou=None))
    shown, raw = [], []
    for task in settings["tasks"]:
        states = published.encode_task(task), every.encode_task(task)
        # 25 scenes per task: with ~1.1 instances per image, fewer hold no pair of separate instances.
        for scene in held_out_scenes(settings, task, count=25):
            shown.append(published.predict(scene.pixels, states[0]))
            raw.append(every.predict(scene.pixels, states[1]))
    fit, fit_raw = mask_box_agreement(shown), mask_box_agreement(raw)
    # The model itself: instances in different places get different masks (1.00 before the EMA fix).
    assert fit_raw["disjoint_pairs"] >= 3 and fit_raw["disjoint_iou_median"] < 0.9, fit_raw
    assert fit_raw["instances"] <= 3 * len(raw), fit_raw  # no longer every query above the threshold
    # Published: duplicates of one object are gone, and no two published masks are one object.
    assert fit["instances"] < fit_raw["instances"], (fit, fit_raw)
    assert fit["inside_box_mean"] >= 0.8, fit
    for prediction in (p for p in shown if len(p) > 1):
        masks = prediction.masks.reshape(len(prediction), -1).astype(np.float64)
        overlap = masks @ masks.T
        union = masks.sum(1)[:, None] + masks.sum(1)[None, :] - overlap
        iou = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)[np.triu_indices(len(prediction), 1)]
        # Compared at the mask head's stride 4 against 0.7; at full resolution within a few per cent.
        assert np.all(iou <= 0.75), iou
    distilled = committed["rows"]["distilled student"]
    assert distilled["mAP50/segm"] >= 0.7 * distilled["mAP50/bbox"], distilled
    # (as the install judges it: no image with two published instances, no pair to judge)
    assert distilled.get("published_pairs") == 0 or distilled["published_pairwise_iou_median"] < 0.3, distilled
    assert published.trained_tasks == tuple(settings["tasks"])


def _node_settings(short_side: int, max_side: int) -> dict:
    """The node parameters ``load_model`` reads: the embedded default on the CPU."""
    return {"checkpoint": "", "device": "cpu", "allow_cpu_fallback": False, "precision": "fp32",
            "text_encoder": "", "input.short_side": short_side, "input.max_side": max_side,
            "score_threshold": 0.5, "max_instances": 5, "mask_threshold": 0.5, "duplicate_iou": 0.7,
            "backend": "torch", "ccr": True}


def test_node_ccr_parameter_reaches_the_segmenter(committed):
    """``ccr:=false`` runs the distilled default without its memory bank: the pronoun keeps its own
    features, so the scores move (by ~1e-3 on this model, whose CCR ablation scores 0.001 lower; the
    same model on the same input moves by nothing); the default (true) replaces them, as the paper's
    inference does."""
    from toist_ros.params import Settings

    settings = Settings().replace({"device": "cpu", "max_instances": 100, "score_threshold": 0.0,
                                   "duplicate_iou": 0.0})
    with_ccr = load_model(settings, warn=lambda msg: None).segmenter
    lines = []
    without = load_model(settings.replace({"ccr": False}), warn=lambda msg: None, info=lines.append).segmenter
    assert "ccr false: the model's memory bank is not used" in lines[-1]
    assert with_ccr.memory_bank is not None and without.inference.ccr is False
    task = with_ccr.trained_tasks[0]
    assert with_ccr.set_task(task).uses_ccr and not without.set_task(task).uses_ccr
    image = held_out_scenes(committed["settings"], task_id=task, count=1)[0].pixels
    scores_with, scores_without = with_ccr.predict(image).scores, without.predict(image).scores
    assert len(scores_with) == len(scores_without) > 0
    assert np.abs(np.sort(scores_with) - np.sort(scores_without)).max() > 1e-4, (scores_with, scores_without)


def test_node_resizes_to_the_size_the_default_was_trained_at(committed):
    """The params file's input sizes are 0: the node takes them from the model directory."""
    inference = load_model(_node_settings(short_side=0, max_side=0), warn=lambda msg: None).segmenter.inference
    own = recipe.RecipeSettings(**committed["settings"]).input_size
    assert (inference.short_side, inference.max_size) == (own.short_side, own.max_size)


def test_node_falls_back_to_random_weights_when_the_default_is_missing(monkeypatch, tmp_path):
    from toist_ros import model_loader

    monkeypatch.setattr(model_loader, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    loaded = load_model(_node_settings(short_side=160, max_side=320), warn=lambda msg: None)
    assert loaded.is_random_default and loaded.description == FALLBACK_MODEL_NOTE.format(path=tmp_path / "absent")
    assert "RANDOM" in loaded.description and loaded.segmenter.config.backbone.name == "resnet18"


@pytest.mark.parametrize("default_present", [True, False])
def test_node_logs_emulated_bf16_once_through_its_logger(monkeypatch, tmp_path, default_present):
    """precision:=bf16 on a CPU without bf16 instructions: one line in the node's log (not a Python
    warning on stderr as well), for the default model and for the random fallback."""
    import warnings

    from toist_core.inference import SlowPrecisionWarning, device
    from toist_ros import model_loader

    monkeypatch.setattr(device, "cpu_computes_bf16", lambda: False)
    if not default_present:
        monkeypatch.setattr(model_loader, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    said = []
    settings = dict(_node_settings(short_side=160, max_side=320), precision="bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(settings, warn=said.append)
    assert loaded.segmenter.inference.precision == "bf16"
    assert [line for line in said if "bf16" in line] == [device.EMULATED_BF16]
    assert not [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]


def test_node_says_a_detection_checkpoint_gives_boxes_only(tmp_path):
    """output.masks (the default) with a checkpoint without a mask head: said at start-up, not
    left to be found in empty mask fields."""
    from toist_core.checkpoint import save_model_dir
    from toist_core.inference import TaskSegmenter
    from toist_ros.params import Settings

    seg = TaskSegmenter.from_config("tiny", device="cpu")
    folder = save_model_dir(seg.model, tmp_path / "detection_only", seg.config)
    said = []
    loaded = load_model(Settings().replace({"checkpoint": str(folder), "device": "cpu"}), warn=said.append)
    assert not loaded.segmenter.has_masks
    assert said == ["the model has no mask head (a detection checkpoint): its instances carry boxes only, no masks"]
    said.clear()
    load_model(Settings().replace({"checkpoint": str(folder), "device": "cpu", "output.masks": False}), warn=said.append)
    assert said == []


def test_ablation_stages_are_the_distillation_with_one_switch_off(tmp_path):
    plan = {stage.name: stage for stage in recipe.stages(recipe.RecipeSettings(), tmp_path, ablations=True)}
    distilled = plan["distilled"]
    assert f"init.load={tmp_path / 'student' / recipe.BEST}" in distilled.overrides
    assert f"init.load_noun={tmp_path / 'teacher' / recipe.BEST}" in distilled.overrides
    for name, switch in (("no_ccr", "distill.ccr=false"), ("no_cl", "distill.cluster_loss=0"),
                         ("no_sbtl", "distill.sbtl=0")):
        stage = plan[f"distilled_{name}"]
        assert (stage.config, stage.epochs) == (distilled.config, distilled.epochs)
        assert stage.overrides == distilled.overrides + [switch]
        cfg = recipe.stage_config(recipe.RecipeSettings(), tmp_path, stage)
        assert cfg.stage == "distill" and cfg.output_dir == str(tmp_path / stage.name)
    assert set(plan) == {"pretrain", "teacher", "student", "distilled", "student_masks", "distilled_masks",
                         "distilled_no_ccr", "distilled_no_cl", "distilled_no_sbtl"}


def test_every_stage_waits_for_the_stages_it_starts_from(tmp_path):
    settings = recipe.RecipeSettings()
    plan = recipe.stages(settings, tmp_path, ablations=True)
    names = [stage.name for stage in plan]
    for index, stage in enumerate(plan):
        used = {name for name in names for o in stage.overrides if f"={tmp_path / name}/" in o}
        assert set(stage.after) == used, stage.name
        assert all(names.index(name) < index for name in stage.after), stage.name
    assert f"runtime.threads={settings.stage_threads}" in settings.common_overrides(tmp_path)
    assert settings.stage_threads == max(1, settings.threads // settings.jobs)


def test_run_plan_refuses_a_stage_whose_inputs_are_not_planned(tmp_path):
    orphan = recipe.Stage("distilled", "tiny_distill.yaml", 1, [], after=("teacher",))
    with pytest.raises(ValueError, match="'distilled' starts from \\['teacher'\\]"):
        recipe.run_plan(recipe.RecipeSettings(), tmp_path, [orphan])


def test_recipe_work_directory_holds_one_set_of_settings(tmp_path):
    """Finished stages are reused by their folder: a --quick run into the full recipe's folder, or
    edited settings, would reuse what they did not train (and label the card with the new ones)."""
    recipe.check_settings(recipe.RecipeSettings(), tmp_path)
    recipe.check_settings(recipe.RecipeSettings(jobs=1), tmp_path)  # how many at once changes nothing trained
    with pytest.raises(RecipeRefused, match=r"recipe_settings\.json: .* was written with other recipe settings "
                                         r"\(distill_lr: 5e-05 there, 0\.0002 now"):
        recipe.check_settings(recipe.RecipeSettings(distill_lr=2e-4), tmp_path)
    # Data and stages without the record (written before it existed, or the record deleted): whose
    # settings they are is unknown, and finished stages would be reused under the new card.
    unknown = tmp_path / "older"
    (unknown / "teacher").mkdir(parents=True)
    (unknown / ".recipe.lock").write_text("")
    with pytest.raises(RecipeRefused, match=r"older holds teacher but no recipe_settings\.json .* delete it to "
                                         r"start over"):
        recipe.check_settings(recipe.RecipeSettings(), unknown)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".recipe.lock").write_text("")   # the lock taken before the check: not content
    recipe.check_settings(recipe.RecipeSettings(), fresh)
    assert (fresh / recipe.RECIPE_FILE).is_file()


def test_recipe_refusals_are_errors_not_tracebacks(tmp_path, capsys):
    """A work directory of other settings, or a record that does not parse, is said in one line
    naming the file (exit 1), not raised as a traceback, and nothing is written over."""
    work = tmp_path / "w"
    recipe.check_settings(recipe.RecipeSettings(distill_lr=2e-4), work)
    written = (work / recipe.RECIPE_FILE).read_text()
    assert recipe.main(["--out", str(work)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "recipe_settings.json" in err and "Traceback" not in err
    assert (work / recipe.RECIPE_FILE).read_text() == written
    for broken in ('{"distill_lr": 5e-05,', "[]"):   # cut short (a full disk); not an object
        (work / recipe.RECIPE_FILE).write_text(broken)
        assert recipe.main(["--out", str(work)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {work / recipe.RECIPE_FILE}: not a record this recipe can read")
        assert "give another --out, or delete the work directory" in err   # the record alone: refused again
    assert sorted(p.name for p in work.iterdir()) == [".recipe.lock", recipe.RECIPE_FILE]


def test_a_training_minutes_record_that_does_not_read_does_not_hide_the_failure(tmp_path, monkeypatch, capsys):
    """Read on the way out of a failed or stopped run, it replaced the failure (or the stop and
    its exit code) with its own refusal."""
    def out_of_memory(settings, out, plan):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(recipe, "write_data", lambda settings, out: None)
    monkeypatch.setattr(recipe, "run_plan", out_of_memory)
    for broken, said in (('{"minutes": 3', "not a record"), ('{"minutes": true}', "field 'minutes' is True"),
                         ('{"minutes": 1' + "0" * 400 + "}", "field 'minutes' is 1000"), ('{"minutes": -5}', "field 'minutes' is -5")):
        (tmp_path / recipe.TRAINING_MINUTES).write_text(broken)
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            recipe._run(recipe.RecipeSettings(), tmp_path, False, False)
        assert f"error: {tmp_path / recipe.TRAINING_MINUTES}: {said}" in capsys.readouterr().err


def test_recipe_refuses_quick_install_and_no_jobs(tmp_path, capsys):
    for argv, message in ((["--quick", "--install"], "--install with --quick"), (["--jobs", "0"], "--jobs: must be >= 1")):
        with pytest.raises(SystemExit) as info:
            recipe.main(["--out", str(tmp_path / "w"), *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_recipe_data_cut_short_is_written_again(tmp_path, monkeypatch):
    settings = recipe.RecipeSettings(tasks=[1], train_images=3, test_images=2, pretrain_images=2)
    generate = recipe.generate

    def interrupted(root, splits, **kwargs):
        if tuple(splits) == ("test",):
            raise KeyboardInterrupt
        return generate(root, splits=splits, **kwargs)

    monkeypatch.setattr(recipe, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recipe.write_data(settings, tmp_path)
    monkeypatch.setattr(recipe, "generate", generate)
    recipe.write_data(settings, tmp_path)
    assert (tmp_path / "synth" / "annotations" / "task_1_test.json").is_file()


def test_a_stage_trained_from_an_earlier_upstream_run_is_not_reused(tmp_path):
    """Deleting a stage's folder retrains it; the stages that started from the old one must not
    be reused as if nothing had changed."""
    import json

    stage = recipe.Stage("after", "tiny_pronoun.yaml", 1, [], after=("before",))
    for name, record in (("before", {"finished": 2.0}), ("after", {"finished": 1.5, "upstream": {"before": 1.0}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / recipe.DONE).write_text(json.dumps(record))
    with pytest.raises(RecipeRefused, match=r"stage 'after' was trained from earlier runs of before .*delete"):
        recipe.run_stage(recipe.RecipeSettings(), tmp_path, stage)
    (tmp_path / "before" / recipe.DONE).write_text(json.dumps({"finished": 1.0}))
    assert recipe.run_stage(recipe.RecipeSettings(), tmp_path, stage)["upstream"] == {"before": 1.0}
    # Cut short (a checkpoint, no done.json) and its upstream retrained since: the resume, which
    # takes no init.* of the config, would go on from the old one; refused as a finished stage is.
    (tmp_path / "after" / recipe.DONE).unlink()
    (tmp_path / "after" / recipe.LAST).write_bytes(b"a checkpoint of the first teacher")
    (tmp_path / "after" / recipe.STARTED).write_text(json.dumps({"before": 1.0}))
    (tmp_path / "before" / recipe.DONE).write_text(json.dumps({"finished": 3.0}))
    with pytest.raises(RecipeRefused, match=r"checkpoint\.pth: stage 'after' was started from earlier runs of before"):
        recipe.run_stage(recipe.RecipeSettings(), tmp_path, stage)


def test_a_failed_parallel_stage_is_reported_at_once(tmp_path, capsys):
    """With --jobs 2 a failure surfaced only when the other running stage ended (up to ~35 min)."""
    plan = [recipe.Stage("broken", "no_such_config.yaml", 1, []), recipe.Stage("other", "no_such_either.yaml", 1, [])]
    with pytest.raises(Exception, match="no_such"):
        recipe.run_plan(recipe.RecipeSettings(jobs=2), tmp_path, plan)
    assert "failed: " in capsys.readouterr().err


def test_a_run_whose_model_fails_the_checks_is_not_installed(committed):
    """--install replaced the packaged model with whatever the run made; the checks the tests make
    of the committed model come first now (the committed figures pass them)."""
    assert recipe.install_problems(committed) == []
    broken = json.loads(json.dumps(committed))
    broken["rows"]["distilled student"]["mAP50/bbox"] = 0.1
    problems = recipe.install_problems(broken)
    assert any("more than 0.05 below the plain one" in p for p in problems)
    assert any("do not read the verb" in p for p in problems)
    del broken["rows"]["untrained"]
    assert recipe.install_problems(broken) == ["no box mAP@0.5 for untrained"]
    # Masks broken as the EMA bug broke them (box figures fine): refused too; a figure missing fails.
    masks = json.loads(json.dumps(committed))
    masks["rows"]["distilled student"].update({"mAP50/segm": 0.105, "published_pairwise_iou_median": 0.95,
                                               "published_inside_box_mean": 0.45})
    problems = recipe.install_problems(masks)
    assert len(problems) == 3 and "mask mAP@0.5 0.105 is below 0.7x its box mAP@0.5" in problems[0], problems
    assert "is 0.95, not below 0.3" in problems[1] and "45% of a published mask lies in its box" in problems[2]
    del masks["rows"]["distilled student"]["published_pairwise_iou_median"]
    assert any("is nan, not below 0.3" in p for p in recipe.install_problems(masks))
    # No image with two published instances: no pair to judge (the median of none is NaN).
    clean = json.loads(json.dumps(committed))
    clean["rows"]["distilled student"].update({"published_pairs": 0.0, "published_pairwise_iou_median": float("nan")})
    assert recipe.install_problems(clean) == []


def test_a_stage_records_the_upstream_it_starts_from_and_a_failing_model_is_not_installed(tmp_path, monkeypatch,
                                                                                           committed, capsys):
    """started.json is what the resume check reads: written when the stage starts, before its
    first update (a stage stopped at once keeps it). And `--install` goes through the gate."""
    from types import SimpleNamespace

    (tmp_path / "before").mkdir()
    (tmp_path / "before" / recipe.DONE).write_text(json.dumps({"finished": 4.0}))
    stage = recipe.Stage("after", "tiny_pronoun.yaml", 1, [], after=("before",))

    class StoppedAtOnce:
        def __init__(self, cfg, env, resume=None, stop=None):
            assert resume is None

        def run(self):
            return SimpleNamespace(stopped_by=15, step=0, best=None)

    monkeypatch.setattr(recipe, "stage_config", lambda *args: None)
    monkeypatch.setattr(recipe, "Trainer", StoppedAtOnce)
    with pytest.raises(recipe.StageStopped):
        recipe.run_stage(recipe.RecipeSettings(), tmp_path, stage)
    assert json.loads((tmp_path / "after" / recipe.STARTED).read_text()) == {"before": 4.0}

    installed = []
    monkeypatch.setattr(recipe, "install", lambda model_dir: installed.append(model_dir) or model_dir)
    broken = json.loads(json.dumps(committed))
    broken["rows"]["distilled student"]["mAP50/bbox"] = 0.1
    assert recipe.install_checked(broken, tmp_path / "model") == 1 and installed == []
    assert "not installed (the packaged model is left as it was)" in capsys.readouterr().err
    assert recipe.install_checked(committed, tmp_path / "model") == 0 and installed == [tmp_path / "model"]


def test_the_packaged_model_refuses_edits_as_every_current_export_does(tmp_path):
    """The packaged directory was a version-4 export: its weights recorded no manifest, tokenizer
    digest or network config, so an edited config.yaml or tokenizer.json loaded silently, in the
    model almost every user runs."""
    import shutil

    import yaml
    from safetensors import safe_open

    from toist_core.checkpoint import CheckpointError
    from toist_core.checkpoint.model_dir import (EXPORT_ID_KEY, MANIFEST_KEY, MODEL_CONFIG_KEY, MODEL_DIR_VERSION,
                                                 TOKENIZER_DIGEST_KEY)

    assert yaml.safe_load((DEFAULT_MODEL_DIR / "config.yaml").read_text())["version"] == MODEL_DIR_VERSION
    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), "pt") as weights:
        assert {MANIFEST_KEY, MODEL_CONFIG_KEY, TOKENIZER_DIGEST_KEY, EXPORT_ID_KEY} <= set(weights.metadata())
    edited = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model")
    config = (edited / "config.yaml").read_text()
    assert "short_side: 128" in config
    (edited / "config.yaml").write_text(config.replace("short_side: 128", "short_side: 64"))
    with pytest.raises(CheckpointError, match="input_size"):
        TaskSegmenter.from_pretrained(edited, device="cpu")
    (edited / "config.yaml").write_text(config)
    tokenizer = edited / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"sit"', '"sat"', 1))
    with pytest.raises(CheckpointError, match="tokenizer: its files changed since the export"):
        TaskSegmenter.from_pretrained(edited, device="cpu")
