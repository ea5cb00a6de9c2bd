"""Binary focal loss (PENet, gamma 2) and plain BCE, on logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from volttl.errors import VolttlError


def binary_focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma log p_t; gamma 0 is BCE."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = torch.exp(-bce)
    return ((1 - p_t) ** gamma * bce).mean()


def make_loss(name: str, gamma: float = 2.0):
    if name == "focal":
        return lambda logits, y: binary_focal_loss(logits, y, gamma)
    if name == "bce":
        return lambda logits, y: F.binary_cross_entropy_with_logits(logits, y)
    raise VolttlError(f"train.loss '{name}' is not one of focal, bce")
