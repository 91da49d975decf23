"""Parameters: the spec table, config/perception.yaml, declaration with descriptors, validation."""

from pathlib import Path

import pytest
import yaml

from toist_ros import params as P
from toist_core.typed_config import flatten
from toist_ros.param_sources import rule_value, same_value

ROOT = Path(__file__).resolve().parents[1]


def _spec(name):
    return P.SPECS[name]


@pytest.mark.parametrize("name, good, bad", [
    ("score_threshold", [0.0, 0.5, 1.0, 1], [-0.01, 1.01, float("nan"), "0.5", True]),
    ("mask_threshold", [0.01, 0.5, 0.99], [0.0, 1.0, -1.0, 2.0]),
    ("max_instances", [1, 10, 100], [0, 101, -3, 2.5]),
    ("input.max_age_s", [0.0, 0.25, 3600.0], [-0.1, 1e9]),
    ("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"], ["gpu", "cuda:", "cuda:x", "CUDA", "tpu", ""]),
    ("precision", ["fp32", "fp16", "bf16"], ["fp64", "half", ""]),
    ("task", ["2", "sit comfortably on", "something to cut with", 2], [2.5, True]),
    ("input.topics", [["image"], ["front/image", "rear/image"], ["/cam/image"]],
     [[], ["image", "image"], ["bad topic"], ["image/"], "image", [1]]),
    ("output.masks", [True, False], [1, "true"]),
    ("input.reliability", ["auto", "reliable", "best_effort"], ["best effort", "true", True, ""]),
    ("input.max_pixels", [1, 640 * 480, 1 << 30], [0, -1, (1 << 30) + 1, 2.5]),
])
def test_check_value_accepts_and_rejects(name, good, bad):
    spec = _spec(name)
    for value in good:
        assert P.check_value(spec, value) is None, (name, value)
    for value in bad:
        reason = P.check_value(spec, value)
        assert reason and reason.startswith(name), (name, value, reason)


def test_out_of_range_reason_names_value_and_range():
    assert P.check_value(_spec("score_threshold"), 1.5) == "score_threshold: 1.5 is out of range [0.0, 1.0]"
    assert P.check_value(_spec("mask_threshold"), 1.0) == "mask_threshold: 1.0 is out of range (0.0, 1.0)"


def test_check_values_catches_unknown_names_and_size_order():
    assert P.check_values({"score_treshold": 0.3}) == ["score_treshold: not a parameter of this node"]
    reasons = P.check_values({"input.short_side": 800, "input.max_side": 600})
    assert len(reasons) == 1 and "max_side 600" in reasons[0]
    # 0 leaves a size to the model (the other one is then not compared with it).
    assert P.check_values({"input.short_side": 800, "input.max_side": 0}) == []
    assert P.check_values({"input.short_side": 0, "input.max_side": 600}) == []
    # A depth range needs max above min: equal is no range.
    assert P.check_values({"depth.min_m": 1.0, "depth.max_m": 1.0}) == [
        "depth.max_m 1.0 must be greater than depth.min_m 1.0"]
    assert P.check_values({"depth.min_m": 1.0, "depth.max_m": 1.5}) == []


def test_every_bad_value_is_listed_at_once():
    """The checks of values together and of the input size ran only when every value was fine on
    its own: a start-up refused for one value, and next time for another (docs: "lists every bad
    value")."""
    reasons = P.check_values({"score_threshold": 1.5, "input.short_side": 8, "depth.min_m": 2.0, "depth.max_m": 1.0,
                              "input.topics": ["image", "/abs/image"]})
    assert reasons[0] == "score_threshold: 1.5 is out of range [0.0, 1.0]"
    assert any(r.startswith("input.short_side: 8 px is under the") for r in reasons), reasons
    assert "depth.max_m 1.0 must be greater than depth.min_m 2.0" in reasons
    assert any("/abs/image" in r for r in reasons) and len(reasons) == 4, reasons
    # A value bad on its own is not compared with another (no second, confusing reason).
    assert P.check_values({"depth.min_m": -1.0, "depth.max_m": -2.0}) == [
        P.check_value(P.SPECS["depth.min_m"], -1.0), P.check_value(P.SPECS["depth.max_m"], -2.0)]


def test_defaults_are_valid_and_the_yaml_file_matches_the_table():
    assert P.check_values(P.flat_defaults()) == []
    data = yaml.safe_load((ROOT / "config" / "perception.yaml").read_text())
    values = flatten(data["/**"]["ros__parameters"])
    assert set(values) == set(P.SPECS), set(values) ^ set(P.SPECS)
    assert values == P.flat_defaults()
    assert flatten(P.nested_defaults()) == P.flat_defaults()


def test_run_time_switches_are_not_read_only_and_model_settings_are():
    for name in ("score_threshold", "mask_threshold", "max_instances", "input.max_age_s", "output.masks",
                 "output.debug_image"):
        assert not _spec(name).read_only, name
    for name in ("checkpoint", "device", "text_encoder", "precision", "input.short_side", "input.topics",
                 "input.reliability", "input.max_pixels", "input.compressed"):
        assert _spec(name).read_only, name


# --- with rclpy -----------------------------------------------------------------------------

rclpy = pytest.importorskip("rclpy", reason="rclpy is installed by `make setup`")


@pytest.fixture
def context():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


def _node(context, overrides=()):
    from rclpy.parameter import Parameter

    params = [Parameter(name, value=value) for name, value in overrides]
    return rclpy.create_node("params_probe", context=context, parameter_overrides=params)


def test_declare_gives_descriptors_with_ranges(context):
    node = _node(context)
    try:
        settings = P.declare(node)
        assert settings["score_threshold"] == 0.5 and settings["input.topics"] == ["image"]
        desc = node.describe_parameter("score_threshold")
        assert (desc.floating_point_range[0].from_value, desc.floating_point_range[0].to_value) == (0.0, 1.0)
        assert "score" in desc.description
        desc = node.describe_parameter("max_instances")
        assert (desc.integer_range[0].from_value, desc.integer_range[0].to_value) == (1, 100)
        assert node.describe_parameter("device").read_only
        assert "restart" in node.describe_parameter("device").additional_constraints
    finally:
        node.destroy_node()


def test_declare_reports_every_bad_override(context):
    node = _node(context, [("score_threshold", 3.0), ("device", "tpu"), ("max_instances", "ten")])
    try:
        with pytest.raises(P.ParameterError) as info:
            P.declare(node)
        text = str(info.value)
        assert "score_threshold" in text and "device: 'tpu'" in text and "max_instances: expected int, got str 'ten'" in text
    finally:
        node.destroy_node()


def test_a_whole_number_for_a_float_parameter_is_that_float_at_start_up_too(context):
    """`-p score_threshold:=1` or `max_age_s: 2` in a params file arrive as integers: accepted at
    run time (ints_to_doubles), they used to stop the node at start-up with 'wrong type'."""
    node = _node(context, [("score_threshold", 1), ("input.max_age_s", 2)])
    try:
        settings = P.declare(node)
        assert settings["score_threshold"] == 1.0 and isinstance(settings["score_threshold"], float)
        assert settings["input.max_age_s"] == 2.0
        assert node.get_parameter("input.max_age_s").type_ == node.get_parameter("input.max_age_s").Type.DOUBLE
        # Still a double parameter with its range afterwards.
        assert node.describe_parameter("score_threshold").floating_point_range[0].to_value == 1.0
    finally:
        node.destroy_node()
    node = _node(context, [("score_threshold", True), ("mask_threshold", "half")])
    try:
        with pytest.raises(P.ParameterError) as info:
            P.declare(node)
        assert "score_threshold: wrong type: expected float, got bool True" in str(info.value)
        assert "mask_threshold: wrong type: expected float, got string 'half'" in str(info.value)
    finally:
        node.destroy_node()


def test_an_input_size_the_frame_limits_would_refuse_every_frame_for_is_refused(context):
    """input.short_side 8 used to start the node, which then rejected every frame as 'aspect'."""
    assert P.check_values({"input.short_side": 8}) == [
        f"input.short_side: 8 px is under the {P.MIN_MODEL_SIDE} px the model needs at least (every frame would "
        "be rejected); 0 = the model's own size"]
    assert P.check_values({"input.max_side": 1})
    assert P.check_values({"input.short_side": 0, "input.max_side": 0}) == []
    assert P.check_values({"input.short_side": P.MIN_MODEL_SIDE}) == []
    node = _node(context, [("input.short_side", 1)])
    try:
        with pytest.raises(P.ParameterError, match="input.short_side: 1 px"):
            P.declare(node)
    finally:
        node.destroy_node()


def test_cameras_must_not_share_outputs_or_leave_the_namespace(context):
    """front_image and rear_image both published on instances: nothing said which camera a result
    came from; /cam/image put its outputs outside the node's namespace."""
    assert P.check_values({"input.topics": ["front/image", "rear/image", "image"]}) == []
    assert P.check_values({"input.topics": ["front_image", "rear_image"]}) == [
        "input.topics: front_image and rear_image would publish on the same instances and debug_image: give "
        "each camera a folder of its own (front/image, rear/image)"]
    assert P.check_values({"input.topics": ["cam/image", "cam/compressed_image"]}) == [
        "input.topics: cam/image and cam/compressed_image would publish on the same cam/instances and "
        "cam/debug_image: give each camera a folder of its own (front/image, rear/image)"]
    [reason] = P.check_values({"input.topics": ["/cam/image"]})
    assert reason.startswith("input.topics: ['/cam/image']: give relative names") and "-r front/image:=" in reason
    node = _node(context, [("input.topics", ["front_image", "rear_image"])])
    try:
        with pytest.raises(P.ParameterError, match="would publish on the same instances"):
            P.declare(node)
    finally:
        node.destroy_node()


def test_task_given_as_a_number_is_the_task_text(context):
    node = _node(context, [("task", 3)])
    try:
        assert P.declare(node)["task"] == "3"
    finally:
        node.destroy_node()


def test_run_time_changes_are_validated(context):
    from rclpy.parameter import Parameter

    node = _node(context)
    try:
        P.declare(node)
        node.add_on_set_parameters_callback(P.check_parameter_changes)
        node.add_pre_set_parameters_callback(P.ints_to_doubles)
        [ok] = node.set_parameters([Parameter("score_threshold", value=0.8)])
        assert ok.successful and node.get_parameter("score_threshold").value == 0.8
        [bad] = node.set_parameters([Parameter("score_threshold", value=1.5)])
        assert not bad.successful and "score_threshold" in bad.reason
        assert node.get_parameter("score_threshold").value == 0.8
        [bad] = node.set_parameters([Parameter("mask_threshold", value=1.0)])
        assert not bad.successful and "(0.0, 1.0)" in bad.reason
        [bad] = node.set_parameters([Parameter("device", value="cpu")])
        assert not bad.successful and "read-only" in bad.reason
        [ok] = node.set_parameters([Parameter("score_threshold", value=1)])  # int for a double
        assert ok.successful and node.get_parameter("score_threshold").value == 1.0
        [ok] = node.set_parameters([Parameter("use_sim_time", value=True)])  # ROS's own parameter
        assert ok.successful
    finally:
        node.destroy_node()


def test_every_parameter_is_documented():
    docs = (ROOT / "docs" / "ros.md").read_text()
    for name in P.SPECS:
        assert f"`{name}`" in docs, name


def test_unknown_overrides_name_the_closest_parameter():
    warnings = P.unknown_overrides(["score_treshold", "use_sim_time", "qos_overrides./image.subscription.depth",
                                    "max_instances", "zzz_nothing_like_it", "input.reliable"])
    assert len(warnings) == 4, warnings
    by_name = {w.split("'")[1]: w for w in warnings}
    assert "did you mean 'score_threshold'?" in by_name["score_treshold"]
    # ROS's QoS override of a topic that takes none: ignored by ROS without a word before.
    assert ("is ignored: this node's topics take no QoS overrides (the image subscriptions' reliability is "
            "input.reliability" in by_name["qos_overrides./image.subscription.depth"])
    assert "is ignored" in by_name["zzz_nothing_like_it"] and "ros2 param list" in by_name["zzz_nothing_like_it"]
    assert "'input.reliability'" in by_name["input.reliable"]


def test_a_misspelt_command_line_parameter_is_found_on_a_real_node(context):
    """`-p score_treshold:=0.9` reaches the node as an override ROS would ignore silently."""
    node = rclpy.create_node("params_probe", context=context,
                             cli_args=["--ros-args", "-p", "score_treshold:=0.9", "-p", "max_instances:=3"])
    try:
        settings = P.declare(node)
        assert settings["max_instances"] == 3 and settings["score_threshold"] == 0.5
        [warning] = P.unknown_overrides(node._parameter_overrides)
        assert "'score_treshold'" in warning and "'score_threshold'" in warning
    finally:
        node.destroy_node()


def test_a_command_line_value_rcl_dropped_for_its_type_is_refused(context):
    """rcl drops a `-p` rule whose type differs from the params file's value of that name,
    without a word: `-p output.masks:=0` beside the package's params file left masks on."""
    params_file = str(Path(__file__).resolve().parents[1] / "config" / "perception.yaml")
    argv = ["perception_node", "--ros-args", "--params-file", params_file, "-p", "output.masks:=0",
            "-p", "max_instances:=0.5", "-p", "score_threshold:=1", "-p", "task:=3"]
    node = rclpy.create_node("toist_perception", context=context, cli_args=argv[1:])
    try:
        assert node._parameter_overrides["output.masks"].value is True   # what rcl made of it
        with pytest.raises(P.ParameterError) as info:
            P.declare(node, argv)
        text = str(info.value)
        assert (f"output.masks: -p output.masks:=0 was not applied: ROS kept {params_file}'s True (rcl drops a "
                "later value of another type; give true or false)") in text
        assert "max_instances: -p max_instances:=0.5 was not applied" in text and "give a whole number" in text
        assert "score_threshold" not in text and "task" not in text   # 1 is 1.0; "3" is the text it means
    finally:
        node.destroy_node()


def _own_file(tmp_path, name, key, **values):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({key: {"ros__parameters": values}}))
    return str(path)


def _declared(context, argv):
    node = rclpy.create_node("toist_perception", context=context, cli_args=argv)
    try:
        return P.declare(node, ["perception_node", *argv])
    finally:
        node.destroy_node()


def test_a_task_cut_at_a_yaml_comment_is_said(context):
    """rcl reads `-p "task:=sit on # it"` as "sit on" (YAML comment); this check read the whole
    text, and said the value came "from a setting this check does not read"."""
    settings = _declared(context, ["--ros-args", "-p", "task:=sit on # it"])
    assert settings["task"] == "sit on"
    assert settings.notes == ["task: -p task:=sit on # it reached the node as 'sit on': in a -p value whitespace "
                              "then '#' starts a YAML comment; quote the value to keep it whole (-p 'task:=\"...\"')"]
    settings = _declared(context, ["--ros-args", "-p", "task:='sit on # it'"])
    assert settings["task"] == "sit on # it" and not settings.notes
    assert _declared(context, ["--ros-args", "-p", "task:=C#"])["task"] == "C#"


def test_a_blank_task_is_refused_before_the_model_loads(context, tmp_path):
    """task: "" or "  " passed the parameter check and stopped the node only after the model had
    loaded ("task text is empty"); a lifecycle node failed every configure until restarted."""
    for blank in ("", "  ", "\n"):
        own = _own_file(tmp_path, "blank.yaml", "/**", task=blank)
        with pytest.raises(P.ParameterError, match=r"task: .* is not valid; expected a task id, a task name or free "
                                                   r"text, not blank"):
            _declared(context, ["--ros-args", "--params-file", own])
    own = _own_file(tmp_path, "text.yaml", "/**", task=" sit on ")
    assert _declared(context, ["--ros-args", "--params-file", own])["task"] == " sit on "


def test_a_params_file_keyed_for_another_node_is_named(context, tmp_path):
    """A params file keyed by the executable's name (perception_node:), or by the node's name
    without the namespace it runs in, set nothing and nothing said so: every value silently the
    default."""
    by_executable = _own_file(tmp_path, "by_executable.yaml", "perception_node", score_threshold=0.9)
    settings = _declared(context, ["--ros-args", "--params-file", by_executable])
    assert settings["score_threshold"] == 0.5
    assert [n for n in settings.notes if n.startswith(f"{by_executable} sets nothing for this node (/toist_perception): "
                                                      "its keys are /perception_node;")]
    no_namespace = _own_file(tmp_path, "no_namespace.yaml", "/toist_perception", score_threshold=0.9)
    node = rclpy.create_node("toist_perception", namespace="front", context=context,
                             cli_args=["--ros-args", "--params-file", no_namespace])
    try:
        settings = P.declare(node, ["perception_node", "--ros-args", "--params-file", no_namespace])
    finally:
        node.destroy_node()
    assert settings["score_threshold"] == 0.5
    assert any(n.startswith(f"{no_namespace} sets nothing for this node (/front/toist_perception)") for n in settings.notes)
    # A file with this node's key among others' is read, and nothing is said.
    shared = tmp_path / "shared.yaml"
    shared.write_text(yaml.safe_dump({"camera_driver": {"ros__parameters": {"fps": 30}},
                                      "toist_perception": {"ros__parameters": {"score_threshold": 0.9}}}))
    settings = _declared(context, ["--ros-args", "--params-file", str(shared)])
    assert settings["score_threshold"] == 0.9 and not settings.notes


def test_what_the_command_line_sets_last_is_what_the_node_takes(context, tmp_path):
    """rcl keeps a file's value over a later one of a lower-ranked type: `score_threshold: 1` in
    one's own params file and a later `-p score_threshold:=0.3` was refused ("give a number", a
    number given); a params file's `task: 3` beside a launch argument's `task: bed` started the
    node on task 3 without a word; quoted -p text with YAML's escapes was refused."""
    own = _own_file(tmp_path, "own.yaml", "/**", score_threshold=1, task=3, **{"input.max_age_s": 2})
    settings = _declared(context, ["--ros-args", "--params-file", own, "-p", "score_threshold:=0.3",
                                   "-p", "input.max_age_s:=0.5", "-p", "task:=bed"])
    assert (settings["score_threshold"], settings["input.max_age_s"], settings["task"]) == (0.3, 0.5, "bed")
    assert not settings.notes
    for raw, text in (("'it''s a cup'", "it's a cup"), ('"say \\"hi\\""', 'say "hi"')):
        assert _declared(context, ["--ros-args", "-p", f"task:={raw}"])["task"] == text
    # A file after a -p rule wins, as ROS orders them: taken, and the rule said to be overridden.
    config = str(Path(__file__).resolve().parents[1] / "config" / "perception.yaml")
    settings = _declared(context, ["--ros-args", "-p", "score_threshold:=0.3", "--params-file", config])
    assert settings["score_threshold"] == 0.5
    assert settings.notes == [f"score_threshold: -p score_threshold:=0.3 is overridden by {config}'s 0.5, which comes "
                              "after it (ROS applies -p and --params-file in order: put -p last)"]
    # Two files (a launch's params_file, then the file it writes of its arguments): refused, both named.
    launch = _own_file(tmp_path, "launch.yaml", "/toist_perception", task="bed")
    by_name = _own_file(tmp_path, "by_name.yaml", "/toist_perception", task=3)
    with pytest.raises(P.ParameterError, match=rf"task: {launch}'s 'bed' was not applied: ROS kept {by_name}'s 3 "
                                               r"\(under one node key rcl does not replace a value by a later one"):
        _declared(context, ["--ros-args", "--params-file", by_name, "--params-file", launch])
    assert _declared(context, ["--ros-args", "--params-file", by_name, "-p", "task:=bed"])["task"] == "bed"  # keys apart
    # A file's plain scalars as rcl reads them (PyYAML: the text "n", "1e-3"): agreeing, not refused.
    plain = tmp_path / "plain.yaml"
    plain.write_text("/**:\n  ros__parameters:\n    output:\n      masks: n\n    score_threshold: 1e-3\n")
    settings = _declared(context, ["--ros-args", "-p", "output.masks:=false", "-p", "score_threshold:=0.001",
                                   "--params-file", str(plain)])
    assert settings["output.masks"] is False and settings["score_threshold"] == 0.001 and not settings.notes
    # /**/toist_perception (the launch's own key) is read; a key this check does not read (/*) is
    # ROS's order taken, and said; and a -p rule before such a file is not applied over it (the
    # file repeating an earlier value made it look lost to type ranking).
    wild = _own_file(tmp_path, "wild.yaml", "/**/toist_perception", score_threshold=0.7)
    settings = _declared(context, ["--ros-args", "-p", "score_threshold:=0.3", "--params-file", wild])
    assert settings["score_threshold"] == 0.7 and "is overridden by" in settings.notes[0]
    star = _own_file(tmp_path, "star.yaml", "/*", score_threshold=1)   # rcl's * (one token) matches the node
    settings = _declared(context, ["--ros-args", "--params-file", own, "-p", "score_threshold:=0.3",
                                   "--params-file", star])
    assert settings["score_threshold"] == 1.0 and f"is overridden by {star}'s 1" in settings.notes[0]
    # Another node's keys, wildcards or namespaces as nested maps, set nothing of ours.
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"/**/camera_driver": {"ros__parameters": {"score_threshold": 1}},
                                     "front": {"toist_perception": {"ros__parameters": {"score_threshold": 1}}}}))
    settings = _declared(context, ["--ros-args", "--params-file", own, "-p", "score_threshold:=0.3",
                                   "--params-file", str(other)])
    assert settings["score_threshold"] == 0.3
    assert settings.notes == [f"{other} sets nothing for this node (/toist_perception): its keys are "
                              "/**/camera_driver, /front/toist_perception; key it /** or by the node's name with its "
                              "namespace (e.g. /front/toist_perception, or /**/toist_perception in any namespace)"]
    # rcl applies a node's keys in the order each first appears: a later /** file loses to an
    # earlier /**/toist_perception one (the launch's) when /** came first; refused, saying so.
    launch = _own_file(tmp_path, "launch_own.yaml", "/**/toist_perception", task="bed")
    later = _own_file(tmp_path, "later.yaml", "/**", task="cup")
    with pytest.raises(P.ParameterError, match=rf"task: {later}'s 'cup' was not applied: ROS kept {launch}'s 'bed' "
                                               r"\(rcl applies a node's keys in the order each first appears"):
        _declared(context, ["--ros-args", "--params-file", config, "--params-file", launch, "--params-file", later])
    with pytest.raises(P.ParameterError, match=r"input.topics"):   # [] beside the file was its default, unsaid
        _declared(context, ["--ros-args", "--params-file", config, "-p", "input.topics:=[]"])


def test_the_type_of_a_command_line_value_is_read_as_rcl_reads_it(context):
    """A `-p` value's type as rcl gives it: a wrong guess would refuse a good value
    (`-p score_threshold:=1e-3` is a double to rcl, text to PyYAML)."""
    raws = ["yes", "On", "y", "True", "off", "yEs", "1e-3", ".5", "1.", "-inf", ".inf", "nan", "0x10", "+5", "7",
            "010", "0x1p-1", "'3'", '"true"', "~", "null", "1_000", "2024-01-01", "cuda:1", "sit on",
            # words of hex digits (float.fromhex read "fp16" as 983040.0 and refused -p precision:=fp16)
            "fp16", "bf16", "bed", "a", "dead", "1p3", "0X1P-1", "-0x10", "08", "0b1", "0o7", "infinity", "NaN"]
    args = ["--ros-args"]
    for i, raw in enumerate(raws):
        args += ["-p", f"p{i}:={raw}"]
    node = rclpy.create_node("rule_types", context=context, cli_args=args)
    try:
        for i, raw in enumerate(raws):
            value = P._plain(node._parameter_overrides[f"p{i}"].value)
            assert same_value(rule_value(raw)[0], value), (raw, value)
    finally:
        node.destroy_node()
    params_file = str(Path(__file__).resolve().parents[1] / "config" / "perception.yaml")
    argv = ["perception_node", "--ros-args", "--params-file", params_file, "-p", "score_threshold:=1e-3",
            "-p", "output.masks:=off", "-p", "input.reliability:=reliable", "-p", "max_instances:=010",
            "-p", "checkpoint:=yEs", "-p", "mask_threshold:=0x1p-1", "-p", "precision:=bf16", "-p", "task:=bed"]
    node = rclpy.create_node("toist_perception", context=context, cli_args=argv[1:])
    try:
        settings = P.declare(node, argv)   # every rule applied (as rcl reads them): nothing refused
        assert settings["score_threshold"] == 1e-3 and settings["output.masks"] is False
        assert settings["max_instances"] == 8 and settings["mask_threshold"] == 0.5 and settings["checkpoint"] == "yEs"
        assert settings["precision"] == "bf16" and settings["task"] == "bed"
    finally:
        node.destroy_node()


def test_an_empty_list_on_the_command_line_is_said_to_need_an_entry(context):
    """rcl reads `-p input.topics:=[]` as no value: the refusal read "expected a list of strings,
    got None"."""
    node = rclpy.create_node("toist_perception", context=context,
                             cli_args=["--ros-args", "-p", "input.topics:=[]"])
    try:
        with pytest.raises(P.ParameterError, match=r"input.topics: needs at least one entry, got none"):
            P.declare(node)
    finally:
        node.destroy_node()
