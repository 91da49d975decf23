"""Tasks beyond COCO-Tasks' fourteen: a vocabulary of one's own through teacher, student,
distillation, export and the node (tiny model, a few updates: the plumbing, not accuracy).

The data are the project's synthetic scenes of generator tasks 1 and 2 under new phrases, as a
team's own annotated images would be after `toist convert-coco`.
"""

import re
from pathlib import Path

import pytest
import torch
import yaml

from toist_core import cli
from toist_core.checkpoint import load_model_dir, save_model_dir
from toist_core.config import preset
from toist_core.data.coco_tasks import build_dataset
from toist_core.data.synth import generate
from toist_core.distill.memory_bank import MemoryBank
from toist_core.inference import TaskSegmenter
from toist_core.model import build_model, load_tokenizer
from toist_core.typed_config import ConfigError
from training.config import load_config
from training.distributed import DistEnv
from training.loops import Trainer
from training.stages import build_stage_models

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"
VOCABULARY = {"name": "workshop", "tasks": [{"id": 1, "phrase": "cut tape with"},
                                            {"id": 2, "phrase": "put a hot pan on", "pronoun": "something"}]}
FAST = ["data.tasks=[1,2]", "data.train_sizes=[96,112]", "data.max_size=128", "data.crop_resize_sizes=[96]", "data.crop_min_size=64",
        "data.crop_max_size=112", "data.test_size=96", "loader.batch_size=2", "loader.num_workers=0",
        "runtime.progress=false", "runtime.tensorboard=false", "runtime.threads=2",
        "checkpoint.export_model_dir=false", "eval.enabled=false", "schedule.max_steps=3"]


@pytest.fixture(scope="module")
def workshop(tmp_path_factory):
    """(data root, vocabulary file) of two own tasks."""
    root = tmp_path_factory.mktemp("own")
    generate(root, tasks=[1, 2], splits=("train", "test"), images_per_split=6, min_size=96, max_size=128, seed=5)
    vocabulary = root / "workshop_tasks.yaml"
    vocabulary.write_text(yaml.safe_dump(VOCABULARY, sort_keys=False))
    return root, vocabulary


def _config(name, workshop, out, *extra):
    root, vocabulary = workshop
    return load_config(CONFIGS / name, [f"data.root={root}", f"data.vocabulary={vocabulary}", f"output_dir={out}",
                                        *FAST, *extra])


def test_captions_read_the_own_phrases(workshop, tmp_path):
    cfg = _config("tiny_distill.yaml", workshop, tmp_path / "x", "init.load=null", "init.load_noun=null")
    assert cfg.distill.num_tasks == 2  # one bank slot per task of the vocabulary, not 14
    dataset = build_dataset(cfg.data, "train", caption_mode="distill")
    samples = [dataset[i] for i in range(len(dataset))]  # (image, noun target, pronoun target)
    pronouns = {(pronoun["task_id"], pronoun["caption"]) for _, _, pronoun in samples}
    assert pronouns == {(1, "cut tape with something"), (2, "put a hot pan on something")}
    nouns = {noun["caption"] for _, noun, _ in samples if noun["caption"]}
    assert any(text.startswith("cut tape with ") and text != "cut tape with something" for text in nouns)
    assert any(text.startswith("put a hot pan on ") for text in nouns)
    assert not any("sit comfortably on" in text or "step on" in text for text in nouns)


def test_a_task_s_own_pronoun_is_the_word_distillation_replaces(workshop, tmp_path, monkeypatch):
    """A vocabulary entry's own pronoun ("sit on it"): the cluster loss and CCR looked for the
    configured pronoun ("something") and stopped the run, and with data.pronoun "it" they found
    the "it" inside "sit" instead of the last word."""
    from toist_core.distill import cluster

    root, _ = workshop
    vocabulary = tmp_path / "own_pronoun.yaml"
    vocabulary.write_text(yaml.safe_dump({"name": "seats", "tasks": [
        {"id": 1, "phrase": "sit on", "pronoun": "it"}, {"id": 2, "phrase": "put a hot pan on"}]}))
    found = []
    real = cluster.pronoun_token_indices

    def recording(tokenized, captions, pronouns):
        indices = real(tokenized, captions, pronouns)
        for b, caption in enumerate(captions):
            found.append((caption, tokenizer.decode(tokenized["input_ids"][b][indices[b]].tolist())))
        return indices

    monkeypatch.setattr(cluster, "pronoun_token_indices", recording)
    for pronoun in ("something", "it"):
        cfg = _config("tiny_distill.yaml", (root, vocabulary), tmp_path / pronoun, "init.load=null",
                      "init.load_noun=null", "distill.bank_size=4", f"data.pronoun={pronoun}",
                      f"distill.pronoun={pronoun}", "schedule.max_steps=2")
        tokenizer = load_tokenizer(cfg.model.text.tokenizer)
        Trainer(cfg, DistEnv()).run()
    assert found and {caption for caption, _ in found} <= {"sit on it", "put a hot pan on something",
                                                          "put a hot pan on it"}
    for caption, token in found:
        assert token == " " + caption.rsplit(" ", 1)[1], (caption, token)


@pytest.fixture(scope="module")
def workshop_model(workshop, tmp_path_factory):
    """Teacher, student and distilled student on the own tasks, exported with `toist export`."""
    runs = tmp_path_factory.mktemp("runs")
    Trainer(_config("tiny_noun.yaml", workshop, runs / "noun"), DistEnv()).run()
    Trainer(_config("tiny_pronoun.yaml", workshop, runs / "pronoun"), DistEnv()).run()
    distill = _config("tiny_distill.yaml", workshop, runs / "distill",
                      f"init.load={runs / 'pronoun' / 'checkpoint.pth'}",
                      f"init.load_noun={runs / 'noun' / 'checkpoint.pth'}", "distill.bank_size=4")
    Trainer(distill, DistEnv()).run()
    model_dir = runs / "workshop_model"
    assert cli.main(["export", str(runs / "distill" / "checkpoint.pth"), str(model_dir)]) == 0
    return model_dir


def test_own_tasks_train_distil_export_and_resolve_by_phrase(workshop_model):
    model_dir = workshop_model
    written = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert written["vocabulary"]["tasks"] == VOCABULARY["tasks"] and written["tasks"] == [1, 2]
    loaded = load_model_dir(model_dir)
    assert loaded.memory_bank.num_tasks == 2 and loaded.vocabulary.num_tasks == 2

    segmenter = TaskSegmenter.from_pretrained(model_dir, device="cpu")
    tape = segmenter.encode_task("cut tape with")
    pan = segmenter.encode_task("Put a hot pan on something")
    assert (tape.task_id, tape.caption) == (1, "cut tape with something")
    assert (pan.task_id, pan.caption) == (2, "put a hot pan on something")
    # CCR with each task's own bank slot: the centres differ between the two tasks.
    assert tape.centres is not None and pan.centres is not None and not torch.equal(tape.centres, pan.centres)
    with pytest.raises(ValueError, match=r"task '3' looks like a task id but task vocabulary 'workshop' has ids 1\.\.2"):
        segmenter.encode_task("3")
    assert segmenter.encode_task("sit comfortably on").task_id is None  # not a task of this model: free text
    prediction = segmenter.predict(torch.randint(0, 255, (100, 120, 3), dtype=torch.uint8).numpy(), pan)
    assert prediction.boxes.shape[1] == 4


def test_toist_evaluate_reads_the_own_noun_teacher_with_its_own_phrases(workshop, workshop_model, tmp_path,
                                                                        monkeypatch, capsys):
    """`toist evaluate` of the own tasks' noun teacher (noun captions, --captions auto) built its
    captions from COCO-Tasks' phrases ("step on chair" for task 1), not the ones training scored."""
    import toist_core.inference.noun_captions as noun_captions
    from test_train_run import record_noun_captions

    seen = record_noun_captions(monkeypatch, noun_captions)
    root, _ = workshop
    teacher = workshop_model.parent / "noun" / "checkpoint.pth"
    assert cli.main(["evaluate", "--checkpoint", str(teacher), "--data", str(root), "--max-images", "2", "--device",
                     "cpu", "--no-plots", "--out", str(tmp_path / "eval")]) == 0
    captions = [caption for caption in seen if caption]  # "": an image without a preferred object
    assert captions and all(c.startswith(("cut tape with ", "put a hot pan on ")) for c in captions), captions
    # A task the model does not have: said as such (it was "task_3_test.json: annotation file not found").
    assert cli.main(["evaluate", "--checkpoint", str(teacher), "--data", str(root), "--tasks", "3", "--device", "cpu",
                     "--no-plots", "--out", str(tmp_path / "eval3")]) == 2
    assert (f"--tasks: task 3 is not a task of {teacher}: task vocabulary 'workshop' has ids 1..2"
            in capsys.readouterr().err)


def test_fine_tuning_a_fourteen_task_model_dir_onto_own_tasks_keeps_weights_and_starts_the_bank_empty(workshop,
                                                                                                        tmp_path):
    tokenizer = load_tokenizer(preset("tiny").text.tokenizer)
    torch.manual_seed(0)
    released = build_model(preset("tiny"), tokenizer=tokenizer)
    bank = MemoryBank(num_tasks=14, size=4, dim=128, num_clusters=3)
    bank.update_count.fill_(9.0)  # a used bank
    source = save_model_dir(released, tmp_path / "released", preset("tiny"), memory_bank=bank)
    cfg = _config("tiny_distill.yaml", workshop, tmp_path / "ft", f"init.load={source}", f"init.load_noun={source}",
                  "distill.bank_size=4")
    models = build_stage_models(cfg, tokenizer, log=lambda *_: None)
    for key, value in released.state_dict().items():
        assert torch.equal(models.model.state_dict()[key], value), key
        assert torch.equal(models.teacher.state_dict()[key], value), key
    assert models.cluster.bank.num_tasks == 2 and not models.cluster.bank.update_count.any()


def _spec(folder, tasks):
    path = folder / f"spec_{len(list(folder.glob('spec_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"name": "shop", "tasks": tasks}))
    return path


@pytest.mark.parametrize("tasks, says", [
    # Task 2's caption is task 1's phrase: asking for "sit on it" gave task 1.
    ([{"id": 1, "phrase": "sit on it"}, {"id": 2, "phrase": "sit on", "pronoun": "it"}],
     "the phrase of task 1 and the caption of task 2 are both 'sit on it'"),
    ([{"id": 1, "phrase": "sit on", "pronoun": "it"}, {"id": 2, "phrase": "sit", "pronoun": "on it"}],
     "the caption of task 1 and the caption of task 2 are both 'sit on it'"),
    ([{"id": 1, "phrase": "lean on something"}],
     "task 1: phrase 'lean on something' ends with its pronoun 'something', which the caption adds"),
    ([{"id": 1, "phrase": "cut tape with"}, {"id": 2, "phrase": "2"}],
     "task 2: phrase '2' reads as a number: a request for it would be taken as a task id"),
])
def test_every_task_of_a_vocabulary_can_be_requested_by_its_phrase_and_caption(tasks, says, workshop, tmp_path):
    """Refused where a run takes the vocabulary up (and said by the converter); a model trained on
    one before keeps loading and serving its ids."""
    from toist_core.tasks import TaskVocabulary, resolve_task

    spec = tmp_path / "shop.yaml"
    spec.write_text(yaml.safe_dump({"name": "shop", "tasks": tasks}))
    with pytest.raises(ConfigError, match=re.escape(f"data: vocabulary: shop: {says}")):
        load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={workshop[0]}", f"data.vocabulary={spec}",
                                                     "data.tasks=[]"])
    from toist_core.data.convert_coco import vocabulary_problem

    assert says in vocabulary_problem(spec)
    assert TaskVocabulary.from_data({"name": "shop", "tasks": tasks}).num_tasks == len(tasks)   # recorded: read
    # With the run's own pronoun: "hold something" is fine when the captions end with "it", and
    # "sit on it" beside "sit on" (caption "sit on it") is not.
    fine = _spec(tmp_path, [{"id": 1, "phrase": "hold something"}])
    assert load_config(CONFIGS / "tiny_pronoun.yaml", ["data.pronoun=it", "data.tasks=[]",
                                                       f"data.vocabulary={fine}"]).data.pronoun == "it"
    clash = _spec(tmp_path, [{"id": 1, "phrase": "sit on"}, {"id": 2, "phrase": "sit on it"}])
    with pytest.raises(ConfigError, match=r"task 2: phrase 'sit on it' ends with its pronoun 'it'"):
        load_config(CONFIGS / "tiny_pronoun.yaml", ["data.pronoun=it", "data.tasks=[]", f"data.vocabulary={clash}"])
    shop = TaskVocabulary.from_data({"name": "shop", "tasks": [{"id": 1, "phrase": "sit on"},
                                                              {"id": 2, "phrase": "sit on it and"}]})
    for text, task_id in (("sit on", 1), ("Sit on something", 1), ("sit on it and", 2),
                          ("sit on it and something", 2), ("2", 2)):
        assert resolve_task(text, vocabulary=shop).task_id == task_id, text


def test_a_vocabulary_must_number_its_tasks_1_to_n(workshop, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": [{"id": 1, "phrase": "cut tape with"}, {"id": 3, "phrase": "x y"}]}))
    with pytest.raises(ValueError, match=r"bad.yaml: tasks\[1\]: id: expected 2 \(ids are 1..N in order"):
        load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={workshop[0]}", f"data.vocabulary={bad}"])
    # A name that is a list or mapping (an alias bomb's payload was one) is refused, not printed.
    from toist_core.tasks import TaskVocabulary

    with pytest.raises(ValueError, match=r"shop: name: expected text, got a list"):
        TaskVocabulary.from_data({"name": ["x"] * 3, "tasks": [{"id": 1, "phrase": "cut tape with"}]}, source="shop")
    assert TaskVocabulary.from_data({"name": 2024, "tasks": [{"id": 1, "phrase": "cut tape with"}]}).name == "2024"
    # Untouched, data.tasks means every task of the vocabulary.
    cfg = load_config(CONFIGS / "pronoun.yaml", [f"data.root={workshop[0]}", f"data.vocabulary={workshop[1]}"])
    assert cfg.data.tasks == [1, 2]
    with pytest.raises(ValueError, match=r"tasks: 5 is not a task of task vocabulary 'workshop': ids 1..2"):
        load_config(CONFIGS / "tiny_pronoun.yaml", [f"data.root={workshop[0]}", f"data.vocabulary={workshop[1]}",
                                                     "data.tasks=[1,5]"])


def test_a_vocabulary_named_again_is_read_again_and_an_edited_one_is_said(workshop, tmp_path):
    """A run's config.yaml records the vocabulary's entries, which won over a file named on the
    command line: `--config runs/x/config.yaml data.vocabulary=new.yaml` trained on the old phrases."""
    from training.config import save_config

    saved = tmp_path / "config.yaml"
    save_config(_config("tiny_pronoun.yaml", workshop, tmp_path / "run"), saved)
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({"name": "workshop", "tasks": [{"id": 1, "phrase": "seal a box with"},
                                                                     {"id": 2, "phrase": "put a hot pan on"}]}))
    cfg = load_config(saved, [f"data.vocabulary={changed}"])
    assert cfg.data.task_vocabulary().phrase(1).strip() == "seal a box with"
    edited = tmp_path / "edited.yaml"
    edited.write_text(workshop[1].read_text())
    cfg = load_config(saved, [f"data.vocabulary={edited}"])                  # recorded from edited.yaml
    save_config(cfg, saved)
    edited.write_text(changed.read_text())
    with pytest.warns(UserWarning, match=r"edited.yaml: its tasks differ from the data.vocabulary_entries this "
                                         r"configuration recorded from it; the recorded ones are used"):
        cfg = load_config(saved)
    assert cfg.data.task_vocabulary().phrase(1).strip() == "cut tape with"


@pytest.mark.ros
def test_the_node_serves_the_own_tasks_by_phrase_with_ccr(workshop_model):
    from rclpy.parameter import Parameter

    from ros_support import RosSession
    from test_ros_node import OVERRIDES, Probe, _photo
    from toist_ros.perception_node import PerceptionNode

    ros = RosSession()
    try:
        overrides = dict(OVERRIDES, checkpoint=str(workshop_model), task="cut tape with")
        node = PerceptionNode(context=ros.context, parameter_overrides=[Parameter(k, value=v)
                                                                        for k, v in overrides.items()])
        ros.add(node)
        assert (node.active_task.task_id, node.active_task.caption) == (1, "cut tape with something")
        probe = Probe(ros)
        answer = probe.set_task("put a hot pan on")
        assert answer.success and "task 2 of the model's vocabulary" in answer.message
        assert node.active_task.state.centres is not None  # CCR with task 2's bank slot
        _, result = probe.roundtrip(_photo(), "own_task_frame")
        assert (result.task_id, result.task, result.task_revision) == (2, "put a hot pan on something",
                                                                       answer.revision)
        refused = probe.set_task("3")
        assert not refused.success and "task vocabulary 'workshop' has ids 1..2" in refused.message
        assert node.active_task.task_id == 2  # unchanged
    finally:
        ros.close()


def test_validation_reads_the_own_vocabulary_and_checks_noun_names_when_the_run_starts(workshop, tmp_path):
    """The validation set was built with the COCO-Tasks vocabulary (a task 15 of one's own is
    not there) and in pronoun mode: a teacher's validation image whose preferred object has no
    class name stopped the run at its first evaluation with a bare KeyError."""
    import json

    from toist_core.data.schema import DataError
    from training.evaluate import build_validation_set

    root, _ = workshop
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    (data / "images").symlink_to(root / "images")
    for split in ("train", "test"):
        (data / "annotations" / f"task_15_{split}.json").write_text(
            (root / "annotations" / f"task_1_{split}.json").read_text())
    vocabulary = tmp_path / "fifteen.yaml"
    vocabulary.write_text(yaml.safe_dump({"name": "fifteen", "tasks": [{"id": k, "phrase": f"use tool {k} with"}
                                                                       for k in range(1, 16)]}))
    settings = [f"data.root={data}", f"data.vocabulary={vocabulary}", "data.tasks=[15]", "eval.split=test"]
    cfg = load_config(CONFIGS / "tiny_noun.yaml", [*settings, f"output_dir={tmp_path / 'run'}", *FAST[1:]])
    assert build_validation_set(cfg).image_ids[15]
    test_file = data / "annotations" / "task_15_test.json"
    records = json.loads(test_file.read_text())
    preferred = next(a for a in records["annotations"] if a["category_id"] == 1)
    preferred["COCO_category_id"] = 999
    test_file.write_text(json.dumps(records))
    with pytest.raises(DataError, match=rf"{test_file}: annotation id {preferred['id']}: field 'COCO_category_id': "
                                        r"999 has no class name \(needed for noun captions\)"):
        build_validation_set(cfg)
    pronoun = load_config(CONFIGS / "tiny_pronoun.yaml", [*settings, f"output_dir={tmp_path / 'p'}", *FAST[1:]])
    assert build_validation_set(pronoun).image_ids[15]   # pronoun captions name no class


def test_a_mask_stage_refuses_a_frozen_detector_of_other_phrases(workshop, workshop_model, tmp_path):
    """Phrases reordered between the distillation and its mask head: the run trained over captions
    the detector never read, bank slot 2 (task 2's pronoun features) served task 2's new phrase,
    and the exported model recorded the new phrases, without a word."""
    from toist_core.checkpoint import CheckpointError
    from training.config import check_paths

    root, vocabulary = workshop
    detector = workshop_model.parent / "distill" / "checkpoint.pth"
    swapped = tmp_path / "swapped.yaml"
    tasks = VOCABULARY["tasks"]
    swapped.write_text(yaml.safe_dump({"name": "swapped", "tasks": [dict(tasks[0], phrase=tasks[1]["phrase"]),
                                                                    dict(tasks[1], phrase=tasks[0]["phrase"])]}))
    for stage in ("tiny_mask_head_distill.yaml", "tiny_mask_head.yaml"):
        extra = [f"init.frozen_weights={detector}", "distill.bank_size=4"]
        check_paths(_config(stage, workshop, tmp_path / "ok", *extra))   # its own phrases: accepted
        cfg = _config(stage, (root, swapped), tmp_path / "run", *extra)
        with pytest.raises(CheckpointError, match=r"init.frozen_weights: .*checkpoint.pth was trained on task "
                                                  r"vocabulary 'workshop', this run's data is task vocabulary "
                                                  r"'swapped': task 1 is 'cut tape with' there, 'put a hot pan on' "
                                                  r"here; the frozen detector reads only the captions it was"):
            check_paths(cfg)
