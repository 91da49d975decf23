"""Int8 static quantisation (ONNX Runtime, QDQ) of a model directory's ``detector.onnx``.

An experiment of issue 18, kept next to the bench that measures it (``bench/bench_cpu_paths.py``)
and not in the package: it is not wired into :class:`~toist_core.config.InferenceConfig` or
``toist export``, because on the embedded default model it fails the accuracy criterion
(docs/performance.md). A result must pass that criterion on the model it is applied to.

:func:`quantize_detector` writes a *sibling* model directory: every entry of the source
directory linked in (weights, config, tokenizer, memory bank, ``mask_head.onnx``), except
``detector.onnx``, which is the calibrated int8 graph (the source's ``toist.*`` metadata kept,
so :class:`~.onnx_backend.OnnxNetwork` opens it like the fp32 one; ``toist.quantization``
records what was done). Calibrate on training / validation images, never on the images the
result is scored on.

Choices (``onnxruntime.quantization.quantize_static``): QDQ format, uint8 activations and
per-channel int8 weights by default (``weight_type="u8"``: U8U8; ``reduce_range``: 7-bit weights
against the saturation of the u8 x s8 products of AVX2 without VNNI), MinMax calibration, the
graph pre-processed with ``quant_pre_process`` (ORT's basic optimisations fold the exported
``FrozenBatchNorm`` Mul / Add into the convolutions before the weights are quantised).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from toist_core.checkpoint.integrity import file_digest
from toist_core.checkpoint.model_dir import ONNX_DIGESTS_FILE
from toist_core.inference.onnx_export import DETECTOR_FILE, DETECTOR_INPUTS, META_PREFIX

QUANT_KEY = "quantization"
METHODS_NAMES = ("minmax", "entropy", "percentile")


class FeedsReader:
    """A ``CalibrationDataReader`` over a list of feed dicts (detector inputs)."""

    def __init__(self, feeds: Sequence[dict]):
        self.feeds = list(feeds)
        self._start, self._end = 0, len(self.feeds)
        self._index = 0

    def get_next(self) -> Optional[dict]:
        if self._start + self._index >= self._end:
            return None
        feed = self.feeds[self._start + self._index]
        self._index += 1
        return feed

    def __iter__(self):
        return self

    def __next__(self):
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end, self._index = start_index, min(end_index, len(self.feeds)), 0

    def rewind(self) -> None:
        self.set_range(0, len(self.feeds))


def detector_feeds(segmenter, images: Iterable[np.ndarray], states: Sequence) -> list[dict]:
    """Detector inputs (``DETECTOR_INPUTS``) of ``images`` as ``segmenter`` preprocesses them,
    one image at a time, cycling through the task ``states`` (``TaskState``)."""
    import torch

    from toist_core.inference.onnx_backend import OnnxNetwork

    feeds = []
    with torch.inference_mode():
        for index, image in enumerate(images):
            batch, _ = segmenter.preprocess([image])
            state = states[index % len(states)]
            feed = {"image": np.ascontiguousarray(batch.tensors.float().cpu().numpy()),
                    "pad_mask": batch.mask.cpu().numpy(), **OnnxNetwork.task_inputs(state)}
            feeds.append({name: feed[name] for name in DETECTOR_INPUTS})
    return feeds


def pad_feeds(feeds: Sequence[dict]) -> list[dict]:
    """``feeds`` with every image zero-padded (``pad_mask`` True) to the largest height and
    width among them: ORT's histogram calibrators (entropy, percentile) stack each tensor over
    the calibration frames and need equal shapes."""
    height = max(f["image"].shape[2] for f in feeds)
    width = max(f["image"].shape[3] for f in feeds)
    out = []
    for feed in feeds:
        image, mask = feed["image"], feed["pad_mask"]
        b, c, h, w = image.shape
        padded = np.zeros((b, c, height, width), dtype=image.dtype)
        padded[:, :, :h, :w] = image
        padded_mask = np.ones((b, height, width), dtype=bool)
        padded_mask[:, :h, :w] = mask
        out.append({**feed, "image": padded, "pad_mask": padded_mask})
    return out


def describe(op_types: Sequence[str], per_channel: bool, reduce_range: bool, weight_type: str,
             exclude: Sequence[str] = (), method: str = "minmax") -> str:
    return (f"QDQ int8 static ({method}), ops {'+'.join(op_types)}, U8{weight_type.upper()}, "
            f"{'per-channel' if per_channel else 'per-tensor'} weights{', reduce_range' if reduce_range else ''}"
            + (f", fp32 kept: {', '.join(exclude) if len(exclude) <= 3 else f'{len(exclude)} nodes'}"
               if exclude else ""))


def quantize_detector(source, target, feeds: Sequence[dict], op_types: Sequence[str] = ("Conv",),
                      per_channel: bool = True, reduce_range: bool = False, weight_type: str = "s8",
                      exclude: Sequence[str] = (), calibration_cache=None, preprocess: bool = True,
                      method: str = "minmax", extra_options: Optional[dict] = None) -> dict:
    """Write ``target`` (a model directory linked to ``source``'s files) with an int8 static
    quantised ``detector.onnx`` calibrated on ``feeds``; returns ``{"seconds": {...}, "nodes":
    {op: count of quantised nodes}, "description", "bytes", "excluded": [node names]}``.
    ``exclude``: substrings of node names (of ``op_types``) to keep in fp32. ``method``:
    ``minmax``, ``entropy`` or ``percentile`` (99.999 %) calibration."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = Path(source), Path(target)
    METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if weight_type not in ("s8", "u8"):
        raise ValueError(f"weight_type must be 's8' or 'u8', got {weight_type!r}")
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="toist_quant_", dir=str(target.parent)) as tmp:
        tmp = Path(tmp)
        graph = source / DETECTOR_FILE
        if preprocess:
            start = time.perf_counter()
            pre = tmp / "pre.onnx"
            try:
                quant_pre_process(str(graph), str(pre), skip_symbolic_shape=True)
                graph = pre
            except Exception as exc:  # the dynamic shapes defeat some shape inference passes
                print(f"quant_pre_process failed ({type(exc).__name__}: {exc}); quantising the graph as exported")
            seconds["pre_process"] = time.perf_counter() - start
        excluded = []
        if exclude:
            nodes_in = onnx.load(str(graph), load_external_data=False).graph.node
            excluded = [n.name for n in nodes_in if n.op_type in op_types and any(p in n.name for p in exclude)]
        start = time.perf_counter()
        out = tmp / DETECTOR_FILE
        reader = FeedsReader(feeds if method == "minmax" else pad_feeds(feeds))
        quantize_static(str(graph), str(out), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(op_types), per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if weight_type == "s8" else QuantType.QUInt8,
                        nodes_to_exclude=excluded, calibrate_method=METHODS[method],
                        extra_options=dict(extra_options or {}),
                        # Not CalibMaxIntermediateOutputs: ORT (1.32 and before) *drops* each full buffer
                        # without merging its ranges (onnxruntime#18893); the calibration graph keeps only
                        # ReduceMin / ReduceMax outputs anyway, a few bytes per tensor and frame.
                        calibration_cache_path=str(calibration_cache) if calibration_cache else None)
        seconds["calibrate_and_quantize"] = time.perf_counter() - start
        # The source's toist metadata (digest, format version, ...) + what was done.
        description = describe(op_types, per_channel, reduce_range, weight_type, exclude, method)
        proto = onnx.load(str(out))
        nodes: dict[str, int] = {}
        for node in proto.graph.node:
            if node.op_type == "DequantizeLinear":
                nodes["DequantizeLinear"] = nodes.get("DequantizeLinear", 0) + 1
        quantized_inputs = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
        for node in proto.graph.node:  # quantised = its weights (second input) are dequantised int8: an
            # excluded convolution can still read a quantised activation (its producer's, e.g. a Clip's)
            if node.op_type in op_types and len(node.input) > 1 and node.input[1] in quantized_inputs:
                nodes[node.op_type] = nodes.get(node.op_type, 0) + 1
        _install_sibling(proto, source, target, tmp, description)
    return {"seconds": seconds, "nodes": nodes, "description": description, "excluded": excluded,
            "bytes": (target / DETECTOR_FILE).stat().st_size}


CONV_GROUPS = ("stem", "depthwise", "input_proj", "stage:N")


def conv_nodes(graph) -> list[tuple[str, int]]:
    """``(name, groups)`` of every ``Conv`` node of an ONNX graph, in graph order."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    out = []
    for node in proto.graph.node:
        if node.op_type == "Conv":
            groups = [a.i for a in node.attribute if a.name == "group"]
            out.append((node.name, groups[0] if groups else 1))
    return out


def select_convs(graph, groups: Sequence[str]) -> list[str]:
    """Names of the ``Conv`` nodes of ``graph`` in the structural ``groups`` (``CONV_GROUPS``):
    ``stem`` the first convolution (on the image), ``depthwise`` every grouped convolution,
    ``input_proj`` the projection of the backbone's last feature map into the transformer,
    ``stage:N`` the convolutions of MobileNetV2's ``features.N`` block or ResNet's ``layerN``.
    Rules by structure rather than by a per-layer scan, so that the same rule names layers of
    any backbone."""
    nodes = conv_nodes(graph)
    chosen: list[str] = []
    for group in groups:
        if group == "stem":
            picked = [nodes[0][0]] if nodes else []
        elif group == "depthwise":
            picked = [name for name, count in nodes if count > 1]
        elif group == "input_proj":
            picked = [name for name, _ in nodes if name.startswith("/input_proj/")]
        elif group.startswith("stage:") and group[6:].isdigit():
            index = group[6:]
            picked = [name for name, _ in nodes if f"/features.{index}/" in name or f"/layer{index}/" in name]
        else:
            raise ValueError(f"conv group {group!r}: expected one of {', '.join(CONV_GROUPS)}")
        if not picked and group != "depthwise":  # a ResNet has no grouped convolutions
            raise ValueError(f"conv group {group!r} names no Conv node of {graph}")
        chosen += [name for name in picked if name not in chosen]
    return chosen


def fake_quantize_weights(source, target) -> int:
    """Write ``target``: ``source``'s directory with every convolution's weights (after
    ``quant_pre_process`` folded the frozen BatchNorms into them) rounded to per-channel
    symmetric int8 and stored back as fp32; activations untouched. Separates what the weights'
    rounding costs from what the activations' costs. Returns the number of weights rounded."""
    from onnx import numpy_helper

    source, target = Path(source), Path(target)
    with tempfile.TemporaryDirectory(prefix="toist_wq_", dir=str(target.parent)) as tmp:
        tmp = Path(tmp)
        proto, initializers = _folded_graph(source, tmp)
        rounded = 0
        for node in proto.graph.node:
            if node.op_type == "Conv" and node.input[1] in initializers:
                weight = numpy_helper.to_array(initializers[node.input[1]])
                scale = np.abs(weight).reshape(weight.shape[0], -1).max(axis=1) / 127.0
                scale = np.where(scale == 0, 1.0, scale).reshape(-1, *[1] * (weight.ndim - 1))
                levels = np.clip(np.round(weight / scale), -127, 127)
                initializers[node.input[1]].CopyFrom(
                    numpy_helper.from_array((levels * scale).astype(np.float32), node.input[1]))
                rounded += 1
        _install_sibling(proto, source, target, tmp, "int8 weights fake-quantised (fp32 compute)")
    return rounded


def bias_correct(source, target, feeds: Sequence[dict]) -> int:
    """Write ``target``: ``source``'s directory whose ``detector.onnx`` is the fp32 graph (its
    frozen BatchNorms folded by ``quant_pre_process``) with every convolution's bias corrected
    for what int8 static quantisation shifts: empirical bias correction (Nagel et al. 2019,
    "Data-Free Quantization Through Weight Equalization and Bias Correction", section 4.2). In
    graph order, one convolution at a time, the corrected graph so far is quantised
    (:func:`quantize_detector` on ``feeds``) and run unfused on ``feeds``; the per-channel mean
    of the convolution's output in fp32 minus its mean in int8 is added to its bias. Sequential
    because each mean difference includes what the convolutions before it shift: correcting all
    at once from one pass counts that twice (it diverged when tried). Quantise ``target`` (same
    ``feeds``) for the corrected int8 graph. Returns the number of convolutions corrected."""
    import onnx
    from onnx import numpy_helper

    source, target = Path(source), Path(target)
    with tempfile.TemporaryDirectory(prefix="toist_bias_", dir=str(target.parent)) as tmp:
        tmp = Path(tmp)
        proto, initializers = _folded_graph(source, tmp)
        convs = [node for node in proto.graph.node if node.op_type == "Conv"]
        for node in convs:  # a bias to correct on every convolution
            if len(node.input) < 3 or not node.input[2]:
                channels = numpy_helper.to_array(initializers[node.input[1]]).shape[0]
                bias = numpy_helper.from_array(np.zeros(channels, np.float32), f"{node.name}_corrected_bias")
                proto.graph.initializer.append(bias)
                initializers[bias.name] = proto.graph.initializer[-1]
                del node.input[2:]
                node.input.extend([""] * (2 - len(node.input)) + [bias.name])
        outputs = [node.output[0] for node in convs]
        onnx.save(proto, str(tmp / "fp32.onnx"))
        fp32_means = _conv_output_means(tmp / "fp32.onnx", feeds, outputs)
        step_source, step_int8 = tmp / "step_fp32", tmp / "step_int8"
        for node in convs:
            _install_sibling(proto, source, step_source, tmp, "bias correction step")
            quantize_detector(step_source, step_int8, feeds, op_types=("Conv",))
            int8_mean = _conv_output_means(step_int8 / DETECTOR_FILE, feeds, [node.output[0]])[node.output[0]]
            bias = initializers[node.input[2]]
            corrected = numpy_helper.to_array(bias).astype(np.float64) + fp32_means[node.output[0]] - int8_mean
            bias.CopyFrom(numpy_helper.from_array(corrected.astype(np.float32), bias.name))
        _install_sibling(proto, source, target, tmp, "fp32, biases corrected for int8 static quantisation")
    return len(convs)


def _folded_graph(source: Path, tmp: Path):
    """(``source``'s ``detector.onnx`` after ``quant_pre_process``, which folds the frozen
    BatchNorms into the convolutions; its initializers by name), written through ``tmp``."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(source / DETECTOR_FILE), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
    proto = onnx.load(str(tmp / "pre.onnx"))
    return proto, {initializer.name: initializer for initializer in proto.graph.initializer}


def _conv_output_means(graph, feeds: Sequence[dict], outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-channel means (float64 ``[C]``) of the tensors ``outputs`` (``[B, C, H, W]``) of
    ``graph`` over ``feeds`` (each frame's spatial mean, averaged over frames), run with ONNX
    Runtime's graph optimisations off, so that a QDQ graph's convolution outputs exist."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(graph))
    present = {output.name for output in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in outputs if name not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums = {name: 0.0 for name in outputs}
    for feed in feeds:
        for name, value in zip(outputs, session.run(list(outputs), feed)):
            sums[name] = sums[name] + value.mean(axis=(0, 2, 3), dtype=np.float64)
    return {name: total / len(feeds) for name, total in sums.items()}


def _install_sibling(proto, source: Path, target: Path, tmp: Path, description: str) -> None:
    """Make ``target`` the sibling directory of ``source`` whose ``detector.onnx`` is ``proto``
    (with the source's ``toist.*`` metadata, so that ``OnnxNetwork`` opens it like the fp32 one,
    and ``toist.quantization`` = ``description``); every other entry of ``source`` linked in.
    Built under ``tmp`` and moved into place last."""
    import onnx

    original = {p.key: p.value for p in onnx.load(str(source / DETECTOR_FILE), load_external_data=False)
                .metadata_props}
    del proto.metadata_props[:]
    for key, value in {**original, META_PREFIX + QUANT_KEY: description}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    staging = tmp / "dir"
    staging.mkdir()
    for entry in source.iterdir():
        if entry.name not in (DETECTOR_FILE, ONNX_DIGESTS_FILE) and not entry.name.startswith("."):
            os.symlink(entry.resolve(), staging / entry.name)
    onnx.save(proto, str(staging / DETECTOR_FILE))
    # The graphs' SHA-256 record, as the export writes it, with this detector's (OnnxNetwork
    # requires it and refuses a detector whose bytes it does not list).
    record = json.loads((source / ONNX_DIGESTS_FILE).read_text())
    record[DETECTOR_FILE] = [file_digest(staging / DETECTOR_FILE)]
    (staging / ONNX_DIGESTS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def quantization_of(directory) -> Optional[str]:
    """The ``toist.quantization`` entry of a directory's ``detector.onnx`` (None: fp32)."""
    import onnx

    proto = onnx.load(str(Path(directory) / DETECTOR_FILE), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}.get(META_PREFIX + QUANT_KEY)


__all__ = ["CONV_GROUPS", "FeedsReader", "bias_correct", "conv_nodes", "detector_feeds", "fake_quantize_weights",
           "quantization_of", "quantize_detector", "select_convs"]
