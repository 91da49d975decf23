"""Running a model directory's ONNX graphs with ONNX Runtime (``InferenceConfig.backend``).

``"onnxruntime"``: CPUExecutionProvider (CUDAExecutionProvider first when the segmenter's
device is CUDA and onnxruntime-gpu provides it). ``"tensorrt"``: TensorrtExecutionProvider in
fp16 with its engine cache in ``<model_dir>/trt_cache``, or in the user's cache when the model
directory cannot be written (:func:`trt_cache_dir`); CUDA, then CPU, for the nodes TensorRT
does not take. Only the network runs here: :class:`~toist_core.inference.TaskSegmenter`'s
resize, padding, query selection and mask post-processing are the same Python code for every
backend, and the text encoder stays in PyTorch (once per task).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import CheckpointError
from ..checkpoint.model_dir import TRT_CACHE_DIR
from ..config import BACKENDS
from ..structures import ImageBatch
from .finite import MaskFn
from .onnx_export import (DETECTOR_FILE, DETECTOR_INPUTS, MASK_HEAD_FILE, MASK_INPUTS, check_graph_digests,
                          check_metadata, model_digest, read_metadata)
from .results import TaskState

logger = logging.getLogger(__name__)

TRT_MISSING = ("TensorRT needs onnxruntime-gpu with the TensorRT execution provider and an NVIDIA GPU; "
               "available providers: {available}")


def trt_cache_dir(directory: Path, digest: str) -> Path:
    """The folder TensorRT engines of the model ``directory`` (weights ``digest``) are cached in,
    created: ``<directory>/trt_cache``, so that the engines travel with the model, or, when that
    cannot be written (a model installed read-only, e.g. in a package's share folder owned by
    root), ``$XDG_CACHE_HOME`` (default ``~/.cache``) ``/toist/trt/<first 16 hex digits of the
    digest>``: building the engines can take minutes, so they must be kept, and the first
    frame must not fail for want of a place to keep them. A clear error naming both places when neither can be written."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates = (directory / TRT_CACHE_DIR, user_cache / "toist" / "trt" / digest[:16])
    problems = []
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # mkdir succeeds on an existing folder and os.access says yes to root on a read-only
            # file system: only writing a file proves the engines can be saved there.
            with tempfile.TemporaryFile(dir=folder):
                pass
            return folder
        except OSError as exc:
            problems.append(f"{folder}: {exc.strerror or exc}")
    raise RuntimeError("backend 'tensorrt' caches the TensorRT engines it builds, and no cache folder can be "
                       "written: " + "; ".join(problems) + " (make one of them writable, or set XDG_CACHE_HOME)")


def auto_device(backend: str, device: torch.device) -> tuple[torch.device, str]:
    """The device ``"auto"`` gives ``backend`` (``device``: what "auto" resolved to), and why when
    it is another: the onnxruntime backend of the CPU-only wheel (what ``make setup`` installs)
    runs on the CPU, where a CUDA device it cannot use is refused (:func:`providers_for`)."""
    if backend != "onnxruntime" or device.type != "cuda":
        return device, ""
    try:
        import onnxruntime as ort
    except ImportError:
        return device, ""   # its own error says what to install
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return device, ""
    return torch.device("cpu"), ("device auto: backend 'onnxruntime' runs on the CPU: this onnxruntime has no "
                                 "CUDAExecutionProvider (install onnxruntime-gpu for CUDA; device cpu silences this)")


def providers_for(backend: str, device: torch.device, directory: Path, digest: str) -> list:
    """ONNX Runtime execution providers (with options) for ``backend`` on ``device``; for
    ``tensorrt`` the engine cache folder (:func:`trt_cache_dir`, weights ``digest``) is created."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    device_id = device.index or 0
    if backend == "tensorrt":
        if "TensorrtExecutionProvider" not in available or device.type != "cuda":
            where = "" if device.type == "cuda" else f" (the segmenter's device is {device}, not CUDA)"
            raise RuntimeError(TRT_MISSING.format(available=", ".join(available)) + where)
        trt = {"device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(trt_cache_dir(directory, digest))}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": device_id}),
                "CPUExecutionProvider"]
    if backend != "onnxruntime":
        raise ValueError(f"backend must be one of {BACKENDS[1:]} for ONNX Runtime, got {backend!r}")
    if device.type == "cuda":
        # The CPU-only onnxruntime wheel ran the graphs on the CPU while the segmenter said cuda.
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"backend 'onnxruntime' on {device}: this onnxruntime has no CUDAExecutionProvider "
                               f"(available: {', '.join(available)}); install onnxruntime-gpu instead of "
                               "onnxruntime, or use device 'cpu'")
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_provider(session, wanted: str, backend: str, path: Path) -> None:
    """Refuse a session that does not run on the provider the backend asked for first."""
    running = session.get_providers()
    if not running or running[0] != wanted:
        raise RuntimeError(f"backend {backend!r}: onnxruntime opened {path.name} on {', '.join(running) or 'nothing'}, "
                           f"not on {wanted}; " + (TRT_MISSING.format(available=", ".join(running))
                                                    if wanted == "TensorrtExecutionProvider" else
                                                    "is the CUDA provider's runtime (CUDA, cuDNN) installed?"))


class OnnxNetwork:
    """The detector and mask-head graphs of a model directory in ONNX Runtime sessions.

    :meth:`detect` takes the segmenter's padded batch and task state and returns what its
    PyTorch path computes: ``pred_logits [B, Q, 256]``, ``pred_boxes [B, Q, 4]`` (on the
    segmenter's device) and a function giving the mask logits of kept queries.
    """

    def __init__(self, directory, backend: str = "onnxruntime", device: torch.device = torch.device("cpu"),
                 threads: Optional[int] = None):
        directory = Path(directory).expanduser()
        detector = directory / DETECTOR_FILE
        if not detector.is_file():
            raise CheckpointError(f"{directory}: no {DETECTOR_FILE}: backend {backend!r} runs the model directory's "
                                  f"ONNX graphs; write them with `toist export --onnx {directory}`")
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeError(f"backend {backend!r} needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu "
                               "for CUDA / TensorRT)") from None
        self.device = device
        self.backend = backend
        check_graph_digests(directory)
        digest = model_digest(directory)
        self.digest = digest  # the weights the graphs were checked against (model.safetensors' SHA-256)
        providers = providers_for(backend, device, directory, digest)
        options = ort.SessionOptions()
        # The same thread count as torch's intra-op pool: the two backends compare like for like.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        self.detector = self._session(ort, detector, options, providers, directory, "detector", digest)
        self.has_masks = read_metadata(self.detector.get_modelmeta().custom_metadata_map).get("masks") == "true"
        self.mask_head = None
        if self.has_masks:
            mask_file = directory / MASK_HEAD_FILE
            if not mask_file.is_file():
                raise CheckpointError(f"{directory}: {DETECTOR_FILE} without {MASK_HEAD_FILE}; run "
                                      f"`toist export --onnx {directory}` again")
            self.mask_head = self._session(ort, mask_file, options, providers, directory, "mask_head", digest)
        self._outputs = [o.name for o in self.detector.get_outputs()]

    def _session(self, ort, path: Path, options, providers: list, directory: Path, graph: str, digest: str):
        # No fallback: onnxruntime would otherwise answer a TensorRT (or CUDA) provider that
        # fails to start, e.g. without the TensorRT libraries, by printing a line and running on
        # the next provider in the list, and the segmenter would call itself tensorrt/fp16
        # while running CUDA fp32, or the CPU.
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers, enable_fallback=0)
        except Exception as exc:
            if wanted == "CPUExecutionProvider":  # the CPU runs any valid graph: the file is damaged
                raise CheckpointError(f"{path}: onnxruntime cannot read it ({type(exc).__name__}: {exc}); the file is "
                                      f"damaged or cut short: run `toist export --onnx {directory}` again") from None
            raise RuntimeError(f"backend {self.backend!r}: onnxruntime could not run {path.name} on {wanted}: "
                               f"{type(exc).__name__}: {exc}") from None
        check_provider(session, wanted, self.backend, path)
        check_metadata(path, read_metadata(session.get_modelmeta().custom_metadata_map), directory, graph, digest)
        return session

    @property
    def providers(self) -> list[str]:
        return self.detector.get_providers()

    @staticmethod
    def task_inputs(state: TaskState) -> dict[str, np.ndarray]:
        """``text [L, 1, d]``, ``text_mask [1, L]``, ``ccr_rows [L]`` and ``centres [K, d]`` of a task
        (no replacement: no rows and one dummy centre)."""
        resized = state.text.resized.detach().float().cpu()
        rows = np.zeros(resized.shape[0], dtype=bool)
        if state.uses_ccr:
            rows[list(state.pronoun_tokens)] = True
            centres = state.centres.detach().float().cpu().numpy()
        else:
            centres = np.zeros((1, resized.shape[-1]), dtype=np.float32)
        return {"text": resized.numpy(), "text_mask": state.text.padding_mask.cpu().numpy().astype(bool),
                "ccr_rows": rows, "centres": np.ascontiguousarray(centres, dtype=np.float32)}

    def detect(self, batch: ImageBatch, state: TaskState) -> tuple[Tensor, Tensor, MaskFn]:
        """``pred_logits [B, Q, 256]``, ``pred_boxes [B, Q, 4]`` and the mask function of a batch."""
        feeds = {"image": np.ascontiguousarray(batch.tensors.detach().float().cpu().numpy()),
                 "pad_mask": batch.mask.cpu().numpy(), **self.task_inputs(state)}
        outputs = dict(zip(self._outputs, self.detector.run(None, {k: feeds[k] for k in DETECTOR_INPUTS})))
        logits = torch.from_numpy(outputs["pred_logits"]).to(self.device)
        boxes = torch.from_numpy(outputs["pred_boxes"]).to(self.device)

        def masks(b: int, keep: Tensor) -> Tensor:
            if self.mask_head is None:
                raise RuntimeError("this model directory's graphs have no mask head (a detection model)")
            mask_feeds = {name: outputs[name][b:b + 1] for name in MASK_INPUTS[:-1]}
            mask_feeds["queries"] = outputs["hs_last"][b:b + 1, keep.cpu().numpy()]
            return torch.from_numpy(self.mask_head.run(None, mask_feeds)[0]).to(self.device)

        return logits, boxes, masks


def open_network(path, backend: str, device: torch.device) -> OnnxNetwork:
    """The ONNX network of a model directory for ``backend``; a clear error for anything else."""
    from ..checkpoint import is_model_dir
    from ..checkpoint.files import refuse_run_folder

    refuse_run_folder(path, purpose="onnx")   # it has a config.yaml too: name what it holds
    if not is_model_dir(path):
        raise CheckpointError(f"{path}: backend {backend!r} runs the ONNX graphs of a model directory; convert the "
                              f"checkpoint first: `toist export {path} <model_dir> --onnx`")
    return OnnxNetwork(path, backend, device)


def load_with_network(path, backend: str, device: torch.device, config=None, text_encoder: Optional[str] = None):
    """(LoadedModel, :class:`OnnxNetwork`) of one export of the model directory ``path``.

    The graphs are opened (and checked against the weights then in the directory) before the
    weights load, so that a directory without usable graphs is refused first. An export
    replacing the directory in between would pair the graphs of one export with the text
    encoder and memory bank of another: then both are read again, as ``load_model_dir`` reads
    a directory replaced while it loads."""
    from ..checkpoint import load_pretrained
    from ..checkpoint.model_dir import LOAD_ATTEMPTS

    for _ in range(LOAD_ATTEMPTS):
        network = open_network(path, backend, device)
        loaded = load_pretrained(path, config=config, text_encoder=text_encoder)
        if model_digest(path) == network.digest:
            return loaded, network
        logger.info("%s was replaced while it loaded (an export to it); reading it again", path)
    raise CheckpointError(f"{path}: replaced while its ONNX graphs and weights loaded, {LOAD_ATTEMPTS} times in a "
                          "row (an export writing to it again and again?); load it when the export is done")


__all__ = ["BACKENDS", "OnnxNetwork", "TRT_CACHE_DIR", "check_provider", "load_with_network", "open_network",
           "providers_for", "trt_cache_dir"]
