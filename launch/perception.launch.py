"""Start the toist perception node.

    ros2 launch toist_ros perception.launch.py image_topic:=/camera/color/image_raw task:=2

Arguments (``ros2 launch toist_ros perception.launch.py --show-args``):
  namespace           namespace of the node and its topics ("" = none); one per camera
  image_topic         the camera's sensor_msgs/Image topic; the node's `image` is remapped to it
  params_file         parameters file (default: the package's config/perception.yaml)
  checkpoint          TOIST .pth file or model directory
  text_encoder        tokenizer / text encoder name or local directory
  device              auto | cpu | cuda | cuda:N
  allow_cpu_fallback  true | false: run on the CPU when the CUDA device is missing
  precision           fp32 | fp16 | bf16
  backend             torch | onnxruntime | tensorrt (a model directory's ONNX graphs)
  task                task at start: "2", "sit comfortably on", free text
  compressed          true | false: subscribe <image_topic>/compressed
  reliability         auto | reliable | best_effort (image subscription)
  depth               true | false: 3D instances from a registered depth image (depth.enabled)
  depth_topic         the registered depth image topic; the node's `depth` is remapped to it
  camera_info_topic   the colour camera's CameraInfo topic; the node's `camera_info` is remapped to it
  detections          true | false: also vision_msgs/Detection2DArray on `detections` (output.detections)
  use_sim_time        true | false (use /clock)
  log_level           debug | info | warn | error | fatal
  lifecycle           true | false: a lifecycle (managed) node, unconfigured until a manager
                      configures and activates it (perception_lifecycle_node)
  autostart           true | false: with lifecycle:=true, configure and activate it at launch
                      (later transitions stay with `ros2 lifecycle set` or a manager); ignored,
                      and said, for a plain node
An empty value keeps the params file's value of that parameter.

When the node cannot start (exit 2: a parameter, 3: the model, 4: the device), the launch stops
and ends with an error that names the node's exit code and its FATAL reason, instead of going on
without it (a node that is not running publishes nothing, which is easy to miss on a robot).

Several cameras: include this file once per camera with its own `namespace` and
`image_topic`, or list the cameras in the `input.topics` parameter of one node (one model
shared by all cameras); `image_topic` remaps only `image`, so remap those topics with a
`GroupAction` of `SetRemap`s around the include (docs/ros.md, "Several cameras").

The file imports `launch` / `launch_ros` only inside ``generate_launch_description``, so
``node_options`` (what the node is given) can be checked where they are not installed.
"""

import os
import re

PACKAGE = "toist_ros"
EXECUTABLE = "perception_node"
LIFECYCLE_EXECUTABLE = "perception_lifecycle_node"
NODE_NAME = "toist_perception"

# (name, default, description); "<share>" is replaced by the package's share directory.
ARGUMENTS = (
    ("namespace", "", "namespace of the node and its topics (one per camera)"),
    ("image_topic", "image", "camera image topic (sensor_msgs/Image) the node's `image` is remapped to"),
    ("params_file", os.path.join("<share>", "config", "perception.yaml"), "parameters file"),
    ("checkpoint", "", "TOIST .pth or model directory; empty = the params file's value"),
    ("text_encoder", "", "tokenizer / text encoder name or local directory; empty = the params file's value"),
    ("device", "", "auto | cpu | cuda | cuda:N; empty = the params file's value"),
    ("allow_cpu_fallback", "", "true | false: run on the CPU when the CUDA device is missing; "
                               "empty = the params file's value"),
    ("precision", "", "fp32 | fp16 | bf16; empty = the params file's value"),
    ("backend", "", "torch | onnxruntime | tensorrt (a model directory's ONNX graphs, from `toist export --onnx`); "
                    "empty = the params file's value"),
    ("task", "", "task at start (id, name or free text); empty = the params file's value"),
    ("compressed", "", "true | false: subscribe <image_topic>/compressed; empty = the params file's value"),
    ("reliability", "", "auto | reliable | best_effort image subscription; empty = the params file's value"),
    ("depth", "", "true | false: 3D instances from a registered depth image (depth.enabled); "
                  "empty = the params file's value"),
    ("depth_topic", "depth", "registered depth image topic (16UC1 mm or 32FC1 m) the node's `depth` is remapped to"),
    ("camera_info_topic", "camera_info", "the colour camera's CameraInfo topic the node's `camera_info` is "
                                         "remapped to"),
    ("detections", "", "true | false: also publish vision_msgs/Detection2DArray on `detections` (output.detections; "
                       "needs vision_msgs); empty = the params file's value"),
    ("use_sim_time", "", "true | false: use /clock (true for bag playback and simulators); empty = the params "
                         "file's value (ROS's default: false)"),
    ("log_level", "info", "debug | info | warn | error | fatal"),
    ("lifecycle", "false", "true | false: start a lifecycle (managed) node, unconfigured until a lifecycle manager "
                           "configures and activates it"),
    ("autostart", "false", "true | false: with lifecycle:=true, configure and activate the node at launch"),
)
# Launch argument -> node parameter and its type, for the arguments that override one parameter.
PARAMETER_ARGUMENTS = {
    "checkpoint": ("checkpoint", str), "text_encoder": ("text_encoder", str), "device": ("device", str),
    "allow_cpu_fallback": ("allow_cpu_fallback", bool), "precision": ("precision", str), "task": ("task", str),
    "backend": ("backend", str),
    "compressed": ("input.compressed", bool), "reliability": ("input.reliability", str),
    "depth": ("depth.enabled", bool), "detections": ("output.detections", bool),
}
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
# The node's start-up exit codes (toist_ros.model_loader) and what they mean.
EXIT_REASONS = {2: "invalid parameter", 3: "the model cannot be loaded", 4: "the requested device cannot be used"}
FATAL_MARK = "cannot start:"     # what the node's FATAL start-up line contains


def _flag(name, text):
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{name} must be true or false, got {text!r}")
    return value in _TRUE


def _file_enables_depth(path):
    """Whether the params file sets ``depth.enabled: true`` under any node key (the launch does
    not match keys against the node: this only decides whether a note is worth saying)."""
    import yaml

    try:
        with open(path, "rb") as handle:
            data = yaml.safe_load(handle)
    except (OSError, ValueError, yaml.YAMLError):
        return False

    def true(value):   # as rcl reads a plain scalar: YAML 1.1's y, yes, on too
        if isinstance(value, str):
            try:
                from toist_ros.param_sources import rule_value
            except Exception:  # noqa: BLE001 - a note is not worth failing the launch for
                return False
            value = (rule_value(value) or (None,))[0]
        return value is True

    def enables(entries):
        if not isinstance(entries, dict):
            return False
        parameters = entries.get("ros__parameters")
        if isinstance(parameters, dict):
            depth = parameters.get("depth")
            if true(parameters.get("depth.enabled")) or (isinstance(depth, dict) and true(depth.get("enabled"))):
                return True
        return any(enables(entry) for key, entry in entries.items() if key != "ros__parameters")

    return enables(data)


def node_options(args):
    """What the node is started with, from the launch arguments (a dict of strings).

    Returns a dict with ``executable``, ``lifecycle`` and ``autostart`` (booleans), ``notes``
    (what the launch says before starting the node),
    ``namespace``, ``parameters`` (the params file, then a dict of typed overrides: strings stay
    strings, so ``task:=2`` is the text "2", not the integer 2), ``remappings`` and
    ``arguments`` (``--ros-args --log-level ...``).
    """
    unknown = set(args) - {name for name, _, _ in ARGUMENTS}
    if unknown:
        raise ValueError(f"unknown launch arguments: {sorted(unknown)}")
    args = {name: str(args.get(name, default)) for name, default, _ in ARGUMENTS}
    level = args["log_level"].strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {args['log_level']!r}")
    params_file = args["params_file"].strip()
    if not os.path.isfile(params_file):  # launch_ros would log it and start the node without its parameters
        raise ValueError(f"params_file {params_file!r}: no such file"
                         + (" (a folder)" if os.path.isdir(params_file) else ""))
    for topic in ("image_topic", "depth_topic", "camera_info_topic"):
        if not args[topic].strip():
            raise ValueError(f"{topic} is empty")
    lifecycle, autostart = _flag("lifecycle", args["lifecycle"]), _flag("autostart", args["autostart"])
    notes = []
    if autostart and not lifecycle:
        # Not an error: an included launch file reads the including one's launch configurations,
        # and robot bringups (nav2's) declare autostart:=true for their own lifecycle nodes.
        notes.append("autostart:=true ignored: it is for a lifecycle node (lifecycle:=true); this plain node "
                     "starts by itself (an including launch file's autostart reaches this one too)")
        autostart = False
    overrides = {}
    if args["use_sim_time"].strip():
        overrides["use_sim_time"] = _flag("use_sim_time", args["use_sim_time"])
    for name, (parameter, kind) in PARAMETER_ARGUMENTS.items():
        text = args[name].strip()
        if text:
            overrides[parameter] = _flag(name, text) if kind is bool else text
    depth_topics = [f"{name}:={args[name].strip()}" for name, default, _ in ARGUMENTS
                    if name in ("depth_topic", "camera_info_topic") and args[name].strip() != default]
    depth_on = overrides["depth.enabled"] if "depth.enabled" in overrides else _file_enables_depth(params_file)
    if depth_topics and not depth_on:
        notes.append(f"{' and '.join(depth_topics)} {'has' if len(depth_topics) == 1 else 'have'} no effect: 3D is off (add depth:=true, or depth.enabled: true "
                     "in params_file)")
    return {
        "executable": LIFECYCLE_EXECUTABLE if lifecycle else EXECUTABLE,
        "lifecycle": lifecycle,
        "autostart": autostart,
        # A trailing slash ("front/") is no valid ROS namespace: launch_ros passed it on and rcl
        # refused it; a leading one keeps its meaning (absolute: no namespace an include pushes).
        "namespace": args["namespace"].strip().rstrip("/"),
        "parameters": [params_file, overrides],
        "remappings": [("image", args["image_topic"].strip()), ("depth", args["depth_topic"].strip()),
                       ("camera_info", args["camera_info_topic"].strip())],
        "arguments": ["--ros-args", "--log-level", level],
        "notes": notes,
    }


def stray_parameter_arguments(configurations):
    """A note for each launch configuration named as a node parameter that is no argument of this
    file (``score_threshold:=0.5``, ``output.masks:=false``): ``ros2 launch`` takes any
    ``name:=value`` without a word, and the node never sees it. (An including launch's own
    arguments are here too, hence "if it was meant for this node".)"""
    try:
        from toist_ros.params import SPECS
    except Exception:  # noqa: BLE001 - a note is not worth failing the launch for (the node reports)
        return []
    declared = {name for name, _, _ in ARGUMENTS}
    return [f"{name}:={value} does not reach the toist node: it is one of its parameters but no argument of this "
            f"launch file; if it was meant for the node, set it in the params file (params_file:=...)"
            for name, value in sorted(configurations.items()) if name in SPECS and name not in declared]


def overrides_file(options, directory=None):
    """The launch arguments' parameter overrides (``node_options``' dict) as a params file for
    the node (``/**/**/toist_perception``), every text double-quoted; its path.

    launch_ros writes a dict's strings plain, and rcl reads a plain ``08`` as the double 8.0,
    ``y`` as true, ``inf`` as infinity: ``task:=08`` or ``checkpoint:=inf`` then reached the node
    as numbers. The key must be one no params file uses: under one key rcl keeps an earlier value
    of a higher-ranked type (a ``params_file``'s ``task: 3`` over ``task:=bed``: the node stopped,
    naming this file), while keys apply in the order each first appears, so a key of its own,
    first seen after ``params_file``'s, wins, as launch arguments should. ``/**/toist_perception``
    was that key until a params file keyed the same way met it; ``/**/**/toist_perception``
    matches the same nodes (``**``: any number of namespace tokens, twice) and nobody writes it.
    ``/**/`` matches the node in whatever namespace an including launch pushes
    (``PushRosNamespace``), which ``namespace`` alone does not say."""
    import tempfile

    import yaml

    class QuotedText(yaml.SafeDumper):
        pass

    QuotedText.add_representer(str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text,
                                                                                 style='"'))
    _, overrides = options["parameters"]
    key = f"/**/**/{NODE_NAME}"
    handle, path = tempfile.mkstemp(prefix="toist_launch_", suffix=".yaml", dir=directory)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        yaml.dump({key: {"ros__parameters": overrides}}, out, Dumper=QuotedText, allow_unicode=True)
    return path


def command_line(options, directory=None):
    """The node's ``--ros-args`` as the launch starts it (``directory``: where the overrides'
    params file goes; default the system's temporary folder, as launch_ros's own)."""
    params_file, overrides = options["parameters"]
    out = ["--ros-args", "-r", f"__node:={NODE_NAME}"]
    if options["namespace"]:
        out += ["-r", f"__ns:=/{options['namespace'].strip('/')}"]
    out += ["--params-file", params_file]
    if overrides:
        out += ["--params-file", overrides_file(options, directory)]
    for source, target in options["remappings"]:
        out += ["-r", f"{source}:={target}"]
    return out + options["arguments"][1:]


# Signals that end the node normally: the launch's own SIGINT / SIGTERM at shut-down (the node's
# own handling ends it with 0; these codes are a process the signal killed outright).
_STOP_SIGNALS = (2, 15)


_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # rcutils colours its output on a terminal (emulate_tty)


class FatalReason:
    """The node's FATAL start-up reason, read from its output as launch hands it over: chunks
    of either stream, cut anywhere. One log record may span lines (``invalid parameters:`` then
    one indented line per parameter): the indented lines right after the FATAL line belong to it.
    Only the last reason is kept, so a node that logs for hours keeps nothing here."""

    def __init__(self):
        self._partial = {}    # stream -> the end of its last chunk, not yet a whole line
        self._open = {}       # stream -> whether its last whole line belonged to a FATAL record
        self._decoders = {}   # stream -> UTF-8 decoder (a character may be cut between two chunks)
        self._record = []

    def feed(self, chunk, stream="stderr"):
        if isinstance(chunk, bytes):
            import codecs

            decoder = self._decoders.setdefault(stream, codecs.getincrementaldecoder("utf-8")(errors="replace"))
            chunk = decoder.decode(chunk)
        text = self._partial.pop(stream, "") + str(chunk)
        lines = text.split("\n")
        self._partial[stream] = lines.pop()
        for line in lines:
            self._line(line, stream)

    def _line(self, line, stream):
        line = _COLOUR.sub("", line).rstrip("\r")
        if FATAL_MARK in line:
            self._record = [line.split(FATAL_MARK, 1)[1].strip()]
            self._open[stream] = True
        elif self._open.get(stream) and line[:1] in (" ", "\t") and line.strip():
            self._record.append(line.strip())
        else:
            self._open[stream] = False

    @property
    def text(self):
        """The reason, its lines joined by ``; `` ("" when the node gave none)."""
        for stream, rest in list(self._partial.items()):  # a last line without its newline
            if rest:
                self._partial[stream] = ""
                self._line(rest, stream)
        head, *details = self._record or [""]
        return " ".join([head] + ["; ".join(details)]) if details else head


def exit_message(returncode, fatal="", shutting_down=False):
    """The launch's error when the node ended with ``returncode``, ``fatal`` being its FATAL
    reason (:class:`FatalReason`'s text). None when it ended normally: 0, SIGINT / SIGTERM, or
    anything while the launch itself is ``shutting_down`` (which ends with SIGKILL what does
    not stop in time). A crash (SIGSEGV, SIGABRT, the out-of-memory
    killer's SIGKILL) is an error: the launch must not go on without its node."""
    if returncode in (0, None) or shutting_down or (returncode < 0 and -returncode in _STOP_SIGNALS):
        return None
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return (f"{NODE_NAME} was killed by {name}" + (" (out of memory?)" if -returncode == 9 else " (a crash)")
                + ": see its log above")
    reason = EXIT_REASONS.get(returncode, "unexpected exit")
    return (f"{NODE_NAME} exited with code {returncode} ({reason})" + (f": {fatal}" if fatal else
                                                                        ": see its log above"))


def generate_launch_description():
    from ament_index_python.packages import get_package_share_directory
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    share = get_package_share_directory(PACKAGE)
    declared = [DeclareLaunchArgument(name, default_value=default.replace("<share>", share), description=text)
                for name, default, text in ARGUMENTS]
    return LaunchDescription(declared + [OpaqueFunction(function=_node_action)])


def _node_action(context, *args, **kwargs):
    from launch.actions import LogInfo, RegisterEventHandler
    from launch.event_handlers import OnProcessExit, OnProcessIO
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import LifecycleNode, Node

    values = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    options = node_options(values)
    params_file, overrides = options["parameters"]
    # A params file of our own, not a dict: launch_ros would write "2" or "08" plain, read as numbers.
    node = (LifecycleNode if options["lifecycle"] else Node)(
        package=PACKAGE,
        executable=options["executable"],
        name=NODE_NAME,
        namespace=options["namespace"],
        parameters=[params_file] + ([overrides_file(options)] if overrides else []),
        remappings=options["remappings"],
        arguments=options["arguments"],
        output="screen",
        emulate_tty=True,
    )
    fatal = FatalReason()

    def on_exit(event, context):
        message = exit_message(event.returncode, fatal.text, shutting_down=bool(getattr(context, "is_shutdown", False)))
        if message:
            # An exception ends `ros2 launch` with exit status 1 and this message as its error.
            raise RuntimeError(message)

    notes = [LogInfo(msg=note) for note in options["notes"] + stray_parameter_arguments(context.launch_configurations)]
    return notes + [node,
                    RegisterEventHandler(OnProcessIO(target_action=node,
                                                     on_stdout=lambda event: fatal.feed(event.text, "stdout"),
                                                     on_stderr=lambda event: fatal.feed(event.text, "stderr"))),
                    RegisterEventHandler(OnProcessExit(target_action=node, on_exit=on_exit))] + (
        _autostart(node) if options["autostart"] else [])


def _autostart(node):
    """Configure the lifecycle node once it is up, and activate it when that configure has ended
    (only that one: a later deactivate also ends in *inactive*, and must stay there)."""
    from launch.actions import EmitEvent, RegisterEventHandler
    from launch.events import matches_action
    from launch_ros.event_handlers import OnStateTransition
    from launch_ros.events.lifecycle import ChangeState
    from lifecycle_msgs.msg import Transition

    def change(transition_id):
        return EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node), transition_id=transition_id))

    activate = RegisterEventHandler(OnStateTransition(target_lifecycle_node=node, start_state="configuring",
                                                      goal_state="inactive",
                                                      entities=[change(Transition.TRANSITION_ACTIVATE)]))
    return [activate, change(Transition.TRANSITION_CONFIGURE)]
