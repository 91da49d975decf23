"""The per-frame network of a model directory as two ONNX graphs (``toist export --onnx``).

Only the network goes to ONNX; the segmenter's pre- and post-processing (resize, padding,
query selection, mask upsampling, threshold) stay the same Python code for every backend, and
the text encoder still runs in PyTorch, once per task (``set_task``).

``detector.onnx`` (``d`` = d_model, ``L`` text tokens, ``h, w`` = H/32, W/32 of the backbone's
last level, ``K`` cluster centres)::

    image        [B, 3, H, W] float32   normalised, zero-padded image batch (any H, W)
    pad_mask     [B, H, W]    bool      True on padding
    text         [L, 1, d]    float32   the task's cached resized text features
    text_mask    [1, L]       bool      True on padding tokens
    ccr_rows     [L]          bool      pronoun token rows (all False: no cluster-centre replacement)
    centres      [K, d]       float32   the task's memory-bank centres (any K >= 1; ignored without rows)
 -> pred_logits  [B, Q, 256], pred_boxes [B, Q, 4] (cx, cy, w, h), hs_last [B, Q, d] (last decoder
    layer), key_map [B, d, h, w] (image rows of the unmodified encoder memory), image_mask
    [B, h, w], src_proj [B, d, h, w] and the backbone levels feat4 / feat8 / feat16 (segmentation
    models only, what the mask head reads)

``mask_head.onnx`` (segmentation models; one image, ``n`` kept queries)::

    key_map [1, d, h, w], image_mask [1, h, w], src_proj [1, d, h, w], feat4, feat8, feat16,
    queries [1, n, d] -> mask_logits [1, n, H/4, W/4]

Each file's metadata (:data:`META_PREFIX` keys) records the format version, opset, toist
version, the input it takes and the SHA-256 of the source ``model.safetensors``; a runner
refuses a graph whose digest is not the directory's (:func:`check_metadata`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic_file import fsync_dir, staging_folder, write_text_atomic
from ..checkpoint import WEIGHTS_FILE, CheckpointError
from ..checkpoint.integrity import file_digest
from ..checkpoint.model_dir import DETECTOR_FILE, MASK_HEAD_FILE, ONNX_DIGESTS_FILE, ONNX_STAGING_PREFIX
from ..structures import ImageBatch
from ..tokens import NO_OBJECT_INDEX

ONNX_FORMAT_VERSION = 1
OPSET = 18
META_PREFIX = "toist."
DETECTOR_INPUTS = ("image", "pad_mask", "text", "text_mask", "ccr_rows", "centres")
DETECTOR_OUTPUTS = ("pred_logits", "pred_boxes", "hs_last", "key_map", "image_mask", "src_proj",
                    "feat4", "feat8", "feat16")
MASK_INPUTS = ("key_map", "image_mask", "src_proj", "feat4", "feat8", "feat16", "queries")
MASK_OUTPUTS = ("mask_logits",)


class DetectorGraph(nn.Module):
    """Backbone + transformer (+ in-graph cluster-centre replacement) + class / box heads: the
    exported detector. Calls the model's own ``encode`` / ``decoder_states`` / ``predict_heads``
    so the graph is the PyTorch path, not a copy of it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.has_masks = bool(getattr(model, "has_masks", False))

    def forward(self, image: Tensor, pad_mask: Tensor, text: Tensor, text_mask: Tensor, ccr_rows: Tensor,
                centres: Tensor) -> tuple[Tensor, ...]:
        from ..model.text import TextFeatures

        detector = self.model.detector
        features = TextFeatures(tokenized=None, resized=text, padding_mask=text_mask)
        memory = self.model.encode(ImageBatch(image, pad_mask), text=features)
        memory = dict(memory)
        memory["img_memory_mod"] = _replace_rows(memory["img_memory"], text.shape[0], ccr_rows, centres)
        hs = detector.decoder_states(memory)
        out = detector.predict_heads(hs, memory, aux=False)
        outputs = (out["pred_logits"], out["pred_boxes"], hs[-1])
        if not self.has_masks:
            return outputs
        src_proj = memory["src_proj"]
        batch, dim, height, width = src_proj.shape
        # As TOISTSegm.predict_masks: keys are the image rows of the *unmodified* memory.
        key_map = memory["img_memory"][:-text.shape[0]].permute(1, 2, 0).reshape(batch, dim, height, width)
        image_mask = memory["mask"][:, :height * width].reshape(batch, height, width)
        feats = memory["features"]
        return outputs + (key_map, image_mask, src_proj, feats[0], feats[1], feats[2])


def _replace_rows(img_memory: Tensor, num_text: int, rows: Tensor, centres: Tensor) -> Tensor:
    """CCR inside the graph: the ``rows [L]`` of the text part of ``img_memory [S, B, d]`` <- the
    centre ``[K, d]`` nearest to the mean of those rows (per image). No rows: unchanged (the
    ``where`` keeps every original value, bit for bit)."""
    text = img_memory[-num_text:]                                             # [L, B, d]
    weights = rows.to(text.dtype)[:, None, None]                              # [L, 1, 1]
    pronoun = (text * weights).sum(0) / weights.sum().clamp(min=1.0)          # [B, d]
    distances = (pronoun[:, None, :] - centres[None]).pow(2).sum(-1)          # [B, K]
    values = centres[distances.argmin(1)]                                     # [B, d]
    replaced = torch.where(rows[:, None, None], values[None].to(text.dtype), text)
    return torch.cat([img_memory[:-num_text], replaced], dim=0)


class MaskHeadGraph(nn.Module):
    """``TOISTSegm``'s attention map + conv head for ``n`` queries of one image (the exported mask head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, key_map: Tensor, image_mask: Tensor, src_proj: Tensor, feat4: Tensor, feat8: Tensor,
                feat16: Tensor, queries: Tensor) -> Tensor:
        bbox_mask = self.model.bbox_attention(queries, key_map, mask=image_mask)
        masks = self.model.mask_head(src_proj, bbox_mask, [feat16, feat8, feat4])
        return masks.view(queries.shape[0], queries.shape[1], masks.shape[-2], masks.shape[-1])


def model_digest(directory: Path) -> str:
    """SHA-256 identifying a directory's weights: the tensor digest ``model.safetensors`` records
    (checked against its tensors whenever the directory is loaded), else the file's own SHA-256."""
    from ..checkpoint.integrity import DIGEST_KEY, safetensors_metadata

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} not found: not a model directory")
    recorded = safetensors_metadata(path).get(DIGEST_KEY)
    if recorded:
        return recorded
    return file_digest(path)


def check_same_weights(model: nn.Module, directory: Path) -> None:
    """Refuse ``model`` unless its ``state_dict`` is the directory's ``model.safetensors`` (same
    names, dtypes, shapes and bytes): the graphs are stamped with that file's digest, and a runner
    trusts a stamped graph to compute with those weights."""
    from ..checkpoint.integrity import DIGEST_KEY, load_safetensors, safetensors_metadata, tensor_digest

    path = Path(directory) / WEIGHTS_FILE
    model_digest(directory)  # refuses a directory without weights
    expected = safetensors_metadata(path).get(DIGEST_KEY)
    if expected is None:  # a directory of version < 3 records no tensor digest: compute the file's
        expected = tensor_digest(load_safetensors(path, required_digest=False))
    actual = tensor_digest(model.state_dict())
    if actual != expected:
        raise CheckpointError(f"{directory}: the model given to export_onnx does not hold the weights of {path} "
                              f"(state_dict SHA-256 {actual[:12]}..., the file's {expected[:12]}...): its graphs "
                              "would carry the file's digest and compute with other weights. Save the model there "
                              "first (save_model_dir), then export it, or export the directory's own weights: "
                              f"`toist export --onnx {directory}`")


def example_inputs(model: nn.Module, text_tokens: int = 6, size: tuple[int, int] = (96, 128),
                   centres: int = 3, batch: int = 2) -> tuple[Tensor, ...]:
    """Detector inputs of the right dtypes and ranks (values only drive the tracing; no dim
    may be 1, or the exporter specialises it)."""
    d_model = model.detector.transformer.d_model
    device = next(model.parameters()).device
    height, width = size
    pad_mask = torch.zeros((batch, height, width), dtype=torch.bool, device=device)
    pad_mask[0, :, width - 20:] = True
    rows = torch.zeros(text_tokens, dtype=torch.bool, device=device)
    rows[-2] = True
    return (torch.randn(batch, 3, height, width, device=device), pad_mask,
            torch.randn(text_tokens, 1, d_model, device=device),
            torch.zeros((1, text_tokens), dtype=torch.bool, device=device), rows,
            torch.randn(centres, d_model, device=device))


def _export(module: nn.Module, args: tuple, path: Path, inputs: Sequence[str], outputs: Sequence[str],
            dynamic: dict, exporter: str) -> None:
    """Export ``module`` to one self-contained file (weights inside: under 2 GB for every preset).

    ``dynamic``: input name -> {axis: name}. ``"torchscript"`` (default): torch's tracing
    exporter (``dynamo=False``): 4 s for ``tiny_segm`` where the dynamo exporter takes 50 s
    (2 busy CPU cores), same graph to fp32 rounding; dynamic H, W / batch / tokens come from
    the traced shape arithmetic. ``"dynamo"``: ``torch.export`` + onnxscript, torch's
    default, for when the TorchScript exporter is gone."""
    import warnings

    if exporter == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic, the exporter's deprecation
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=list(inputs),
                              output_names=list(outputs), dynamic_axes=dynamic, opset_version=OPSET,
                              do_constant_folding=True)
        return
    if exporter != "dynamo":
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    from torch.export import Dim

    dims: dict[str, Dim] = {}
    shapes = {name: {axis: dims.setdefault(label, Dim(label, min=1, max=8192)) for axis, label in axes.items()}
              for name, axes in dynamic.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamo=True, input_names=list(inputs), output_names=list(outputs),
                                    dynamic_shapes=shapes, opset_version=OPSET, optimize=True, verbose=False)
    program.save(str(path), external_data=False)


def export_onnx(model: nn.Module, directory, exporter: str = "torchscript") -> list[Path]:
    """Write ``detector.onnx`` (and ``mask_head.onnx`` for segmentation models) of the fp32 CPU
    copy of ``model`` into ``directory`` (a model directory: its ``model.safetensors`` digest is
    recorded). ``model`` must hold exactly that file's tensors (:func:`check_same_weights`).
    The graphs are written in a folder of their own inside ``directory``, flushed to disk and
    renamed in: a reader never sees half a graph, and an interrupted export changes nothing."""
    directory = Path(directory).expanduser().resolve()
    with staging_folder(directory, ONNX_STAGING_PREFIX) as staging:
        graphs, digest = _write_graphs(model, directory, staging, exporter)
        return _install(graphs, directory, digest)


def _write_graphs(model: nn.Module, directory: Path, into: Path, exporter: str) -> tuple[list[Path], str]:
    """The graphs of ``model`` (the weights of ``directory``) written into the folder ``into``, and
    the SHA-256 of the weights file they record (what the install checks the directory still holds)."""
    import copy

    from .. import __version__

    digest = model_digest(directory)
    check_same_weights(model, directory)
    model = copy.deepcopy(model).float().cpu().eval()
    model.to(memory_format=torch.contiguous_format)
    has_masks = bool(getattr(model, "has_masks", False))
    image = {0: "batch", 2: "height", 3: "width"}
    detector_dynamic = {"image": image, "pad_mask": {0: "batch", 1: "height", 2: "width"}, "text": {0: "tokens"},
                        "text_mask": {1: "tokens"}, "ccr_rows": {0: "tokens"}, "centres": {0: "centres"}}
    args = example_inputs(model)
    outputs = DETECTOR_OUTPUTS if has_masks else DETECTOR_OUTPUTS[:3]
    meta = {"format_version": str(ONNX_FORMAT_VERSION), "opset": str(OPSET), "toist_version": __version__,
            "model_sha256": digest, "masks": str(has_masks).lower(), "exporter": exporter,
            "input": "padded normalised image [B, 3, H, W] float32, any H, W (toist's resize and padding in Python)"}
    written = [into / DETECTOR_FILE]
    with torch.no_grad():
        _export(DetectorGraph(model).eval(), args, written[0], DETECTOR_INPUTS, outputs, detector_dynamic, exporter)
        _write_metadata(written[0], {**meta, "graph": "detector"})
        if has_masks:
            feats = DetectorGraph(model).eval()(*args)
            mask_args = tuple(f[:1] for f in feats[3:]) + (feats[2][:1, :3],)
            # The backbone levels get their own dims: they are exact multiples of the stride-32
            # grid only for padded sizes that are multiples of 32.
            mask_dynamic = {"key_map": {2: "h32", 3: "w32"}, "image_mask": {1: "h32", 2: "w32"},
                            "src_proj": {2: "h32", 3: "w32"}, "feat4": {2: "h4", 3: "w4"},
                            "feat8": {2: "h8", 3: "w8"}, "feat16": {2: "h16", 3: "w16"}, "queries": {1: "queries"}}
            written.append(into / MASK_HEAD_FILE)
            _export(MaskHeadGraph(model).eval(), mask_args, written[1], MASK_INPUTS, MASK_OUTPUTS, mask_dynamic,
                    exporter)
            _write_metadata(written[1], {**meta, "graph": "mask_head"})
    for path in written:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    return written, digest


def _install(graphs: list[Path], directory: Path, digest: str) -> list[Path]:
    """Rename ``graphs`` (exported from weights of SHA-256 ``digest``) into ``directory``."""
    if model_digest(directory) != digest:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: replaced while its ONNX graphs were exported; nothing "
                              f"was installed: run `toist export --onnx {directory}` again")
    record = directory / ONNX_DIGESTS_FILE
    new = _digests(graphs)  # as written and flushed
    # While the graphs are renamed in one by one, a reader (a node starting) may see old and new
    # files, and a kill may stop the swap half way: the record names both generations until the
    # new one is complete, so every whole graph of either loads and a changed byte is still refused.
    during = _recorded_digests(record)
    for name, values in new.items():
        during[name] = sorted(set(during.get(name, [])) | set(values))
    _write_record(record, during)
    installed = []
    for graph in graphs:
        os.replace(graph, directory / graph.name)
        installed.append(directory / graph.name)
    if MASK_HEAD_FILE not in {graph.name for graph in graphs}:  # a stale mask head of an older export
        (directory / MASK_HEAD_FILE).unlink(missing_ok=True)
    _write_record(record, new)
    fsync_dir(directory)
    return installed


def _digests(graphs: list[Path]) -> dict[str, list[str]]:
    return {graph.name: [file_digest(graph)] for graph in graphs}


def _write_record(record: Path, digests: dict[str, list[str]]) -> None:
    write_text_atomic(record, json.dumps(digests, indent=1, sort_keys=True) + "\n")


def _recorded_digests(record: Path) -> dict[str, list[str]]:
    """``{graph file: [SHA-256, ...]}`` of an ``onnx_sha256.json``; {} when absent or unreadable
    (the swap then names the new graphs only)."""
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {name: value for name, value in recorded.items() if isinstance(value, list)}


def check_graph_digests(directory: Path) -> None:
    """Refuse a graph whose bytes are not the ones ``toist export --onnx`` installed (its
    ``onnx_sha256.json``): a flipped byte in a weight ran, silently. The record is required: graphs
    copied without it, or exported before toist wrote it, ran unchecked."""
    record = directory / ONNX_DIGESTS_FILE
    again = f"run `toist export --onnx {directory}` again"
    graphs = [name for name in (DETECTOR_FILE, MASK_HEAD_FILE) if (directory / name).is_file()]
    if graphs and not record.is_file():
        raise CheckpointError(f"{record}: missing beside {', '.join(graphs)} (the export records their SHA-256s "
                              f"there; graphs copied without it, or exported before toist wrote it, cannot be "
                              f"checked); copy it with them, or {again}")
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(recorded, dict):
            raise ValueError(type(recorded).__name__)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{record}: not the JSON object `toist export --onnx` writes ({exc}); {again}") from None
    for name in (DETECTOR_FILE, MASK_HEAD_FILE):
        path = directory / name
        allowed = recorded.get(name)
        if path.is_file() and (not isinstance(allowed, list) or file_digest(path) not in allowed):
            raise CheckpointError(f"{path}: its SHA-256 is not the one the export recorded in {ONNX_DIGESTS_FILE} "
                                  f"(the file changed after it was written: damaged, or from another export); {again}")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _write_metadata(path: Path, meta: dict) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    onnx.save(proto, str(path))


def read_metadata(meta: dict) -> dict:
    """The ``toist.*`` entries of an ONNX Runtime session's custom metadata, without the prefix."""
    return {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}


def check_metadata(path: Path, meta: dict, directory: Path, graph: str, digest: Optional[str] = None) -> None:
    """Refuse a graph that is not this directory's: foreign file, other format version, or
    exported from other weights (``model_sha256`` differs from ``model.safetensors``)."""
    again = f"run `toist export --onnx {directory}` again"
    if meta.get("graph") != graph or "model_sha256" not in meta:
        raise CheckpointError(f"{path}: not a toist {graph} graph (no toist metadata); {again}")
    if meta.get("format_version") != str(ONNX_FORMAT_VERSION):
        raise CheckpointError(f"{path}: ONNX format version {meta.get('format_version')}, this toist reads "
                              f"{ONNX_FORMAT_VERSION}; {again}")
    digest = digest or model_digest(directory)
    if meta["model_sha256"] != digest:
        raise CheckpointError(f"{path}: exported from other weights (model SHA-256 {meta['model_sha256'][:12]}..., "
                              f"{directory / WEIGHTS_FILE} has {digest[:12]}...); {again}")


# What `toist export --onnx` accepts (fp32, ONNX Runtime on CPU against PyTorch).
MAX_LOGIT_DIFF = 1e-4
MAX_BOX_DIFF = 1e-4
MIN_MASK_IOU = 0.999
CHECK_SIZES = ((48, 64), (72, 40), (53, 97))   # (H, W): landscape, portrait, odd sizes (dynamic shapes)


def compare_backends(directory, tasks: Sequence = (1, 2), sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
                     short_side: Optional[int] = None, max_size: Optional[int] = None, top: int = 10,
                     seed: int = 0, **inference: Any) -> dict:
    """Run the directory's network in PyTorch and in ONNX Runtime (CPU, fp32) on random images
    of ``sizes`` for each task; returns the largest ``logits`` / ``boxes`` differences (over all
    queries) and the smallest ``mask_iou`` (full-resolution masks of the ``top`` queries).
    ``short_side`` / ``max_size``: the resize (default: the model's own input size); ``inference``:
    other :class:`InferenceConfig` fields (``pad_multiple``, ``protocol``)."""
    import warnings

    from ..config import InferenceConfig
    from .postprocess import masks_at_original
    from .segmenter import TaskSegmenter

    sizes_cfg = dict(short_side=short_side, max_size=max_size, score_threshold=0.0, **inference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained-task warnings: the check runs any task
        reference = TaskSegmenter.from_pretrained(directory, device="cpu", inference=InferenceConfig(**sizes_cfg))
        onnx = TaskSegmenter.from_pretrained(directory, device="cpu",
                                             inference=InferenceConfig(backend="onnxruntime", **sizes_cfg))
        states = [reference.encode_task(task) for task in tasks]
    rng = np.random.default_rng(seed)
    worst = {"logits": 0.0, "boxes": 0.0, "mask_iou": 1.0, "images": len(sizes), "tasks": list(tasks),
             "providers": onnx._onnx.providers, "masks": reference.has_masks, "padded": [], "non_finite": []}
    for height, width in sizes:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        with torch.inference_mode():
            batch, resized = reference.preprocess([image])
            worst["padded"].append(tuple(batch.tensors.shape[-2:]))
            for state in states:
                ref_logits, ref_boxes, ref_masks = reference._detect(batch, state)
                ort_logits, ort_boxes, ort_masks = onnx._onnx.detect(batch, state)
                worst["logits"] = max(worst["logits"], _largest_difference(ref_logits, ort_logits, "logits", worst))
                worst["boxes"] = max(worst["boxes"], _largest_difference(ref_boxes, ort_boxes, "boxes", worst))
                if not reference.has_masks:
                    continue
                scores = 1.0 - ref_logits[0].float().softmax(-1)[:, NO_OBJECT_INDEX]
                keep = scores.nan_to_num(-1.0).argsort(descending=True)[:top]
                padded = batch.tensors.shape[-2:]
                ref_mask_logits, ort_mask_logits = ref_masks(0, keep), ort_masks(0, keep)
                if _largest_difference(ref_mask_logits, ort_mask_logits, "mask logits", worst) == math.inf:
                    worst["mask_iou"] = 0.0   # a NaN mask logit is no pixel either way: no IoU to trust
                    continue
                a = masks_at_original(ref_mask_logits, resized[0], padded, (height, width), 0.5)
                b = masks_at_original(ort_mask_logits, resized[0], padded, (height, width), 0.5)
                for ma, mb in zip(a, b):
                    union = np.logical_or(ma, mb).sum()
                    iou = 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)
                    worst["mask_iou"] = min(worst["mask_iou"], iou)
    return worst


def _largest_difference(reference: Tensor, other: Tensor, what: str, worst: dict) -> float:
    """max |reference - other|, or inf (noted in ``worst["non_finite"]``) when either holds a NaN
    or an infinity: ``max(0.0, nan)`` is 0.0, so one NaN passed the check and hid every other
    difference of its image."""
    reference, other = reference.float(), other.float()
    sides = [name for name, values in (("PyTorch", reference), ("ONNX Runtime", other))
             if not bool(torch.isfinite(values).all())]
    if sides:
        note = f"{what} of {' and '.join(sides)}"
        if note not in worst["non_finite"]:
            worst["non_finite"].append(note)
        return math.inf
    return float((reference - other).abs().max()) if reference.numel() else 0.0


def check_passes(result: dict) -> bool:
    return (not result.get("non_finite") and result["logits"] <= MAX_LOGIT_DIFF
            and result["boxes"] <= MAX_BOX_DIFF and result["mask_iou"] >= MIN_MASK_IOU)


def describe_check(result: dict) -> str:
    return (f"ONNX Runtime ({', '.join(result['providers'])}) vs PyTorch, fp32, {result['images']} random images x "
            f"tasks {', '.join(map(str, result['tasks']))}: max |logits diff| {result['logits']:.2e} "
            f"(<= {MAX_LOGIT_DIFF:g}), max |boxes diff| {result['boxes']:.2e} (<= {MAX_BOX_DIFF:g}), "
            + (f"min mask IoU {result['mask_iou']:.5f} (>= {MIN_MASK_IOU})" if result["masks"] else "no mask head")
            + (f"; not finite: {', '.join(result['non_finite'])}" if result.get("non_finite") else ""))


def export_checked(directory, exporter: str = "torchscript", shown: Optional[str] = None, **check) -> dict:
    """:func:`export_onnx` of a model directory's own weights, checked by :func:`compare_backends`
    before they are installed: the new graphs run in a linked copy of the directory, and only
    graphs that pass replace the directory's (a failed or interrupted check leaves the graphs it
    had, :class:`CheckpointError` saying by how much). ``check``: :func:`compare_backends`'s
    options; its tasks default to two of the model's and a free-text caption. ``shown``: the
    name a failed check gives the directory (a staged one: the folder it is to become)."""
    from ..checkpoint import is_model_dir, load_pretrained
    from ..checkpoint.files import refuse_run_folder

    directory = Path(directory).expanduser().resolve()  # "." has no name to give the trial copy
    refuse_run_folder(directory, purpose="onnx")
    if not is_model_dir(directory):
        command = (f"toist export {directory} <model_dir> --onnx" if directory.is_file()
                   else f"toist export <checkpoint.pth> {directory} --onnx")
        raise CheckpointError(f"{directory}: not a model directory (no config.yaml); make one first: `{command}`")
    loaded = load_pretrained(directory)
    check.setdefault("tasks", _check_tasks(loaded))
    digest = model_digest(directory)
    with staging_folder(directory, ONNX_STAGING_PREFIX) as staging:
        trial = staging / "trial"
        shutil.copytree(directory, trial, copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(DETECTOR_FILE, MASK_HEAD_FILE, ONNX_DIGESTS_FILE,
                                                      f"{ONNX_STAGING_PREFIX}*"))
        graphs, _ = _write_graphs(loaded.model, trial, staging, exporter)
        for graph in graphs:  # the trial directory runs them; the originals stay for the install
            _link_or_copy(str(graph), str(trial / graph.name))
        _write_record(trial / ONNX_DIGESTS_FILE, _digests(graphs))   # loaded as the installed ones will be
        result = compare_backends(trial, **check)
        if not check_passes(result):
            raise CheckpointError(f"{shown or directory}: the new ONNX graphs do not match PyTorch and were not installed"
                                  f"{' (the ones it had stay)' if (directory / DETECTOR_FILE).exists() else ''}: "
                                  f"{describe_check(result)}")
        _install(graphs, directory, digest)
    return result


def _check_tasks(loaded) -> tuple:
    """What the export's check runs: two of the tasks the model was trained on (or of its
    vocabulary: one for a one-task vocabulary) and a free-text caption (no memory bank)."""
    ids = tuple(loaded.tasks or (entry.id for entry in loaded.vocabulary.entries))
    return ids[:2] + ("a cup on a table",)


__all__ = ["DETECTOR_FILE", "DetectorGraph", "MASK_HEAD_FILE", "MAX_BOX_DIFF", "MAX_LOGIT_DIFF", "MIN_MASK_IOU",
           "MaskHeadGraph", "OPSET", "check_metadata", "check_same_weights", "compare_backends", "describe_check",
           "check_graph_digests", "export_checked", "export_onnx", "model_digest", "read_metadata"]
