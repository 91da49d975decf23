"""Start the toist perception node.

    ros2 launch toist_ros perception.launch.py image_topic:=/camera/color/image_raw task:=2

Arguments (``ros2 launch toist_ros perception.launch.py --show-args``):
  namespace     namespace of the node and its topics ("" = none); one per camera
  image_topic   the camera's sensor_msgs/Image topic; the node's `image` is remapped to it
  params_file   parameters file (default: the package's config/perception.yaml)
  checkpoint    TOIST .pth file or model directory ("" = keep the params file's value)
  device        auto | cpu | cuda | cuda:N ("" = keep the params file's value)
  task          task at start: "2", "sit comfortably on", free text ("" = keep the params file's)
  use_sim_time  true | false
  log_level     debug | info | warn | error | fatal

Several cameras: include this file once per camera with its own `namespace` and
`image_topic`, or list the cameras in the `input.topics` parameter of one node (one model
shared by all cameras; see docs/ros.md).

The file imports `launch` / `launch_ros` only inside ``generate_launch_description``, so
``node_options`` (what the node is given) can be checked where they are not installed.
"""

import os

PACKAGE = "toist_ros"
EXECUTABLE = "perception_node"
NODE_NAME = "toist_perception"

# (name, default, description); "<share>" is replaced by the package's share directory.
ARGUMENTS = (
    ("namespace", "", "namespace of the node and its topics (one per camera)"),
    ("image_topic", "image", "camera image topic (sensor_msgs/Image) the node's `image` is remapped to"),
    ("params_file", os.path.join("<share>", "config", "perception.yaml"), "parameters file"),
    ("checkpoint", "", "TOIST .pth or model directory; empty = the params file's value"),
    ("device", "", "auto | cpu | cuda | cuda:N; empty = the params file's value"),
    ("task", "", "task at start (id, name or free text); empty = the params file's value"),
    ("use_sim_time", "false", "use /clock (true for bag playback and simulators)"),
    ("log_level", "info", "debug | info | warn | error | fatal"),
)
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def node_options(args):
    """What the node is started with, from the launch arguments (a dict of strings).

    Returns a dict with ``namespace``, ``parameters`` (the params file, then a dict of typed
    overrides: strings stay strings, so ``task:=2`` is the text "2", not the integer 2),
    ``remappings`` and ``arguments`` (``--ros-args --log-level ...``).
    """
    unknown = set(args) - {name for name, _, _ in ARGUMENTS}
    if unknown:
        raise ValueError(f"unknown launch arguments: {sorted(unknown)}")
    args = {name: str(args.get(name, default)) for name, default, _ in ARGUMENTS}
    sim_time = args["use_sim_time"].strip().lower()
    if sim_time not in _TRUE + _FALSE:
        raise ValueError(f"use_sim_time must be true or false, got {args['use_sim_time']!r}")
    level = args["log_level"].strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {args['log_level']!r}")
    if not args["image_topic"].strip():
        raise ValueError("image_topic is empty")
    overrides = {"use_sim_time": sim_time in _TRUE}
    for name in ("checkpoint", "device", "task"):
        if args[name].strip():
            overrides[name] = args[name].strip()
    return {
        "namespace": args["namespace"].strip(),
        "parameters": [args["params_file"], overrides],
        "remappings": [("image", args["image_topic"].strip())],
        "arguments": ["--ros-args", "--log-level", level],
    }


def command_line(options):
    """The node's ``--ros-args`` equivalent of ``node_options`` (what launch_ros hands the process)."""
    params_file, overrides = options["parameters"]
    out = ["--ros-args", "-r", f"__node:={NODE_NAME}"]
    if options["namespace"]:
        out += ["-r", f"__ns:=/{options['namespace'].strip('/')}"]
    out += ["--params-file", params_file]
    for name, value in overrides.items():
        text = str(value).lower() if isinstance(value, bool) else f"'{value}'"  # quoted: a YAML string
        out += ["-p", f"{name}:={text}"]
    for source, target in options["remappings"]:
        out += ["-r", f"{source}:={target}"]
    return out + options["arguments"][1:]


def generate_launch_description():
    from ament_index_python.packages import get_package_share_directory
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    share = get_package_share_directory(PACKAGE)
    declared = [DeclareLaunchArgument(name, default_value=default.replace("<share>", share), description=text)
                for name, default, text in ARGUMENTS]
    return LaunchDescription(declared + [OpaqueFunction(function=_node_action)])


def _node_action(context, *args, **kwargs):
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node
    from launch_ros.parameter_descriptions import ParameterValue

    values = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    options = node_options(values)
    params_file, overrides = options["parameters"]
    # ParameterValue with an explicit type: launch_ros would otherwise YAML-parse "2" into an int.
    typed = {name: ParameterValue(value, value_type=str) if isinstance(value, str) else value
             for name, value in overrides.items()}
    return [Node(
        package=PACKAGE,
        executable=EXECUTABLE,
        name=NODE_NAME,
        namespace=options["namespace"],
        parameters=[params_file, typed],
        remappings=options["remappings"],
        arguments=options["arguments"],
        output="screen",
        emulate_tty=True,
    )]
