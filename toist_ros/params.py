"""The node's parameters: one table of specs -> ROS descriptors, start-up checks, run-time checks.

``PARAMETERS`` is the single source of truth: ``config/perception.yaml``, the declared
descriptors (ranges, read-only flags, descriptions shown by ``ros2 param describe``) and the
validation all come from it. ``check_value`` is plain Python (unit-tested without ROS);
ROS enforces the closed ranges and read-only flags itself, ``check_value`` adds what a
descriptor cannot say (open intervals, choices, the device pattern).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from toist_ros.frame_limits import MIN_MODEL_SIDE
from toist_ros.param_sources import resolve as resolve_command_line

Scalar = Union[bool, int, float, str]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    read_only: bool = False          # fixed at start-up (ROS rejects run-time changes)
    low: Optional[float] = None      # inclusive bounds unless open_low / open_high
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    pattern: Optional[str] = None    # regular expression a string must match in full
    pattern_help: str = ""
    number_as_text: bool = False     # accept 2 for "2" (``-p task:=2`` arrives as an integer)

    @property
    def kind(self) -> type:
        if isinstance(self.default, list):
            return list
        return type(self.default)


_DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
_TOPIC_PATTERN = r"/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*"

PARAMETERS: tuple[ParamSpec, ...] = (
    # Model (fixed at start-up).
    ParamSpec("checkpoint", "", "official TOIST .pth file or model directory; empty = the embedded default "
              "model (trained on synthetic scenes only: its tasks 1, 2, 3, 5; meaningless on real photos)", read_only=True),
    ParamSpec("text_encoder", "", "tokenizer / text encoder name or local directory, used instead of the "
              "checkpoint's; empty = the checkpoint's own (model directories, toist .pth), roberta-base for an "
              "official .pth (local cache first)", read_only=True),
    ParamSpec("device", "auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N", read_only=True,
              pattern=_DEVICE_PATTERN, pattern_help="auto, cpu, cuda or cuda:N"),
    ParamSpec("allow_cpu_fallback", False, "when device is cuda/cuda:N and CUDA is absent: run on CPU (true) "
              "or stop with an error (false)", read_only=True),
    ParamSpec("precision", "fp32", "model precision: fp32, fp16 (CUDA only; fp32 on CPU) or bf16 (autocast)",
              read_only=True, choices=("fp32", "fp16", "bf16")),
    ParamSpec("backend", "torch", "what runs the network: torch, onnxruntime (the model directory's ONNX graphs, "
              "made by `toist export --onnx <dir>`; fp32) or tensorrt (onnxruntime-gpu's TensorRT provider, fp16, "
              "NVIDIA GPU)", read_only=True, choices=("torch", "onnxruntime", "tensorrt")),
    ParamSpec("ccr", True, "cluster-centre replacement: a distilled model's memory bank stands in for the "
              "pronoun, as the paper's inference does; false runs the network without it (for official files "
              "trained with CCR off, Table 3 rows 2-4); models without a bank ignore it", read_only=True),
    ParamSpec("input.short_side", 0, "the model's input short side in pixels; 0 = the size the model was "
              "trained at (a model directory records it; official checkpoints: the reference's 800)",
              read_only=True, low=0, high=2048),
    ParamSpec("input.max_side", 0, "the model's input long-side cap in pixels; 0 = the model's own "
              "(official checkpoints: the reference's 1333)", read_only=True, low=0, high=4096),
    ParamSpec("warmup", True, "run one forward pass on a blank image (and, with depth.enabled, load or compile the "
              "3D step's kernel: ~10 s the first time on a machine) before reporting ready", read_only=True),
    # Input.
    ParamSpec("input.topics", ["image"], "input image topics (remappable names); outputs of 'cam/image' go to "
              "'cam/instances' and 'cam/debug_image', of 'image' to 'instances' and 'debug_image'",
              read_only=True, pattern=_TOPIC_PATTERN, pattern_help="relative topic names such as image or front/image"),
    ParamSpec("input.compressed", False, "subscribe <topic>/compressed (sensor_msgs/CompressedImage) "
              "instead of the raw image", read_only=True),
    ParamSpec("input.reliability", "auto", "image subscription reliability: auto (match the publishers on the "
              "topic, at start and whenever one appears: reliable when every publisher is reliable, else best "
              "effort), reliable, or best_effort (sensor-data QoS); depth 1 in every case", read_only=True,
              choices=("auto", "reliable", "best_effort")),
    ParamSpec("input.max_pixels", 16_777_216, "largest image accepted, in pixels (width x height; compressed "
              "images are checked from their header before decoding, and Pillow refuses them past 178,956,970 "
              "whatever this says); larger frames are rejected and counted",
              read_only=True, low=1, high=1 << 30),
    ParamSpec("input.max_age_s", 1.0, "skip frames whose header.stamp is older than this (seconds); 0 = never skip",
              low=0.0, high=3600.0),
    ParamSpec("input.no_image_warning_s", 5.0, "warn once when no image arrived this long after start (s)",
              read_only=True, low=0.5, high=3600.0),
    # Task and post-processing (changeable at run time).
    ParamSpec("task", "2", "the task at start: a COCO-Tasks id ('2'), a task name ('sit comfortably on') "
              "or free text; change it at run time with the set_task service or the task topic", read_only=True,
              number_as_text=True, pattern=r"(?s).*\S.*", pattern_help="a task id, a task name or free text, not blank"),
    ParamSpec("score_threshold", 0.5, "keep instances with score >= this", low=0.0, high=1.0),
    ParamSpec("mask_threshold", 0.5, "mask probability above which a pixel belongs to the object",
              low=0.0, high=1.0, open_low=True, open_high=True),
    ParamSpec("max_instances", 10, "publish at most this many instances per frame (best first)", low=1, high=100),
    ParamSpec("duplicate_iou", 0.7, "one object found twice: drop an instance whose mask (box, when masks are not "
              "computed) overlaps a better-scoring one by more than this IoU; 0 keeps every instance", low=0.0, high=1.0),
    # Depth (3D instances).
    ParamSpec("depth.enabled", False, "read a depth image registered to each colour camera and its CameraInfo, and "
              "give each instance a 3D centroid, extent and surface point (Instance.has_3d) and RViz markers",
              read_only=True),
    ParamSpec("depth.topics", ["depth"], "depth image topics (16UC1 mm or 32FC1 m, registered to the colour image; "
              "RealSense: /camera/camera/aligned_depth_to_color/image_raw), one per input.topics entry",
              read_only=True, pattern=_TOPIC_PATTERN, pattern_help="relative topic names such as depth or front/depth"),
    ParamSpec("depth.camera_info_topics", ["camera_info"], "the colour cameras' sensor_msgs/CameraInfo topics, one per "
              "input.topics entry", read_only=True, pattern=_TOPIC_PATTERN,
              pattern_help="relative topic names such as camera_info or front/camera_info"),
    ParamSpec("depth.max_dt_s", 0.02, "pair a colour frame with the depth image whose header.stamp is within this "
              "many seconds (registered RGB-D drivers stamp both alike); else 3D is invalid for that frame",
              low=0.0, high=1.0),
    ParamSpec("depth.wait_s", 0.02, "after inference, wait at most this long for a depth image that could still "
              "pair with the frame (s)", low=0.0, high=1.0),
    ParamSpec("depth.buffer_mb", 256, "depth images kept per camera for pairing, at most this many MiB (and 64 "
              "images, those of the last 1.5 s; the 8 newest whatever their size); raise it when a slow model meets "
              "large depth images (depth_evicted)",
              read_only=True, low=8, high=65536),
    ParamSpec("depth.same_frame", True, "refuse a depth image or CameraInfo whose header.frame_id is not the colour "
              "image's (the raw depth stream or the depth camera's CameraInfo: 3D positions centimetres off); false "
              "for a driver that labels registered depth with its own frame"),
    ParamSpec("depth.min_m", 0.1, "depths below this are no measurement (m)", low=0.0, high=100.0),
    ParamSpec("depth.max_m", 10.0, "depths above this are no measurement (m)", low=0.0, high=1000.0, open_low=True),
    # Output.
    ParamSpec("output.masks", True, "publish mask crops (false: boxes and scores only, smaller messages)"),
    ParamSpec("output.debug_image", True, "publish the debug_image overlay while someone subscribes to it"),
    ParamSpec("output.markers", True, "with depth: publish visualization_msgs/MarkerArray on markers while someone "
              "subscribes (a box and a label per instance with 3D)"),
    ParamSpec("output.detections", False, "also publish vision_msgs/Detection2DArray on detections (boxes, scores, "
              "the task as class_id; needs ros-<distro>-vision-msgs)", read_only=True),
    ParamSpec("diagnostics.period_s", 1.0, "period of /diagnostics messages (s)", read_only=True, low=0.1, high=60.0),
)

SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMETERS}


class ParameterError(ValueError):
    """One or more parameter values are invalid; the text lists each name, value and reason."""


def _as_taken(spec: ParamSpec, value: Any) -> Any:
    """``value`` as the parameter takes it: a whole number for a double parameter is that double
    (``-p score_threshold:=1``), one for a ``number_as_text`` parameter its text (``task:=2``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if spec.kind is float:
            return float(value)
        if spec.number_as_text:
            return str(value)
    return value


def check_value(spec: ParamSpec, value: Any) -> Optional[str]:
    """Why ``value`` is not acceptable for ``spec`` (None when it is)."""
    kind = spec.kind
    value = _as_taken(spec, value)
    if kind is list:
        if value is None:   # rcl reads `-p input.topics:=[]` as no value at all
            return f"{spec.name}: needs at least one entry, got none"
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return f"{spec.name}: expected a list of strings, got {value!r}"
        if not value:
            return f"{spec.name}: needs at least one entry"
        if len(set(value)) != len(value):
            return f"{spec.name}: entries must be distinct, got {list(value)!r}"
        for item in value:
            reason = _check_string(spec, item)
            if reason:
                return reason
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        return f"{spec.name}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
    if kind in (int, float):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{spec.name}: {value!r} is not a finite number"
        if spec.low is not None and (value < spec.low or (spec.open_low and value == spec.low)):
            return f"{spec.name}: {value!r} is out of range {_range_text(spec)}"
        if spec.high is not None and (value > spec.high or (spec.open_high and value == spec.high)):
            return f"{spec.name}: {value!r} is out of range {_range_text(spec)}"
    if kind is str:
        return _check_string(spec, value)
    return None


def _check_string(spec: ParamSpec, value: str) -> Optional[str]:
    if spec.choices and value not in spec.choices:
        return f"{spec.name}: {value!r} is not one of {', '.join(spec.choices)}"
    if spec.pattern and not re.fullmatch(spec.pattern, value):
        return f"{spec.name}: {value!r} is not valid; expected {spec.pattern_help}"
    return None


def _range_text(spec: ParamSpec) -> str:
    return f"{'(' if spec.open_low else '['}{spec.low}, {spec.high}{')' if spec.open_high else ']'}"


# Parameters rclpy or rcl declare on every node: overrides of these are not ours to question.
_ROS_PARAMETERS = ("use_sim_time", "start_type_description_service")
# ROS's QoS overrides apply only to the publishers and subscriptions that opt in; this node's do
# not (their QoS follows input.reliability and the contract in docs/ros.md): ignored, said so.
_QOS_OVERRIDE_PREFIX = "qos_overrides."


def unknown_overrides(names: Any) -> list[str]:
    """A warning for each overridden parameter name (``-p``, ``--params-file``, launch) that this
    node does not have, naming the closest parameter it does have: ROS ignores such an override
    silently, so ``-p score_treshold:=0.9`` would otherwise leave the threshold at its default."""
    out = []
    for name in sorted(set(names)):
        if name in SPECS or name in _ROS_PARAMETERS:
            continue
        if name.startswith(_QOS_OVERRIDE_PREFIX):
            out.append(f"parameter override {name!r} is ignored: this node's topics take no QoS overrides (the "
                       "image subscriptions' reliability is input.reliability; docs/ros.md lists every QoS)")
            continue
        close = difflib.get_close_matches(name, list(SPECS) + list(_ROS_PARAMETERS), n=1, cutoff=0.6)
        renamed = _RENAMED.get(name)
        hint = (f"; it is now {renamed[0]!r} ({renamed[1]})" if renamed else
                f"; did you mean {close[0]!r}?" if close else
                "; `ros2 param list` on the running node shows its parameters")
        out.append(f"parameter override {name!r} is not a parameter of this node and is ignored{hint}")
    return out


_KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list"}


def _as_parameter_takes(name: str, value: Any) -> Optional[Any]:
    """``value`` as parameter ``name`` takes it (1 -> 1.0 for a double, 2 -> "2" for a task), or
    None when it is not a valid value of it."""
    value = _as_taken(SPECS[name], value)
    return value if check_value(SPECS[name], value) is None else None


# Parameters that were renamed: the old name's override gets a precise warning.
_RENAMED = {"input.reliable": ("input.reliability", "auto, reliable or best_effort; true meant reliable")}


def output_prefix(topic: str) -> str:
    """Where an input topic's outputs go: ``"front/"`` for ``front/image``, ``""`` for ``image``."""
    return topic[: topic.rfind("/") + 1]


def _input_topic_problems(topics: list[str]) -> list[str]:
    """Cameras whose outputs would land on one topic (nothing in a result says which camera it
    came from), and absolute names (their outputs would leave the node's namespace)."""
    absolute = [topic for topic in topics if topic.startswith("/")]
    if absolute:
        return [f"input.topics: {absolute}: give relative names (front/image) and remap them "
                f"(-r front/image:=/cam_front/image_raw): each camera's outputs go next to its input name, "
                f"inside the node's namespace"]
    by_prefix: dict[str, list[str]] = {}
    for topic in topics:
        by_prefix.setdefault(output_prefix(topic), []).append(topic)
    return [f"input.topics: {' and '.join(shared)} would publish on the same {prefix}instances and "
            f"{prefix}debug_image: give each camera a folder of its own (front/image, rear/image)"
            for prefix, shared in by_prefix.items() if len(shared) > 1]


def check_values(values: dict[str, Any]) -> list[str]:
    """Reasons for every invalid value in ``values`` (names must be declared parameters)."""
    reasons = []
    valid = {}   # the values fine on their own
    for name, value in values.items():
        spec = SPECS.get(name)
        if spec is None:
            reasons.append(f"{name}: not a parameter of this node")
            continue
        reason = check_value(spec, value)
        if reason:
            reasons.append(reason)
        else:
            valid[name] = value
    # Checks of values together, or against the model's needs: on the values that are fine on
    # their own (each problem is reported, whatever else is wrong; nothing compares a bad type).
    if "depth.min_m" in valid and "depth.max_m" in valid and valid["depth.max_m"] <= valid["depth.min_m"]:
        reasons.append(f"depth.max_m {valid['depth.max_m']} must be greater than depth.min_m {valid['depth.min_m']}")
    if "input.topics" in valid:
        reasons += _input_topic_problems(valid["input.topics"])
    if valid.get("depth.enabled") and "input.topics" in valid:
        cameras = len(valid["input.topics"])
        for name in ("depth.topics", "depth.camera_info_topics"):
            if name in valid and len(valid[name]) != cameras:
                reasons.append(f"{name} has {len(valid[name])} entries but input.topics has {cameras}: one each "
                               f"per camera, in the same order")
    for name in ("input.short_side", "input.max_side"):
        if 0 < valid.get(name, 0) < MIN_MODEL_SIDE:
            reasons.append(f"{name}: {valid[name]} px is under the {MIN_MODEL_SIDE} px the model needs at least "
                           "(every frame would be rejected); 0 = the model's own size")
    short, longest = valid.get("input.short_side"), valid.get("input.max_side")
    if short and longest and MIN_MODEL_SIDE <= short and MIN_MODEL_SIDE <= longest and longest < short:
        reasons.append(f"input.max_side {longest} is smaller than input.short_side {short}")
    return reasons


@dataclass(frozen=True)
class Settings:
    """The node's parameter values, typed; replaced as a whole when run-time parameters change."""

    values: dict[str, Any] = field(default_factory=lambda: {s.name: s.default for s in PARAMETERS})
    notes: list[str] = field(default_factory=list)   # start-up: -p rules a later params file overrode

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def replace(self, changes: dict[str, Any]) -> "Settings":
        return Settings({**self.values, **changes})


def flat_defaults() -> dict[str, Any]:
    return {spec.name: spec.default for spec in PARAMETERS}


def nested_defaults() -> dict[str, Any]:
    """The defaults as the nested mapping a ROS parameters file holds under ``ros__parameters``."""
    out: dict[str, Any] = {}
    for spec in PARAMETERS:
        node = out
        *groups, leaf = spec.name.split(".")
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = spec.default
    return out


# --- ROS side --------------------------------------------------------------------------------

def descriptor(spec: ParamSpec):
    """The ``rcl_interfaces/ParameterDescriptor`` of a spec (type, range, read-only, help text)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    types = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
             float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
             list: ParameterType.PARAMETER_STRING_ARRAY}
    desc = ParameterDescriptor(name=spec.name, type=types[spec.kind], description=spec.description,
                               read_only=spec.read_only)
    constraints = []
    if spec.low is not None:
        if spec.kind is int:
            desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high), step=0)]
        else:
            desc.floating_point_range = [FloatingPointRange(from_value=float(spec.low), to_value=float(spec.high),
                                                            step=0.0)]
        constraints.append(f"range {_range_text(spec)}")
    if spec.choices:
        constraints.append("one of " + ", ".join(spec.choices))
    if spec.pattern_help:
        constraints.append(spec.pattern_help)
    if spec.read_only:
        constraints.append("fixed at start-up (restart the node to change it)")
    desc.additional_constraints = "; ".join(constraints)
    return desc


def declare(node, argv: Optional[list[str]] = None) -> Settings:
    """Declare every parameter on ``node`` (overrides from --params-file / -p apply) and check them
    all; ``argv``: the process's command line, for the ``-p`` rules rcl dropped.

    Raises ParameterError naming every bad value (wrong types included: every parameter is
    declared with dynamic typing, its type checked here); rclpy's own errors at declaration are
    turned into ParameterError too.
    """
    from rclpy.exceptions import InvalidParameterValueException

    from rclpy.parameter import Parameter

    values = {}
    # What the command line sets last, where rcl kept something else (its type ranking).
    command_line = resolve_command_line(
        list(argv or ()), node.get_fully_qualified_name(),
        {name: _plain(param.value) for name, param in getattr(node, "_parameter_overrides", {}).items()
         if name in SPECS},
        _as_parameter_takes, lambda name: _KIND_WORDS[SPECS[name].kind])
    problems = list(command_line.problems)
    for spec in PARAMETERS:
        full = descriptor(spec)
        # Typed by this module, not by rclpy: its refusal of a wrong type named neither the
        # parameter nor the value ("Wrong parameter type, expected '1' got '2'"), while
        # check_parameter_changes says "output.masks: expected bool, got int 0" (and refuses a
        # deletion, which dynamic typing would otherwise let through).
        full.dynamic_typing = True
        # Declared first without range / read-only, so a bad start-up value is reported in
        # this module's words; the full descriptor is applied once the value passed.
        loose = copy.deepcopy(full)
        loose.integer_range, loose.floating_point_range, loose.read_only = [], [], False
        try:
            param = node.declare_parameter(spec.name, spec.default, loose)
        except InvalidParameterValueException as exc:
            problems.append(f"{spec.name}: {exc}")
            continue
        if spec.name in command_line.apply:
            node.set_parameters([Parameter(spec.name, value=command_line.apply[spec.name])])
            param = node.get_parameter(spec.name)
        # `-p score_threshold:=1` and `max_age_s: 2` in a YAML file arrive as integers: taken as
        # the doubles they mean, at start-up as at run time (``ints_to_doubles``).
        if spec.kind is float and param.type_ != param.Type.DOUBLE:
            [param] = ints_to_doubles([param])
            if param.type_ != param.Type.DOUBLE:
                problems.append(f"{spec.name}: wrong type: expected float, got {param.type_.name.lower()} "
                                f"{_plain(param.value)!r}")
                continue
            node.set_parameters([param])
        value = _as_taken(spec, _plain(param.value))
        values[spec.name] = value
        if check_value(spec, value) is None:
            node.set_descriptor(spec.name, full)
    problems += check_values(values)
    if problems:
        raise ParameterError("invalid parameters:\n  " + "\n  ".join(problems))
    return Settings(values, notes=command_line.notes)


def check_parameter_changes(params: list, current: Optional[dict[str, Any]] = None) -> Any:
    """``add_on_set_parameters_callback`` body: a SetParametersResult saying why a change is refused.
    ``current``: the values now, for the checks that involve two parameters (depth.min_m < max_m)."""
    from rcl_interfaces.msg import SetParametersResult

    # Parameters ROS declares itself (use_sim_time, ...) are not ours to judge.
    values = {p.name: _plain(p.value) for p in params if p.name in SPECS}
    reasons = check_values(values)
    if not reasons and current:
        reasons = check_values({**current, **values})
    return SetParametersResult(successful=not reasons, reason="; ".join(reasons))


def ints_to_doubles(params: list) -> list:
    """Pre-set callback: ``ros2 param set /node score_threshold 1`` sends an int; make it the double it means."""
    from rclpy.parameter import Parameter

    out = []
    for p in params:
        spec = SPECS.get(p.name)
        if spec is not None and spec.kind is float and p.type_ == Parameter.Type.INTEGER:
            p = Parameter(p.name, Parameter.Type.DOUBLE, float(p.value))
        out.append(p)
    return out


def duplicate_iou(settings: Any) -> Optional[float]:
    """The ``duplicate_iou`` parameter as ``InferenceConfig.duplicate_iou`` takes it: 0 (keep
    duplicates) is None."""
    return float(settings["duplicate_iou"]) or None


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "array":
        return list(value)
    return value
