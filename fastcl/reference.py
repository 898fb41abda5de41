"""Naive, materialised reference implementations: the test oracle (use float64 inputs).

Written independently of the fused path (plain logits + F.cross_entropy) so that the tests
compare two different computations, not one with itself.
"""
import torch
import torch.nn.functional as F


def info_nce_reference(q, k, *, temperature=None, logit_scale=None, labels=None, symmetric=False,
                       normalize=True, reduction="mean"):
    """InfoNCE on the full [B, N] logits matrix; differentiable through torch autograd."""
    if normalize:
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
    if logit_scale is not None:
        scale = logit_scale.reshape(()).exp().to(q.dtype)
    else:
        scale = 1.0 / (0.07 if temperature is None else temperature)
    logits = scale * (q @ k.T)
    B = q.shape[0]
    if labels is None:
        labels = torch.arange(B, device=q.device)
    if not symmetric:
        return F.cross_entropy(logits, labels, reduction=reduction)
    per = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                 + F.cross_entropy(logits.T, labels, reduction="none"))
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
