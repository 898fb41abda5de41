"""InfoNCE / CLIP loss on the fused log-sum-exp core.

The only B x N work is the log-sum-exp over the rows (and columns) of S = s * U V^T. It is a
torch custom op (``fastcl::info_nce_lse``) with a custom backward, so it works under autograd
and torch.compile whatever backend computes it. Everything else is O(B*D) torch code shared by
all backends: normalisation, positive logits, reductions.
"""
import torch
from torch import Tensor

from . import _dispatch, _validation, chunked, reference


def _impl(backend: str):
    if backend == "triton":
        from .kernels import info_nce as triton_impl
        return triton_impl
    if backend == "torch":
        return chunked
    raise ValueError(f"no log-sum-exp implementation for backend {backend!r}")


@torch.library.custom_op("fastcl::info_nce_lse", mutates_args=())
def info_nce_lse(u: Tensor, v: Tensor, scale: Tensor, symmetric: bool, backend: str) -> tuple[Tensor, Tensor]:
    """row_lse [B] and (if symmetric) col_lse [N] of S = scale * u @ v.T; col_lse is empty otherwise."""
    return _impl(backend).lse_forward(u, v, scale, symmetric)


@info_nce_lse.register_fake
def _(u, v, scale, symmetric, backend):
    cd = chunked.compute_dtype(u.dtype)
    return u.new_empty(u.shape[0], dtype=cd), v.new_empty(v.shape[0] if symmetric else 0, dtype=cd)


@torch.library.custom_op("fastcl::info_nce_lse_backward", mutates_args=())
def info_nce_lse_backward(u: Tensor, v: Tensor, scale: Tensor, row: Tensor, col: Tensor,
                          g_row: Tensor, g_col: Tensor, symmetric: bool,
                          backend: str) -> tuple[Tensor, Tensor, Tensor]:
    du, dv = _impl(backend).lse_backward(u, v, scale, row, col, g_row, g_col, symmetric)
    # dU_i = s * sum_j G_ij v_j, hence dL/ds = sum_ij G_ij <u_i, v_j> = sum_i <u_i, dU_i> / s:
    # the scale's gradient costs O(B*D) instead of another pass over the tiles.
    dscale = (u.to(du.dtype) * du).sum() / scale.to(du.dtype)
    return du.to(u.dtype), dv.to(v.dtype), dscale.to(scale.dtype)


@info_nce_lse_backward.register_fake
def _(u, v, scale, row, col, g_row, g_col, symmetric, backend):
    return torch.empty_like(u), torch.empty_like(v), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    u, v, scale, symmetric, backend = inputs
    ctx.save_for_backward(u, v, scale, *output)
    ctx.symmetric, ctx.backend = symmetric, backend


def _backward(ctx, g_row, g_col):
    u, v, scale, row, col = ctx.saved_tensors
    g_row = torch.zeros_like(row) if g_row is None else g_row.contiguous()
    if not ctx.symmetric or g_col is None:
        g_col = torch.zeros_like(col)
    du, dv, dscale = torch.ops.fastcl.info_nce_lse_backward(
        u, v, scale, row, col, g_row, g_col.contiguous(), ctx.symmetric, ctx.backend)
    return du, dv, dscale, None, None


info_nce_lse.register_autograd(_backward, setup_context=_setup_context)


def _normalize(x: Tensor) -> Tensor:
    # Norms in (at least) fp32 so fp16 inputs with large entries cannot overflow x*x.
    xc = x.to(chunked.compute_dtype(x.dtype))
    return (xc / xc.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(x.dtype)


def info_nce(q: Tensor, k: Tensor, *, temperature=None, logit_scale=None, labels=None,
             symmetric: bool = False, normalize: bool = True, reduction: str = "mean",
             backend: str = "auto") -> Tensor:
    """InfoNCE (one direction) or CLIP (``symmetric=True``) loss without a B x N buffer.

    Args:
        q: [B, D] queries (float16, bfloat16, float32 or float64).
        k: [N, D] keys, N >= B; rows B..N-1 are extra negatives. Same device and dtype as q.
        temperature: fixed temperature tau (logits = q.k / tau). Default 0.07 if neither
            temperature nor logit_scale is given.
        logit_scale: 1-element tensor, logits = exp(logit_scale) * q.k (CLIP's learnable
            scale); gradients flow to it.
        labels: int64 [B], column of k holding row i's positive (default: i).
        symmetric: CLIP loss, mean of the q->k and k->q cross-entropies; needs N == B and no
            labels. Both directions come from one pass over the tiles.
        normalize: L2-normalise q and k first (gradient flows through the normalisation).
        reduction: "mean" | "sum" | "none" (per-row losses [B]; symmetric: per-pair
            average of the two directions).
        backend: "auto" (triton on CUDA, else torch), "triton", "torch" (chunked pure torch),
            "reference" (naive materialised logits), "cuda" (not built yet).

    Returns:
        The loss, float32 for 16-bit and float32 inputs, float64 for float64 inputs; shape []
        or [B] for reduction="none".
    """
    _validation.check_embeddings(q, k)
    _validation.check_reduction(reduction)
    B, N = q.shape[0], k.shape[0]
    if symmetric:
        if N != B:
            raise ValueError(f"symmetric=True needs as many keys as queries, got B={B}, N={N}")
        if labels is not None:
            raise ValueError("symmetric=True pairs row i with column i; labels are not supported with it")
    if labels is None:
        if N < B:
            raise ValueError(f"k has fewer rows ({N}) than q ({B}): without labels row i's positive "
                             f"is k[i]; pass labels or more keys")
    else:
        _validation.check_labels(labels, B, N, q.device)
    scale = _validation.scale_tensor(temperature, logit_scale, q.device)
    backend = _dispatch.resolve(backend, q.device, q.dtype)

    if backend == "reference":
        return reference.info_nce_reference(
            q, k, temperature=temperature, logit_scale=logit_scale, labels=labels,
            symmetric=symmetric, normalize=normalize, reduction=reduction)

    u, v = (_normalize(q), _normalize(k)) if normalize else (q, k)
    cd = chunked.compute_dtype(q.dtype)
    scale = scale.float()
    row, col = torch.ops.fastcl.info_nce_lse(u, v, scale, symmetric, backend)
    v_pos = v if labels is None and N == B else v[labels if labels is not None else slice(0, B)]
    pos = (u.to(cd) * v_pos.to(cd)).sum(dim=1) * scale.to(cd)
    per = row - pos
    if symmetric:
        per = 0.5 * (per + (col - pos))  # labels is None and N == B: column j's positive is S_jj
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per
