"""The contrastive loss family on the fused core (``fastcl::info_nce_rows``).

Each loss is one or two calls of the same tiled log-sum-exp op with different exclusions and
positives. None of them forks the tile math. Only O(N*D) terms are added in torch.
"""
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch, _validation, reference
from ._common import reduce
from .info_nce import info_nce, pair_logit, prepare, row_terms


def check_views(z1, z2, min_pairs=1):
    _validation.check_embeddings(z1, z2, "z1", "z2")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be two views of the same batch (same shape), "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < min_pairs:
        raise ValueError(f"this loss needs at least {min_pairs} pairs (its negatives would be "
                         f"empty), got {z1.shape[0]}")


def _partner(n, device):
    """Index of each of the 2N stacked views' other view: [n..2n-1, 0..n-1]."""
    return torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(device)


def settings(a, temperature, reduction, normalize):
    """The loss's scale tensor and normalize flag, checked before any backend (the reference's
    too) runs."""
    _validation.check_reduction(reduction)
    normalize = _validation.check_bool(normalize, "normalize")
    # No None here: these losses have no logit_scale= alternative, and their defaults differ
    # from info_nce's 0.07 that scale_tensor would substitute.
    _validation.positive_number(temperature, "temperature")
    return _validation.scale_tensor(temperature, None, a.device, a.dtype), normalize


def _setup(a, temperature, reduction, backend, normalize):
    """settings(), and the backend."""
    scale, normalize = settings(a, temperature, reduction, normalize)
    return scale, _dispatch.resolve(backend, a.device, a.dtype), normalize


def local_keys(x: Tensor) -> Tensor:
    """The keys of one process: its own rows. (fastcl.distributed's hook returns them first,
    then every other rank's, so that a row's self and partner keep their local indices.)"""
    return x


def nt_xent_rows(u: Tensor, scale: Tensor, backend: str, keys=local_keys) -> Tensor:
    """Per-anchor NT-Xent [2n] of the stacked views u = [u1; u2] ([2n, D], as the loss sees
    them) against keys(u): each anchor's positive is its other view, itself excluded."""
    n = u.shape[0] // 2
    per, _ = row_terms(u, keys(u), scale, backend, labels=_partner(n, u.device), exclude_diag=True)
    return per


def nt_xent(z1: Tensor, z2: Tensor, *, temperature: float = 0.5, normalize: bool = True,
            reduction: str = "mean", backend: str = "auto") -> Tensor:
    """SimCLR's NT-Xent over 2N views, without a 2N x 2N buffer.

    z1, z2: [N, D], two views of N samples. For each of the 2N vectors, its positive is the
    other view of the same sample and its negatives are the 2N-2 other vectors (itself
    excluded). Returns the mean over the 2N anchors (reduction="none": [2N], z1's rows
    first). Equal to lightly's and pytorch-metric-learning's NTXentLoss.

    Args:
        temperature: logits are cosine similarity / temperature (a Python float > 0).
        normalize: L2-normalise z1, z2 first (False: use them as given, dot products).
        reduction: "mean" (a 0-dim fp32/fp64 tensor), "sum", or "none" ([2N]).
        backend: "auto" | "triton" | "cuda" | "torch" | "reference", as in
            :func:`fastcl.functional.info_nce`.
    """
    check_views(z1, z2)
    scale, backend, normalize = _setup(z1, temperature, reduction, backend, normalize)
    if backend == "reference":
        return reference.nt_xent_reference(z1, z2, temperature=temperature, normalize=normalize,
                                           reduction=reduction)
    u, scale = prepare(scale, normalize, torch.cat([z1, z2]))
    return reduce(nt_xent_rows(u, scale, backend), reduction)


def dcl_weights(z1: Tensor, z2: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's weights w [N] (in the views' dtype), w_i = 2 - N softmax_i(<u1_i, u2_i> / sigma),
    of two views z1, z2 [N, D] of the same batch, normalised here. The weights have mean 1."""
    check_views(z1, z2)
    sigma = _validation.positive_number(sigma, "sigma")
    return reference.vmf_weights(F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), sigma)


WeightArg = Union[None, str, Tensor, Callable[[Tensor, Tensor], Tensor]]


def dcl(z1: Tensor, z2: Tensor, *, temperature: float = 0.1, weight: WeightArg = None,
        sigma: float = 0.5, detach_weight: bool = True, negatives: str = "joint",
        normalize: bool = True, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Decoupled Contrastive Learning (Yeh et al.): the positive leaves the denominator.

    For anchor i in view k, with s = 1/temperature:
      L_i^k = -w_i s <z_i^1, z_i^2> + log sum_{l in {1,2}} sum_{j != i} exp(s <z_i^k, z_j^l>)
    and the loss is the mean over the 2N anchors (reduction="none": [2N], view 1 first).

    Args:
        z1, z2: [N, D] two views; N >= 2 (there must be negatives).
        weight: None (DCL, w = 1); "vmf" (DCLW: w = 2 - N softmax(<z1_i, z2_i> / sigma));
            a tensor [N]; or a callable (z1n, z2n) -> [N] on the views as the loss sees them
            (normalised when normalize=True), called as
            weight(z1n, z2n) for view 1's anchors and weight(z2n, z1n) for view 2's (lightly's
            ``weight_fn`` convention).
        detach_weight: treat w as a constant, as lightly and the paper's code do. With False,
            the gradient also flows through w (a "vmf" w depends on the positives' similarity).
        negatives: "joint" is the formula above (one log-sum-exp over the 2N-2 negatives), as
            in the paper and lightly 1.6's DCLLoss. "split" is the definition of older lightly
            releases: log-sum-exp over the N-1 same-view negatives plus log-sum-exp over the
            N-1 cross-view negatives.
    """
    check_views(z1, z2, min_pairs=2)
    if negatives not in ("joint", "split"):
        raise ValueError(f"negatives must be 'joint' or 'split', got {negatives!r}")
    scale, backend, normalize = _setup(z1, temperature, reduction, backend, normalize)
    n = z1.shape[0]
    if backend == "reference":
        n1, n2 = (F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)) if normalize else (z1, z2)
        w1, w2 = dcl_weights_for(n1, n2, weight, sigma, detach_weight)
        return reference.dcl_reference(z1, z2, temperature=temperature,
                                       weight=None if w1 is None else torch.cat([w1, w2]),
                                       negatives=negatives, normalize=normalize, reduction=reduction)

    u, scale = prepare(scale, normalize, torch.cat([z1, z2]))
    w1, w2 = dcl_weights_for(u[:n], u[n:], weight, sigma, detach_weight)  # the views as the loss sees them
    return reduce(dcl_rows(u, scale, backend, negatives, w1, w2), reduction)


def dcl_rows(u: Tensor, scale: Tensor, backend: str, negatives: str, w1: Optional[Tensor],
             w2: Optional[Tensor], keys=local_keys) -> Tensor:
    """Per-anchor DCL [2n] of the stacked views u = [u1; u2] ([2n, D]) against keys(...) of
    the views, with positive weights w1, w2 ([n] each, or None: 1)."""
    n = u.shape[0] // 2
    u1, u2 = u[:n], u[n:]
    if negatives == "joint":
        # row_loss = lse over the negatives - S(anchor, partner)
        per, _ = row_terms(u, keys(u), scale, backend, labels=_partner(n, u.device), exclude_diag=True,
                           exclude_pos=True)
    else:
        parts, k1, k2 = [], keys(u1), keys(u2)
        for a, ka, kb in ((u1, k1, k2), (u2, k2, k1)):
            # lse over same-view others - S_ii (self), and lse over other-view non-partners - S_ii'.
            same, _ = row_terms(a, ka, scale, backend, exclude_diag=True)
            cross, _ = row_terms(a, kb, scale, backend, exclude_pos=True)
            parts.append(same + pair_logit(a, a, scale) + cross)  # add the self logit back
        per = torch.cat(parts)
    if w1 is not None:  # -w * pos = -pos + (1 - w) * pos
        pos = pair_logit(u, torch.cat([u2, u1]), scale)
        per = per + (1 - torch.cat([w1, w2]).to(per.dtype)) * pos
    return per


def check_dcl_weight(weight, sigma, detach, n, device):
    """The weight argument's checks that need no views (a callable's result is checked once
    called); returns detach as a bool."""
    detach = _validation.check_bool(detach, "detach_weight")
    if isinstance(weight, str):
        if weight != "vmf":
            raise ValueError(f"weight must be None, 'vmf', a tensor or a callable, got {weight!r}")
        _validation.positive_number(sigma, "sigma")
    elif isinstance(weight, Tensor):
        _check_weights(weight, n, device)
    elif not (weight is None or callable(weight)):
        raise TypeError(f"weight must be None, 'vmf', a tensor or a callable, got {type(weight).__name__}")
    return detach


def _check_weights(w, n, device):
    if not isinstance(w, Tensor) or w.shape != (n,):
        raise ValueError(f"DCL weights must be a tensor of shape [{n}], got "
                         f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"DCL weights must be a floating tensor, got {w.dtype}")
    if w.device != device:
        raise ValueError(f"DCL weights must be on the features' device {device}, got {w.device}")


def dcl_weights_for(n1, n2, weight, sigma, detach, keys=local_keys):
    """Per-anchor weights (view 1's, view 2's) from the views as the loss sees them. "vmf"'s
    softmax runs over keys(similarities): every rank's pairs under torch.distributed, its own
    first. A callable sees this process's views only (lightly's convention)."""
    detach = check_dcl_weight(weight, sigma, detach, n1.shape[0], n1.device)
    if weight is None:
        return None, None
    if isinstance(weight, str):
        # <u1_i, u2_i> is symmetric: both views' anchors get the same weights
        w1 = w2 = reference.vmf_weights_of(keys((n1 * n2).sum(-1)), sigma)[: n1.shape[0]]
    elif isinstance(weight, Tensor):
        w1 = w2 = weight
    else:
        w1, w2 = weight(n1, n2), weight(n2, n1)
        for w in (w1, w2):
            _check_weights(w, n1.shape[0], n1.device)
    return (w1.detach(), w2.detach()) if detach else (w1, w2)


def supcon(features: Tensor, labels: Optional[Tensor] = None, *, temperature: float = 0.1,
           normalize: bool = True, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Supervised contrastive loss (Khosla et al.), multi-positive, without a B x B mask.

    features: [B, D], or [B, V, D] for V views per sample (flattened view by view, as in
    Khosla's code: all first views, then all second views, ...).
    labels: int [B] class ids; positives of an anchor are all OTHER vectors with its class
    (compared inside the tile). Default: the views of the same sample (needs V >= 2).
    L_i = log sum_{a != i} exp(S_ia) - mean_{p in P(i)} S_ip, with S = cosine / temperature
    (dot products with normalize=False); anchors with no positive are left out of the mean
    (reduction="none": [B * V], view by view, with 0 for them; if no anchor has a positive the
    mean is 0, with zero gradients).
    reduction: "mean" | "sum" | "none". backend: as in :func:`fastcl.functional.info_nce`.
    """
    flat, labels, views = supcon_inputs(features, labels)
    cls = labels.repeat(views)
    scale, backend, normalize = _setup(flat, temperature, reduction, backend, normalize)
    if backend == "reference":
        return reference.supcon_reference(flat, cls, temperature=temperature, normalize=normalize,
                                          reduction=reduction)
    u, scale = prepare(scale, normalize, flat)
    per, has_positive = supcon_rows(u, cls, scale, backend)
    return reduce(per, reduction, has_positive)


def supcon_inputs(features, labels):
    """(features flattened view by view [B * V, D], labels [B]: the given ones, checked, or
    arange(B), the sample ids, when None; V)."""
    if not isinstance(features, Tensor) or features.dim() not in (2, 3):
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a tensor [B, D] or [B, V, D], got {got}")
    B = features.shape[0]
    views = features.shape[1] if features.dim() == 3 else 1
    if views < 1:
        raise ValueError(f"features [B, V, D] has V = 0 views (shape {tuple(features.shape)})")
    if labels is None:
        if views < 2:
            raise ValueError("supcon without labels needs several views per sample ([B, V, D], V >= 2)")
        labels = torch.arange(B, device=features.device)
    flat = torch.cat(features.unbind(1)) if features.dim() == 3 else features
    _validation.check_embeddings(flat, flat, "features", "features")
    _validation.check_class_ids(labels, B, features.device)
    return flat, labels, views


def supcon_rows(u: Tensor, cls: Tensor, scale: Tensor, backend: str, keys=local_keys):
    """Per-anchor SupCon [M] of u [M, D] with class ids cls [M] against keys(u), keys(cls), and
    whether each anchor has a positive (the others are left out of the mean)."""
    per, _, positives = row_terms(u, keys(u), scale, backend, row_cls=cls, col_cls=keys(cls),
                                  exclude_diag=True, with_counts=True)
    return per, positives > 0


def multiple_negatives_ranking(anchor: Tensor, positive: Tensor, negatives: Optional[Tensor] = None, *,
                               scale: float = 20.0, reduction: str = "mean",
                               backend: str = "auto") -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss, fused.

    anchor, positive: [B, D]. negatives: [B, M, D] hard negatives (M per anchor) or a shared
    pool [P, D]. Every anchor is scored (cosine x scale) against all positives and all
    negatives of the batch; its target is its own positive.
    scale: the cosine similarities' multiplier (sentence-transformers' 20; 1 / temperature).
    reduction: "mean" (0-dim), "sum", or "none" ([B], one value per anchor).
    backend: as in :func:`fastcl.functional.info_nce`.
    """
    cands = mnrl_candidates(anchor, positive, negatives)
    scale = _validation.positive_number(scale, "scale")
    return info_nce(anchor, cands, temperature=1.0 / scale, reduction=reduction, backend=backend)


def mnrl_candidates(anchor: Tensor, positive: Tensor, negatives: Optional[Tensor]) -> Tensor:
    """MNRL's checked candidates [B + B*M or B + P, D]: the positives (anchor i's target is
    row i), then the negatives, hard ones (negatives [B, M, D]) negative by negative."""
    _validation.check_embeddings(anchor, positive, "anchor", "positive")
    if anchor.shape != positive.shape:
        raise ValueError(f"anchor and positive must have the same shape, got {tuple(anchor.shape)} "
                         f"and {tuple(positive.shape)}")
    cands = positive
    if negatives is not None:
        if not isinstance(negatives, Tensor):
            raise TypeError(f"negatives must be a tensor [B, M, D] or [P, D], got {type(negatives).__name__} "
                            f"(stack a list of [B, D] tensors with torch.stack(negs, dim=1))")
        if negatives.dim() == 3:
            if negatives.shape[0] != anchor.shape[0]:
                raise ValueError(f"negatives [B, M, D] must have B={anchor.shape[0]}, got {tuple(negatives.shape)}")
            negatives = negatives.transpose(0, 1).reshape(-1, negatives.shape[-1])
        _validation.check_embeddings(anchor, negatives, "anchor", "negatives")
        cands = torch.cat([positive, negatives])
    return cands
