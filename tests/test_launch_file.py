"""launch/perception.launch.py: it compiles, declares the contract's arguments, and turns them into
the node's parameters / remappings / ROS arguments correctly. Building the LaunchDescription
needs `launch` and `launch_ros`, which no package registry here provides."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / "launch" / "perception.launch.py"
CONTRACT_ARGUMENTS = {"namespace", "image_topic", "params_file", "checkpoint", "device", "task", "use_sim_time",
                      "log_level", "text_encoder", "allow_cpu_fallback", "precision", "compressed", "reliability",
                      "depth", "depth_topic", "camera_info_topic", "detections", "lifecycle", "autostart", "backend"}
P_YAML = str(ROOT / "config" / "perception.yaml")  # a params file that exists
DEFAULT_REMAPS = [("depth", "depth"), ("camera_info", "camera_info")]


def _load():
    spec = importlib.util.spec_from_file_location("perception_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_file_compiles_and_defines_generate_launch_description():
    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    compile(tree, str(LAUNCH_FILE), "exec")
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    # Top-level imports must be standard library only, so the module loads without `launch`.
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert all(n.split(".")[0] in sys.stdlib_module_names for n in names), names


def test_launch_file_declares_the_contract_arguments():
    launch = _load()
    assert {name for name, _, _ in launch.ARGUMENTS} == CONTRACT_ARGUMENTS
    assert (launch.PACKAGE, launch.EXECUTABLE) == ("toist_ros", "perception_node")


def test_defaults_keep_the_params_file_values():
    launch = _load()
    options = launch.node_options({"params_file": P_YAML})
    assert options["parameters"] == [P_YAML, {}]  # use_sim_time too: a params file's true is kept
    assert options["remappings"] == [("image", "image")] + DEFAULT_REMAPS
    assert options["namespace"] == ""
    assert options["arguments"] == ["--ros-args", "--log-level", "info"]
    assert (options["executable"], options["lifecycle"], options["autostart"]) == ("perception_node", False, False)


def test_lifecycle_starts_the_managed_executable_which_is_installed():
    launch = _load()
    managed = launch.node_options({"params_file": P_YAML, "lifecycle": "true"})
    assert (managed["executable"], managed["lifecycle"], managed["autostart"]) == (
        "perception_lifecycle_node", True, False)
    started = launch.node_options({"params_file": P_YAML, "lifecycle": "True", "autostart": "yes"})
    assert started["autostart"] and started["executable"] == "perception_lifecycle_node"
    # The same parameters, remappings and command line as the plain node.
    plain = launch.node_options({"params_file": P_YAML})
    assert launch.command_line(managed) == launch.command_line(plain)
    # Ignored and said for a plain node, not an error: a bringup that includes this file (nav2's
    # declares autostart:=true) hands its launch configurations to it, and the launch failed.
    included = launch.node_options({"params_file": P_YAML, "autostart": "true"})
    assert (included["executable"], included["autostart"]) == ("perception_node", False)
    assert [note for note in included["notes"] if "autostart:=true ignored" in note]
    assert plain["notes"] == [] and started["notes"] == []
    assert "scripts/perception_lifecycle_node" in (ROOT / "CMakeLists.txt").read_text()
    installed = ROOT / "install" / "toist_ros" / "lib" / "toist_ros" / "perception_lifecycle_node"
    if installed.parent.exists():
        assert installed.exists(), "run `make build`"


def test_arguments_become_typed_overrides_and_a_remap():
    launch = _load()
    options = launch.node_options({"namespace": "front", "image_topic": "/camera/color/image_raw",
                                   "params_file": P_YAML, "checkpoint": "/models/toist.pth", "device": "cuda:1",
                                   "task": "2", "use_sim_time": "True", "log_level": "DEBUG"})
    assert options["namespace"] == "front"
    assert options["parameters"][1] == {"use_sim_time": True, "checkpoint": "/models/toist.pth", "device": "cuda:1",
                                        "task": "2"}
    assert isinstance(options["parameters"][1]["task"], str)  # "2" stays text, not the integer 2
    assert options["remappings"] == [("image", "/camera/color/image_raw")] + DEFAULT_REMAPS
    assert options["arguments"][-1] == "debug"


def test_depth_arguments_enable_depth_and_remap_its_topics():
    launch = _load()
    options = launch.node_options({"params_file": P_YAML, "image_topic": "/camera/camera/color/image_raw",
                                   "depth": "true", "depth_topic": "/camera/camera/aligned_depth_to_color/image_raw",
                                   "camera_info_topic": "/camera/camera/color/camera_info"})
    assert options["parameters"][1] == {"depth.enabled": True}
    assert options["remappings"] == [("image", "/camera/camera/color/image_raw"),
                                     ("depth", "/camera/camera/aligned_depth_to_color/image_raw"),
                                     ("camera_info", "/camera/camera/color/camera_info")]
    with pytest.raises(ValueError, match="depth_topic is empty"):
        launch.node_options({"params_file": P_YAML, "depth_topic": ""})
    detections = launch.node_options({"params_file": P_YAML, "detections": "true"})
    assert detections["parameters"][1] == {"output.detections": True}
    # What `toist export --onnx` tells users to pass (it was no launch argument: refused as unknown).
    onnx = launch.node_options({"params_file": P_YAML, "backend": "onnxruntime"})
    assert onnx["parameters"][1] == {"backend": "onnxruntime"}


def test_a_namespace_with_a_trailing_slash_is_a_valid_one():
    launch = _load()
    for given, passed in (("front/", "front"), ("/front/", "/front"), ("/", ""), (" front ", "front")):
        assert launch.node_options({"params_file": P_YAML, "namespace": given})["namespace"] == passed


def test_depth_topics_without_depth_are_named(tmp_path):
    """depth_topic:= / camera_info_topic:= without depth:=true remapped topics nobody subscribes
    to, and nothing said so: 3D stayed off."""
    launch = _load()
    topics = {"depth_topic": "/cam/aligned_depth", "camera_info_topic": "/cam/info"}
    options = launch.node_options({"params_file": P_YAML, **topics})
    assert options["notes"] == ["depth_topic:=/cam/aligned_depth and camera_info_topic:=/cam/info have no effect: 3D is "
                                "off (add depth:=true, or depth.enabled: true in params_file)"]
    assert launch.node_options({"params_file": P_YAML, "depth": "true", **topics})["notes"] == []
    enabled = tmp_path / "depth_on.yaml"   # the user's own file enables 3D: nothing to say
    enabled.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"depth": {"enabled": True}}}}))
    assert launch.node_options({"params_file": str(enabled), **topics})["notes"] == []
    plain = tmp_path / "depth_y.yaml"   # `enabled: y`, which rcl reads as true (PyYAML as text)
    plain.write_text("/**:\n  ros__parameters:\n    depth:\n      enabled: y\n")
    assert launch.node_options({"params_file": str(plain), **topics})["notes"] == []
    # depth:=false wins over the file's true: 3D is off, and the topics have no effect.
    assert launch.node_options({"params_file": str(enabled), "depth": "false", **topics})["notes"] == [
        "depth_topic:=/cam/aligned_depth and camera_info_topic:=/cam/info have no effect: 3D is off (add "
        "depth:=true, or depth.enabled: true in params_file)"]
    assert launch.node_options({"params_file": P_YAML, "depth": "false", "depth_topic": "/cam/d"})["notes"] == [
        "depth_topic:=/cam/d has no effect: 3D is off (add depth:=true, or depth.enabled: true in params_file)"]


def test_every_start_up_parameter_users_set_has_an_argument_of_the_right_type():
    """The node's own FATAL message says `allow_cpu_fallback:=true`: as a launch argument it must arrive."""
    launch = _load()
    options = launch.node_options({"params_file": P_YAML, "text_encoder": "/models/roberta",
                                   "allow_cpu_fallback": "true", "precision": "fp16", "compressed": "True",
                                   "reliability": "reliable"})
    assert options["parameters"][1] == {"text_encoder": "/models/roberta",
                                        "allow_cpu_fallback": True, "precision": "fp16", "input.compressed": True,
                                        "input.reliability": "reliable"}
    from toist_ros.params import SPECS, check_values

    overrides = options["parameters"][1]
    assert set(overrides) <= set(SPECS) and check_values(overrides) == []
    assert all(isinstance(v, SPECS[k].kind) for k, v in overrides.items())


def test_a_start_up_failure_becomes_the_launch_error_with_code_and_reason():
    launch = _load()
    reason = launch.FatalReason()
    for line in ["[INFO] [toist_perception]: loading", "[FATAL] [1733.1] [toist_perception]: cannot start: device "
                 "'cuda' requested but no CUDA device is visible; use device:=cpu or device:=auto, or set "
                 "allow_cpu_fallback:=true"]:
        reason.feed(line + "\n")
    fatal = reason.text
    message = launch.exit_message(4, fatal)
    assert message.startswith("toist_perception exited with code 4 (the requested device cannot be used): device")
    assert "allow_cpu_fallback:=true" in message
    assert launch.exit_message(3, "") == "toist_perception exited with code 3 (the model cannot be loaded): see its log above"
    # A normal end, or the launch's own SIGINT at shut-down, is not an error.
    assert launch.exit_message(0, fatal) is None and launch.exit_message(-2, fatal) is None
    assert launch.exit_message(-15, fatal) is None and launch.exit_message(-9, fatal, shutting_down=True) is None
    # A crash is not a normal end: the launch used to carry on without its node.
    assert launch.exit_message(-11, "") == "toist_perception was killed by SIGSEGV (a crash): see its log above"
    assert "SIGKILL (out of memory?)" in launch.exit_message(-9, "")


def test_a_fatal_record_of_several_lines_in_colour_and_in_pieces():
    """As the node prints it under launch's emulate_tty: rcutils' colour codes around one record
    whose parameters are on indented lines, handed over in chunks cut anywhere; only the
    record's header used to reach the launch's error (and the colour codes with it)."""
    launch = _load()
    output = ("\x1b[32m[INFO] [1.0] [toist_perception]: loading\x1b[0m\r\n"
              "\x1b[31m[FATAL] [1.2] [toist_perception]: cannot start: invalid parameters:\r\n"
              "  input.reliability: 'BEST_EFFORT' is not one of auto, reliable, best_effort\r\n"
              "  score_threshold: 1.5 is out of range [0, 1]\x1b[0m\r\n"
              "[INFO] [1.3] [rclpy]: shutting down\r\n")
    for size in (1, 5, 64, len(output)):
        reason = launch.FatalReason()
        for start in range(0, len(output), size):
            reason.feed(output[start:start + size].encode(), "stderr")
        reason.feed("   stray stdout line\n", "stdout")   # another stream's lines are its own
        assert reason.text == ("invalid parameters: input.reliability: 'BEST_EFFORT' is not one of auto, reliable, "
                               "best_effort; score_threshold: 1.5 is out of range [0, 1]")
    last = launch.FatalReason()
    last.feed("[FATAL] [t] [n]: cannot start: no newline at the end")
    assert last.text == "no newline at the end"


@pytest.mark.parametrize("bad", [{"use_sim_time": "maybe"}, {"log_level": "loud"}, {"image_topic": " "},
                                 {"camera": "x"}, {"allow_cpu_fallback": "sure"}, {"compressed": "2"},
                                 {"depth": "maybe"}, {"lifecycle": "managed"}, {"autostart": "2"},
                                 {"params_file": "/nowhere/perception.yaml"}, {"params_file": "/tmp"}])
def test_bad_arguments_are_refused(bad):
    launch = _load()
    with pytest.raises(ValueError):
        launch.node_options({"params_file": P_YAML, **bad})


def test_node_parameters_given_as_launch_arguments_are_named_not_lost():
    """`ros2 launch ... score_threshold:=0.5` is taken without a word and reaches nothing."""
    launch = _load()
    notes = launch.stray_parameter_arguments({"score_threshold": "0.5", "output.masks": "false", "task": "2",
                                              "image_topic": "/cam", "robot_model": "x"})
    assert notes == [f"{name}:={value} does not reach the toist node: it is one of its parameters but no argument of "
                     "this launch file; if it was meant for the node, set it in the params file (params_file:=...)"
                     for name, value in (("output.masks", "false"), ("score_threshold", "0.5"))]


def test_command_line_matches_what_launch_ros_passes(tmp_path):
    launch = _load()
    options = launch.node_options({"namespace": "front", "image_topic": "/cam/image", "params_file": P_YAML,
                                   "task": "2", "use_sim_time": "false"})
    line = launch.command_line(options, tmp_path)
    [overrides] = list(tmp_path.iterdir())
    assert line == [
        "--ros-args", "-r", "__node:=toist_perception", "-r", "__ns:=/front", "--params-file", P_YAML,
        "--params-file", str(overrides), "-r", "image:=/cam/image", "-r", "depth:=depth",
        "-r", "camera_info:=camera_info", "--log-level", "info"]
    assert yaml.safe_load(overrides.read_text()) == {
        "/**/**/toist_perception": {"ros__parameters": {"use_sim_time": False, "task": "2"}}}
    assert launch.command_line(launch.node_options({"params_file": P_YAML}), tmp_path).count("--params-file") == 1


@pytest.mark.parametrize("namespace, key", [("", "/**"), ("", "/**/toist_perception"),
                                            ("front", "/front/toist_perception"), ("front", "/**/toist_perception")])
def test_command_line_values_are_read_by_rcl_as_the_text_given(tmp_path, namespace, key):
    """A task with an apostrophe made a `-p` rule rcl refused ("Couldn't parse parameter override
    rule"); launch_ros wrote a dict's text plain, which rcl read as numbers or bools (task:=08 the
    double 8.0, task:=y true, checkpoint:=inf infinity). The launch writes the overrides' params
    file itself, text quoted, under a key of its own (/**/**/toist_perception: a params_file's
    `task: 3` under /**, the node's name or /**/toist_perception is then replaced, not kept for its
    type; under /**/toist_perception, the launch's key until then, the node stopped, naming the
    launch's own file)."""
    import rclpy
    from rclpy.context import Context

    from toist_ros import params as P

    launch = _load()
    own = tmp_path / "own.yaml"   # keyed as the package's file, by the node's name or wildcard: replaced
    own.write_text(yaml.safe_dump({key: {"ros__parameters": {"task": 3, "score_threshold": 0.3}}}))
    for task, checkpoint, encoder in (("pour the baby's milk with", "say \"hi\".pth", "2"), ("08", "inf", "y"),
                                      ("1e3", "nan", "0x10"), ("5", "ü.pth", "on")):
        options = launch.node_options({"params_file": str(own), "namespace": namespace, "task": task,
                                       "checkpoint": checkpoint, "text_encoder": encoder, "device": "cuda:0",
                                       "compressed": "true"})
        argv = launch.command_line(options, tmp_path)
        context = Context()
        rclpy.init(context=context)
        try:
            node = rclpy.create_node(launch.NODE_NAME, namespace=namespace, context=context, cli_args=argv)
            settings = P.declare(node, ["perception_node", *argv])
            assert (settings["task"], settings["checkpoint"], settings["text_encoder"]) == (task, checkpoint, encoder)
            assert settings["device"] == "cuda:0"
            assert settings["input.compressed"] is True and settings["score_threshold"] == 0.3
            node.destroy_node()
        finally:
            rclpy.shutdown(context=context)


def test_launch_file_and_config_are_installed_with_the_package():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "install(DIRECTORY launch config" in cmake
    installed = ROOT / "install" / "toist_ros" / "share" / "toist_ros"
    if not installed.exists():
        pytest.skip("the colcon install is made by `make build` (part of `make test`)")
    assert (installed / "launch" / "perception.launch.py").exists()
    assert (installed / "config" / "perception.yaml").exists()


def test_generate_launch_description_builds_one_node():
    pytest.importorskip("launch_ros", reason="`launch` / `launch_ros` are not on any package registry reachable "
                                            "here (ROS 2 Kilted PyPI wheels lack them); checked on a ROS install")
    launch = _load()
    description = launch.generate_launch_description()
    names = [a.name for a in description.entities if type(a).__name__ == "DeclareLaunchArgument"]
    assert set(names) == CONTRACT_ARGUMENTS


def test_show_args_on_a_ros_install():
    """`ros2 launch toist_ros perception.launch.py --show-args` on a machine with ros2cli."""
    try:
        result = subprocess.run(["ros2", "launch", "toist_ros", "perception.launch.py", "--show-args"],
                                capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("`ros2 launch` (ros2cli + launch) is not installable here: no registry provides it")
    assert result.returncode == 0, result.stderr
    for name in CONTRACT_ARGUMENTS:
        assert f"'{name}'" in result.stdout


def test_a_character_cut_between_two_chunks_is_read_whole():
    """Each chunk was decoded alone: a path such as /home/josé/... cut inside its é read as two
    replacement characters."""
    launch = _load()
    output = "[FATAL] [1.2] [toist_perception]: cannot start: /home/josé/models: not found\n".encode()
    cut = output.index("é".encode()) + 1   # inside the character's two bytes
    reason = launch.FatalReason()
    reason.feed(output[:cut], "stderr")
    reason.feed(output[cut:], "stderr")
    assert reason.text == "/home/josé/models: not found"
