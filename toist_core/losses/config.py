"""Coefficients and switches of the detection / segmentation losses and the matcher.

Defaults are the reference's (``main.py`` of MDETR/TOIST): matcher costs class 1, L1 5,
GIoU 2; loss weights L1 5, GIoU 2, CE 1, contrastive 1, mask (focal) 1, dice 1; no-object
weight 0.1; contrastive temperature 0.07; auxiliary losses on the 5 intermediate decoder
layers of a 6-layer decoder.
"""

from __future__ import annotations

from dataclasses import dataclass


# Costs, weights and the focal exponent: a negative one would reward the error it measures.
_NON_NEGATIVE = ("set_cost_class", "set_cost_bbox", "set_cost_giou", "ce_loss_coef", "bbox_loss_coef",
                 "giou_loss_coef", "contrastive_align_loss_coef", "mask_loss_coef", "dice_loss_coef", "eos_coef",
                 "focal_gamma")


@dataclass
class LossConfig:
    # Hungarian matcher costs.
    set_cost_class: float = 1.0  # matcher: class (soft-token) cost
    set_cost_bbox: float = 5.0  # matcher: L1 box cost
    set_cost_giou: float = 2.0  # matcher: GIoU cost
    # Loss weights.
    ce_loss_coef: float = 1.0  # soft-token cross-entropy
    bbox_loss_coef: float = 5.0  # L1 box loss
    giou_loss_coef: float = 2.0  # GIoU loss
    contrastive_align_loss_coef: float = 1.0  # box-token contrastive loss
    mask_loss_coef: float = 1.0  # sigmoid focal mask loss
    dice_loss_coef: float = 1.0  # dice mask loss
    # Weight of the no-object rows in the soft-token cross-entropy.
    eos_coef: float = 0.1
    # Box-token contrastive alignment (needs proj_queries / proj_tokens in the outputs).
    contrastive_align: bool = True
    temperature: float = 0.07  # of the contrastive alignment
    # Mask losses (segmentation model; last decoder layer only).
    masks: bool = False
    focal_alpha: float = 0.25  # mask focal loss alpha (-1 = none)
    focal_gamma: float = 2.0  # mask focal loss gamma
    # Auxiliary losses on the intermediate decoder layers (num_decoder_layers - 1 of them).
    aux_loss: bool = True
    num_decoder_layers: int = 6  # = the model's decoder layers (aux losses on all but the last)

    def __post_init__(self) -> None:
        # Written as `not value >= 0` so that NaN fails as well.
        for name in _NON_NEGATIVE:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.set_cost_class == 0 and self.set_cost_bbox == 0 and self.set_cost_giou == 0:
            raise ValueError("set_cost_class, set_cost_bbox and set_cost_giou are all 0: the matcher needs a cost")
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature!r}")
        if not (0 <= self.focal_alpha <= 1 or self.focal_alpha == -1):
            raise ValueError(f"focal_alpha: must be in [0, 1] or -1, got {self.focal_alpha!r}")
        if self.num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers: must be >= 1, got {self.num_decoder_layers!r}")

    @property
    def num_aux_layers(self) -> int:
        return self.num_decoder_layers - 1 if self.aux_loss else 0
