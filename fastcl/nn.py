"""Drop-in loss modules."""
import math

import torch
from torch import nn

from .info_nce import info_nce


class InfoNCELoss(nn.Module):
    """InfoNCE with a fixed temperature; ``forward(q [B, D], k [N, D], labels=None)``.

    Replaces ``F.cross_entropy(F.normalize(q) @ F.normalize(k).T / t, arange(B))`` without
    materialising the [B, N] logits. See :func:`fastcl.functional.info_nce` for the arguments.
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = False, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.symmetric, self.normalize = temperature, symmetric, normalize
        self.reduction, self.backend = reduction, backend

    def forward(self, q, k, labels=None):
        return info_nce(q, k, temperature=self.temperature, labels=labels, symmetric=self.symmetric,
                        normalize=self.normalize, reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return f"temperature={self.temperature}, symmetric={self.symmetric}, backend={self.backend!r}"


class ClipLoss(nn.Module):
    """Symmetric CLIP loss; ``forward(image [B, D], text [B, D])`` -> scalar.

    With ``learnable=True`` the logit scale is a parameter ``logit_scale`` initialised to
    log(1/init_temperature) and clamped to log(max_scale) in the forward, as in CLIP.
    """

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True,
                 max_scale: float = 100.0, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__()
        value = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("logit_scale", value)
        self.max_log_scale = math.log(max_scale)
        self.normalize, self.reduction, self.backend = normalize, reduction, backend

    def forward(self, image_features, text_features):
        logit_scale = self.logit_scale.clamp(max=self.max_log_scale)
        return info_nce(image_features, text_features, logit_scale=logit_scale.to(image_features.device),
                        symmetric=True, normalize=self.normalize, reduction=self.reduction,
                        backend=self.backend)
