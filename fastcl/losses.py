"""The contrastive loss family on the fused core (``fastcl::info_nce_rows``).

Each loss is one or two calls of the same tiled log-sum-exp op with different exclusions and
positives (MNRL's variants: one per block of candidates). None of them forks the tile math.
Only O(N*D) terms are added in torch.
"""
import numbers
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch, _validation, reference
from .chunked import compute_dtype
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
    if backend == "reference":
        n1, n2 = (F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)) if normalize else (z1, z2)
        w1, w2 = dcl_weights_for(n1, n2, weight, sigma, detach_weight)
        return reference.dcl_reference(z1, z2, temperature=temperature,
                                       # in the input dtype, as naive torch's (the vMF weights
                                       # come in fp32 at least; a tensor's dtype would promote)
                                       weight=None if w1 is None else torch.cat([w1, w2]).to(z1.dtype),
                                       negatives=negatives, normalize=normalize, reduction=reduction)

    u1, u2, scale = prepare(scale, normalize, z1, z2)
    w1, w2 = dcl_weights_for(u1, u2, weight, sigma, detach_weight)  # the views as the loss sees them
    return reduce(dcl_rows(u1, u2, scale, backend, negatives, w1, w2), reduction)


def dcl_rows(u1: Tensor, u2: Tensor, scale: Tensor, backend: str, negatives: str, w1: Optional[Tensor],
             w2: Optional[Tensor], keys=local_keys) -> Tensor:
    """Per-anchor DCL [2n] of the views u1, u2 ([n, D] each; view 1's anchors first) against
    keys(...) of the views, with positive weights w1, w2 ([n] each, or None: 1). "split" takes
    keys of each view on its own (across ranks: a view that needs no gradient anywhere is
    gathered without a backward)."""
    n = u1.shape[0]
    if negatives == "joint":
        # row_loss = lse over the negatives - S(anchor, partner)
        u = torch.cat([u1, u2])
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
        pos = pair_logit(torch.cat([u1, u2]), torch.cat([u2, u1]), scale)
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
        # <u1_i, u2_i> is symmetric: both views' anchors get the same weights. In fp32 at least
        # (the statistics' dtype): fp16's similarity / sigma overflowed to a NaN softmax.
        cd = compute_dtype(n1.dtype)
        w1 = w2 = reference.vmf_weights_of(keys((n1.to(cd) * n2.to(cd)).sum(-1)), sigma)[: n1.shape[0]]
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


MNRL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")


def mnrl_penalty(hardness_mode, alpha):
    """(hardness_mode, strength) as they act: both, or (None, 0.0) where either is missing.
    (alpha compared with a float: a symbolic alpha under torch.compile has no bool.)"""
    return (hardness_mode, alpha) if hardness_mode is not None and alpha != 0.0 else (None, 0.0)


def mnrl_options(directions, partition_mode, hardness_mode, hardness_strength):
    """sentence-transformers' MNRL variant options, checked by its rules: (the directions in
    MNRL_DIRECTIONS' order without repeats, partition_mode, and the hardness mode and strength
    (a float) as they act, see mnrl_penalty). A mode without a strength, or a strength without
    a mode, warns: it applies no penalty."""
    if isinstance(directions, str) or not hasattr(directions, "__iter__"):
        raise TypeError(f"directions must be a tuple of direction names, e.g. ('query_to_doc',), got "
                        f"{directions!r}")
    given = tuple(directions)
    unknown = [d for d in given if d not in MNRL_DIRECTIONS]
    if not given or unknown:
        raise ValueError(f"directions must be a non-empty tuple of {MNRL_DIRECTIONS}, got {given!r}")
    if "query_to_doc" not in given:
        raise ValueError("directions must include 'query_to_doc' (it holds the positive pair)")
    directions = tuple(d for d in MNRL_DIRECTIONS if d in given)
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
    if partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
        # sentence-transformers' rule: their candidates never hold the positive, so a softmax of
        # their own would reward nothing (its loss goes negative).
        raise ValueError("partition_mode='per_direction' needs every direction to hold the positive pair; "
                         "'query_to_query' and 'doc_to_doc' do not: use partition_mode='joint'")
    if hardness_mode is not None and hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be None or one of {HARDNESS_MODES}, got {hardness_mode!r}")
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, numbers.Real) \
            or not 0.0 <= float(hardness_strength) <= _validation.FLOAT_MAX:
        raise ValueError(f"hardness_strength must be a finite number >= 0, got {hardness_strength!r}")
    alpha = float(hardness_strength)
    # (written so that a symbolic alpha under torch.compile is compared with floats only)
    if (alpha != 0.0) if hardness_mode is None else (alpha == 0.0):
        if not torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn
            warnings.warn(f"hardness_mode={hardness_mode!r} with hardness_strength={alpha}: no hardness "
                          f"penalty is applied (it needs both a mode and a strength > 0)", stacklevel=3)
    return (directions, partition_mode, *mnrl_penalty(hardness_mode, alpha))


def multiple_negatives_ranking(anchor: Tensor, positive: Tensor, negatives: Optional[Tensor] = None, *,
                               scale: float = 20.0, directions=("query_to_doc",), partition_mode: str = "joint",
                               hardness_mode: Optional[str] = None, hardness_strength: float = 0.0,
                               reduction: str = "mean", backend: str = "auto") -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss, fused, with its variants.

    anchor (the queries q), positive (the documents p): [B, D]. negatives: [B, M, D] hard
    negatives (M per anchor, anchor i's own ones in row i) or a shared pool [P, D], owned by
    no anchor (a 2-D tensor is always a pool here, P == B included: one column of hard
    negatives is negatives[:, None]). With c the cosine similarity and s = scale, anchor i's loss is
    log Z_i - s c(q_i, p_i), Z_i summing exp(logit) over the candidates of its directions:
      "query_to_doc": q_i against every document (all positives and negatives); always on.
      "query_to_query": q_i against the other queries.
      "doc_to_query": p_i against every query.
      "doc_to_doc": p_i against the documents of the other anchors (its own, p_i and its hard
      negatives, left out; the pool kept).
    partition_mode="joint": one log-sum-exp over all of them; "per_direction": the mean of each
    direction's log-sum-exp (only for query_to_doc and doc_to_query, sentence-transformers'
    MultipleNegativesSymmetricRankingLoss).
    hardness_mode (Lan et al. 2025) with hardness_strength a > 0 adds a * c (a constant for the
    gradient) to query_to_doc's logits of "in_batch_negatives" (every document not anchor i's
    own, the pool included), "hard_negatives" (anchor i's own hard negatives) or
    "all_negatives" (all but p_i).
    No [B, B(1+M)] matrix is built: each set is a fused log-sum-exp over blocks of documents.
    reduction: "mean" (0-dim), "sum", or "none" ([B], one value per anchor).
    backend: as in :func:`fastcl.functional.info_nce`.
    """
    opts = mnrl_options(directions, partition_mode, hardness_mode, hardness_strength)
    hard, pool = mnrl_inputs(anchor, positive, negatives)
    scale = check_mnrl_scale(scale, opts[3], anchor.dtype)  # before the InfoNCE pass, whose words are a temperature's
    symmetric = mnrl_as_info_nce(opts, hard is not None, pool is not None)
    if symmetric is not None:  # one fused pass
        return info_nce(anchor, mnrl_candidates(positive, hard, pool), temperature=1.0 / scale,
                        symmetric=symmetric, reduction=reduction, backend=backend)
    _validation.check_reduction(reduction)
    backend = _dispatch.resolve(backend, anchor.device, anchor.dtype)
    if backend == "reference":
        return reference.mnrl_reference(anchor, positive, negatives, scale=scale, directions=opts[0],
                                        partition_mode=opts[1], hardness_mode=opts[2],
                                        hardness_strength=opts[3], reduction=reduction)
    s, sp = mnrl_scales(scale, opts[3], anchor.device, anchor.dtype)
    return reduce(mnrl_rows(*mnrl_normalized(anchor, positive, hard, pool), s, sp, opts, backend), reduction)


def check_mnrl_scale(scale, alpha: float = 0.0, dtype=torch.float64) -> float:
    """MNRL's scale as a float, checked in MNRL's terms (the InfoNCE and the variants behind it
    name a temperature, 1 / scale, that the caller never gave): a positive number whose
    reciprocal is finite, and with alpha (the hardness strength that acts) such that scale +
    alpha is at most _validation.max_scale(dtype) (the logits', in the kernels' log2 units).
    The modules check with float64, the loosest, before their dtype is known."""
    scale = _validation.positive_number(scale, "scale")
    limit = _validation.max_scale(dtype)
    got = (lambda v: "") if _validation._compiling() else (lambda v: f", got {v:g}")
    if not scale + alpha <= limit:
        what = "scale + hardness_strength, the penalised logits' multiplier," if alpha else "scale"
        raise ValueError(f"{what} must be at most {limit:.3g} for {dtype} inputs{got(scale + alpha)}")
    if not 1.0 / scale <= _validation.FLOAT_MAX:
        raise ValueError(f"scale must be at least {1.0 / _validation.FLOAT_MAX!r} (its reciprocal, the "
                         f"temperature, finite){got(scale)}")
    return scale


def mnrl_scales(scale: float, alpha: float, device, dtype):
    """(s, s + alpha) as 0-dim tensors: the multipliers of the plain and the penalised logits of
    the variants, from a scale that check_mnrl_scale passed."""
    return tuple(_validation.scale_tensor(1.0 / m, None, device, dtype) for m in (scale, scale + alpha))


def mnrl_as_info_nce(opts, has_hard: bool, has_pool: bool) -> Optional[bool]:
    """The InfoNCE that MNRL with these options (from mnrl_options) equals, if any: symmetric=False
    for the plain loss (InfoNCE on [positives; negatives]), True for the symmetric one on pairs
    (query_to_doc and doc_to_query per_direction, no negatives: the CLIP loss); None for the
    others. A hardness penalty makes a variant, but "hard_negatives" penalises nothing without
    hard negatives."""
    directions, partition_mode, hardness_mode, alpha = opts
    if alpha and (has_hard or hardness_mode != "hard_negatives"):
        return None
    if directions == ("query_to_doc",):
        return False
    if directions == ("query_to_doc", "doc_to_query") and partition_mode == "per_direction" \
            and not (has_hard or has_pool):
        return True
    return None


def mnrl_normalized(anchor, positive, hard, pool):
    """(q, p, hard, pool) L2-normalised (hard [M, B, D] and pool may be None)."""
    rest = [x.reshape(-1, x.shape[-1]) for x in (hard, pool) if x is not None]
    out = prepare(anchor.new_ones(()), True, anchor, positive, *rest)[:-1]  # (no list.pop: torch 2.4's Dynamo)
    if hard is not None:
        hard = out[2].reshape(hard.shape)
    return out[0], out[1], hard, (out[-1] if pool is not None else None)


def mnrl_inputs(anchor: Tensor, positive: Tensor, negatives: Optional[Tensor]):
    """MNRL's checked inputs: (hard negatives [M, B, D] negative by negative, or None; the
    pool [P, D], or None)."""
    _validation.check_embeddings(anchor, positive, "anchor", "positive")
    if anchor.shape != positive.shape:
        raise ValueError(f"anchor and positive must have the same shape, got {tuple(anchor.shape)} "
                         f"and {tuple(positive.shape)}")
    if negatives is None:
        return None, None
    if not isinstance(negatives, Tensor):
        raise TypeError(f"negatives must be a tensor [B, M, D] or [P, D], got {type(negatives).__name__} "
                        f"(stack a list of [B, D] tensors with torch.stack(negs, dim=1))")
    if negatives.dim() != 3:
        _validation.check_embeddings(anchor, negatives, "anchor", "negatives")
        return None, negatives
    if negatives.shape[0] != anchor.shape[0]:
        raise ValueError(f"negatives [B, M, D] must have B={anchor.shape[0]}, got {tuple(negatives.shape)}")
    hard = negatives.transpose(0, 1)
    _validation.check_embeddings(anchor, hard.reshape(-1, hard.shape[-1]), "anchor", "negatives")
    return hard, None


def mnrl_candidates(positive: Tensor, hard: Optional[Tensor], pool: Optional[Tensor]) -> Tensor:
    """The plain MNRL's candidates [B + B*M or B + P, D]: the positives (anchor i's target is
    row i), then the negatives, hard ones negative by negative."""
    rest = [x.reshape(-1, x.shape[-1]) for x in (hard, pool) if x is not None]
    return torch.cat([positive] + rest) if rest else positive


def _lse(u: Tensor, v: Tensor, scale: Tensor, backend: str, exclude_diag: bool = False) -> Tensor:
    """log sum_j exp(scale <u_i, v_j>) per row [b] from the fused op (column i left out with
    exclude_diag); -inf for a row left with no column."""
    if v.shape[0] == 0 or (exclude_diag and v.shape[0] == 1):
        return torch.full((u.shape[0],), float("-inf"), dtype=scale.dtype, device=u.device)
    no_positive = torch.full((u.shape[0],), -1, dtype=torch.long, device=u.device)  # the term is the LSE
    return row_terms(u, v, scale, backend, labels=no_positive, exclude_diag=exclude_diag)[0]


def _penalised(x: Tensor, s: Tensor, sp: Tensor) -> Tensor:
    """x, a log-sum-exp of logits sp * c, with the gradient of logits s * c + a * c.detach()
    (sp = s + a): sentence-transformers' hardness penalty, a constant for the gradient, scales
    each logit's softmax gradient by s / sp. A -inf x (no column) stays -inf."""
    f = s / sp
    # where: -inf * (1 - f) is NaN when f rounds to 1 (a tiny strength)
    return torch.where(torch.isneginf(x), x, x * f + x.detach() * (1 - f))


def mnrl_rows(q: Tensor, p: Tensor, hard: Optional[Tensor], pool: Optional[Tensor], s: Tensor, sp: Tensor,
              opts, backend: str, keys=local_keys, pool_keys=local_keys) -> Tensor:
    """Per-anchor loss [b] of the MNRL variants (see multiple_negatives_ranking) from normalised
    q, p [b, D], hard negatives [M, b, D] or None, a pool [P, D] or None, and the multipliers s
    and sp = s + hardness strength (0-dim, compute dtype). keys(x [b, D]) gives the block's rows
    of every process, this one's first (so anchor i's own document stays column i);
    pool_keys(pool) every process's pool. Each candidate set is a fused log-sum-exp over whole
    blocks, with at most the diagonal (anchor i's own document) left out of the tiles and
    added as an O(b*D) term; log Z merges them, each part taken relative to the positive's
    logit."""
    directions, partition_mode, hardness_mode, alpha = opts
    # Every part is kept relative to the positive's logit pos = s c(q_i, p_i): log Z - pos of a
    # nearly solved row is then a small number computed as such, not a difference of two large
    # ones (the plain loss's precision).
    pos = pair_logit(q, p, s)
    blocks = [p] + ([] if hard is None else list(hard.unbind(0)))
    K = [keys(x) for x in blocks]
    Kpool = [] if pool is None else [pool_keys(pool)]
    parts = {"query_to_doc": []}
    diag = torch.arange(q.shape[0], device=q.device)  # anchor i's own column in every block
    whole = {False: [], True: []}  # blocks taken whole, without and with the penalty
    if not alpha:
        whole[False] = K + Kpool
    else:
        # Which logits carry the penalty, per block: its off-diagonal (other anchors' documents)
        # and its diagonal (anchor i's own: block 0 is the positive, blocks 1.. its hard negatives).
        off = hardness_mode != "hard_negatives"
        for k, (x, kx) in enumerate(zip(blocks, K)):
            own = k > 0 and hardness_mode != "in_batch_negatives"
            if off == own:
                whole[off].append(kx)
                continue
            lse = _lse(q, kx, sp if off else s, backend, exclude_diag=True)
            if k == 0:  # the diagonal is the positive itself: its part, s c_ii - pos, is 0
                # A constant: as s c - pos, its gradient s p_i - s p_i (weight ~1 on a solved row)
                # cancelled to rounding, the size of the other parts' e^-gap terms, and at scale 50
                # q's gradient came out 0 where naive fp32 keeps it.
                diag_part = torch.zeros_like(pos)
            else:
                c = (q.to(s.dtype) * x.to(s.dtype)).sum(1)
                diag_part = (s * c + alpha * c.detach() if own else s * c) - pos
            parts["query_to_doc"] += [(_penalised(lse, s, sp) if off else lse) - pos, diag_part]
        whole[off] += Kpool
    for pen, ks in whole.items():
        if not ks:
            continue
        if ks[0] is K[0]:  # the positives first (never penalised): lse - pos from the op itself
            parts["query_to_doc"].append(row_terms(q, torch.cat(ks), s, backend, labels=diag)[0])
        else:
            lse = _lse(q, torch.cat(ks), sp if pen else s, backend)
            parts["query_to_doc"].append((_penalised(lse, s, sp) if pen else lse) - pos)
    if "query_to_query" in directions or "doc_to_query" in directions:
        Kq = keys(q)
    if "query_to_query" in directions:
        parts["query_to_query"] = [_lse(q, Kq, s, backend, exclude_diag=True) - pos]
    if "doc_to_query" in directions:
        parts["doc_to_query"] = [row_terms(p, Kq, s, backend, labels=diag)[0]]  # its column i: pos
    if "doc_to_doc" in directions:
        parts["doc_to_doc"] = [_lse(p, kx, s, backend, exclude_diag=True) - pos for kx in K] + \
            [_lse(p, kp, s, backend) - pos for kp in Kpool]
    # Merged in float64 (O(b) per part): on a nearly solved row the parts' weights w sum to 1,
    # and pos's gradient, -sum(w) * d pos, cancels the lse terms' sum(w * d lse) down to the
    # e^-gap terms; fp32 weights left an error of ~u * s there (scale 100: up to 9x naive fp32's
    # gradient error, scale 1000: 90x).
    wide = pos.dtype if pos.device.type == "mps" else torch.float64  # (MPS has no float64)
    parts = {d: [t.to(wide) for t in ts] for d, ts in parts.items()}
    if partition_mode == "joint":
        out = torch.logsumexp(torch.stack([t for ts in parts.values() for t in ts]), dim=0)
    else:
        out = torch.stack([torch.logsumexp(torch.stack(ts), dim=0) for ts in parts.values()]).mean(0)
    return out.to(pos.dtype)
