"""Small helpers shared by the fused ops and the references."""
from typing import Optional

import torch
from torch import Tensor


def reduce(per: Tensor, reduction: str, valid: Optional[Tensor] = None) -> Tensor:
    """mean / sum / none over per-row losses; rows where valid is False count for nothing."""
    if valid is not None:
        per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "mean":
        return per.sum() / valid.sum().clamp_min(1) if valid is not None else per.mean()
    if reduction == "sum":
        return per.sum()
    return per
