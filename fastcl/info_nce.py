"""InfoNCE / CLIP loss on the fused log-sum-exp core.

The only B x N work is the log-sum-exp over the rows (and columns) of S = s * U V^T and its
backward. It sits in a torch custom op (``fastcl::info_nce_rows``) with a custom backward, so
it works under autograd and torch.compile whatever backend computes it. Everything else is
O(B*D) torch code shared by all backends: normalisation, positive logits, reductions.
"""
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import _dispatch, _validation, chunked, reference
from ._common import no_autocast, reduce, refuse_func_transforms


def _impl(backend: str):
    if backend == "triton":
        from .kernels import info_nce as triton_impl
        return triton_impl
    if backend == "torch":
        return chunked
    if backend == "cuda":
        from . import cuda_backend
        return cuda_backend
    raise ValueError(f"no log-sum-exp implementation for backend {backend!r}")


def _check_raw(u, v, scale, labels, symmetric, row_cls, col_cls, exclude_diag, exclude_pos, smoothing=None):
    """The raw op's own checks, which need no host sync: shapes, dtypes and devices that the
    kernels would otherwise read past (a D mismatch) or misread. The public losses check more,
    label ranges included; the raw op takes labels outside [0, N) as rows without a positive.
    Returns label smoothing's eps as a float (0.0 without)."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"fastcl::info_nce_rows: u [B, D] and v [N, D] with one D, got {tuple(u.shape)} "
                         f"and {tuple(v.shape)}")
    if v.dtype != u.dtype or v.device != u.device or scale.device != u.device or scale.numel() != 1:
        raise ValueError(f"fastcl::info_nce_rows: u, v ({u.dtype}, {v.dtype} on {u.device}, {v.device}) "
                         f"need one dtype and device, and scale ({scale.numel()} elements on "
                         f"{scale.device}) one element on it")
    if symmetric and u.shape[0] != v.shape[0]:
        raise ValueError(f"fastcl::info_nce_rows: symmetric needs B == N, got {u.shape[0]} and {v.shape[0]}")
    for name, t, n in (("labels", labels, u.shape[0]), ("row_cls", row_cls, u.shape[0]),
                       ("col_cls", col_cls, v.shape[0])):
        if t is not None and (t.dtype != torch.int64 or t.shape != (n,) or t.device != u.device):
            raise ValueError(f"fastcl::info_nce_rows: {name} must be int64 [{n}] on {u.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if (row_cls is None) != (col_cls is None):
        raise ValueError("fastcl::info_nce_rows: give both row_cls and col_cls, or neither")
    if smoothing is None:
        return 0.0
    if smoothing.numel() != 1 or not smoothing.is_floating_point() or smoothing.device.type != "cpu":
        raise ValueError(f"fastcl::info_nce_rows: smoothing must be a 1-element float tensor on the CPU, got "
                         f"{smoothing.dtype} {tuple(smoothing.shape)} on {smoothing.device}")
    eps = float(smoothing)  # a CPU tensor: no device sync
    if not 0.0 <= eps < 1.0 or (eps and (exclude_diag or exclude_pos or row_cls is not None)):
        raise ValueError(f"fastcl::info_nce_rows: label_smoothing in [0, 1) and only without exclusions or "
                         f"class ids (every column a negative), got {eps} with exclude_diag="
                         f"{exclude_diag}, exclude_pos={exclude_pos}, class ids: {row_cls is not None}")
    return eps


@torch.library.custom_op("fastcl::info_nce_rows", mutates_args=())
def info_nce_rows(u: Tensor, v: Tensor, scale: Tensor, labels: Optional[Tensor], symmetric: bool,
                  row_cls: Optional[Tensor], col_cls: Optional[Tensor], exclude_diag: bool,
                  exclude_pos: bool, backend: str,
                  smoothing: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row contrastive terms of S = scale * u @ v.T, never storing S.

    Returns (row_loss [B], col_loss [N] or [0], row_stats, col_stats):
    row_loss_i = logsumexp_{j in J_i} S_ij - pos_i, with J_i all columns but i (exclude_diag)
    and y_i (exclude_pos); pos_i = S_{i,y_i}, or with class ids the mean of S_ij over the
    other columns j with col_cls[j] == row_cls[i]. col_loss_j = logsumexp_i S_ij - S_jj
    (symmetric). smoothing, label smoothing's eps as a 0-dim float64 CPU tensor (a tensor, so that
    torch.compile keeps a changing eps symbolic instead of compiling a graph per value; no
    exclusions or class ids), adds eps * (pos_i - mean_j S_ij) to row i (eps * (S_jj - mean_i S_ij)
    to column j): F.cross_entropy's smoothed target, whose gradient the backward forms inside its
    tiles. The stats are the backend's O(B + N) statistics for the backward; no gradient.
    """
    label_smoothing = _check_raw(u, v, scale, labels, symmetric, row_cls, col_cls, exclude_diag, exclude_pos,
                                 smoothing)
    why = _dispatch.why_not(backend, u.device, u.dtype)  # the public losses asked already; a direct call did not
    if why:  # (bf16 in the Triton interpreter: values ~1e10, silently)
        raise _dispatch.BackendUnavailable(f"fastcl::info_nce_rows: backend={backend!r}: {why}")
    # Autocast must not reach the implementation's matmuls: the backward recomputes S and needs
    # it rounded as the forward rounded it (a bf16 forward against an fp32 backward left rows of
    # P summing to 1 +- 1e-2: silently wrong gradients). The inputs' dtype decides the precision.
    with no_autocast(u.device):
        row, col, row_stats, col_stats = _impl(backend).lse_forward(u, v, scale, labels, symmetric, row_cls,
                                                                    col_cls, exclude_diag, exclude_pos)
        if label_smoothing:
            row, col = _add_smoothing(u, v, scale, labels, symmetric, label_smoothing, row, col)
    return row, col, row_stats, col_stats


def _add_smoothing(u, v, scale, labels, symmetric, eps, row, col):
    """row + eps * (S_iy - mean_j S_ij), col + eps * (S_jj - mean_i S_ij): O((B + N) * D), one
    dot per row with the difference v_y - mean(v). A row without a positive (its label outside
    [0, N); without labels, rows i >= N) contributes no S_iy, as in the op's log-sum-exp term."""
    cd = chunked.compute_dtype(u.dtype)
    U, V, s = u.to(cd), v.to(cd), scale.to(cd).reshape(())
    B, N = U.shape[0], V.shape[0]
    y, has = chunked.targets(0, B, labels, N, U.device)
    Vy = torch.where(has[:, None], V[y[:, 0]], 0.0) if N else torch.zeros_like(U)
    row = row + eps * s * (U * (Vy - V.sum(0) / max(N, 1))).sum(1)
    if symmetric:  # N == B, no labels
        col = col + eps * s * (V * (U - U.sum(0) / max(B, 1))).sum(1)
    return row, col


@info_nce_rows.register_fake
def _(u, v, scale, labels, symmetric, row_cls, col_cls, exclude_diag, exclude_pos, backend, smoothing=None):
    cd = chunked.compute_dtype(u.dtype)
    B, N = u.shape[0], (v.shape[0] if symmetric else 0)
    return (u.new_empty(B, dtype=cd), u.new_empty(N, dtype=cd),
            u.new_empty(4, B, dtype=cd), u.new_empty(2, N, dtype=cd))


@torch.library.custom_op("fastcl::info_nce_rows_backward", mutates_args=())
def info_nce_rows_backward(u: Tensor, v: Tensor, scale: Tensor, labels: Optional[Tensor],
                           row_stats: Tensor, col_stats: Tensor, g_row: Tensor, g_col: Tensor,
                           symmetric: bool, row_cls: Optional[Tensor], col_cls: Optional[Tensor],
                           exclude_diag: bool, exclude_pos: bool,
                           backend: str, smoothing: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    label_smoothing = _check_raw(u, v, scale, labels, symmetric, row_cls, col_cls, exclude_diag, exclude_pos,
                                 smoothing)
    B, N = u.shape[0], v.shape[0] if symmetric else 0
    if row_stats.shape != (4, B) or col_stats.shape != (2, N) or g_row.shape != (B,) or g_col.shape != (N,):
        raise ValueError(f"fastcl::info_nce_rows_backward: row_stats [4, {B}], col_stats [2, {N}], g_row "
                         f"[{B}] and g_col [{N}] as the forward gave them, got {tuple(row_stats.shape)}, "
                         f"{tuple(col_stats.shape)}, {tuple(g_row.shape)}, {tuple(g_col.shape)}")
    with no_autocast(u.device):  # as in the forward
        du, dv, dscale = _impl(backend).lse_backward(u, v, scale, row_stats, col_stats, g_row, g_col,
                                                     labels, symmetric, row_cls, col_cls,
                                                     exclude_diag, exclude_pos, smoothing=label_smoothing)
    # Contiguous gradients whatever u's layout (the kernels write them so; the fake says so:
    # inductor asserted a transposed u's strides), and d scale in scale's shape ([1] or []).
    return (du.to(u.dtype).contiguous(), dv.to(v.dtype).contiguous(),
            dscale.to(scale.dtype).reshape(scale.shape))


@info_nce_rows_backward.register_fake
def _(u, v, scale, labels, row_stats, col_stats, g_row, g_col, symmetric, row_cls, col_cls,
      exclude_diag, exclude_pos, backend, smoothing=None):
    return u.new_empty(u.shape), v.new_empty(v.shape), scale.new_empty(scale.shape)


def _setup_context(ctx, inputs, output):
    u, v, scale, labels, symmetric, row_cls, col_cls, exclude_diag, exclude_pos, backend, smoothing = inputs
    ctx.save_for_backward(u, v, scale, labels, row_cls, col_cls, output[2], output[3], smoothing)
    ctx.flags = (symmetric, exclude_diag, exclude_pos, backend)


def _backward(ctx, g_row, g_col, _g_row_stats, _g_col_stats):
    u, v, scale, labels, row_cls, col_cls, row_stats, col_stats, smoothing = ctx.saved_tensors
    symmetric, exclude_diag, exclude_pos, backend = ctx.flags
    g_row = torch.zeros_like(row_stats[0]) if g_row is None else g_row.contiguous()
    g_col = torch.zeros_like(col_stats[0]) if g_col is None else g_col.contiguous()
    du, dv, dscale = torch.ops.fastcl.info_nce_rows_backward(
        u, v, scale, labels, row_stats, col_stats, g_row, g_col, symmetric, row_cls, col_cls,
        exclude_diag, exclude_pos, backend, smoothing)
    return du, dv, dscale, None, None, None, None, None, None, None, None


info_nce_rows.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "fastcl's fused InfoNCE op has no double backward (the gradient of its gradient, e.g. a "
        "gradient penalty through the loss); use backend='reference' for higher-order derivatives")


# A gradient taken with create_graph=True is still differentiable; differentiating it again
# raises this message instead of torch's "no autograd formula was registered".
info_nce_rows_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _normalize(x: Tensor) -> Tensor:
    # Norms in (at least) fp32 so fp16 inputs with large entries cannot overflow x*x.
    xc = x.to(chunked.compute_dtype(x.dtype))
    return (xc / xc.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(x.dtype)


def prepare(scale: Tensor, normalize: bool, *xs: Tensor):
    """The embeddings (normalised if asked) and the scale in the compute dtype (float64 stays
    float64, for gradcheck). normalize: a bool its callers checked (before any backend ran)."""
    xs = tuple(_normalize(x) for x in xs) if normalize else xs
    return (*xs, scale.to(chunked.compute_dtype(xs[0].dtype)))


def _refuse_unsupported_autodiff(*xs: Tensor) -> None:
    """Forward-mode AD (torch.func.jvp/jacfwd, torch.autograd.forward_ad) must fail loudly: the
    custom op has no jvp rule, and torch then runs it as if no input had a tangent, giving a
    silent zero tangent. torch.func's reverse mode (grad, vjp, jacrev) cannot run the custom
    op's autograd: refused with a message that names the way out."""
    if torch.compiler.is_compiling():  # dynamo cannot trace unpack_dual; AOT autograd is reverse mode
        return
    if any(fwAD.unpack_dual(x).tangent is not None for x in xs):
        raise NotImplementedError(
            "fastcl's fused log-sum-exp op has no forward-mode AD rule (torch.func.jvp, jacfwd, "
            "torch.autograd.forward_ad): its tangent would silently be zero. Use backend='reference' "
            "for forward-mode derivatives")
    refuse_func_transforms(
        "fastcl's fused log-sum-exp op cannot run under torch.func.grad, vjp or jacrev (torch's "
        "custom ops do not support functorch's reverse-mode transforms). Use loss.backward() or "
        "torch.autograd.grad, or backend='reference' for torch.func", *xs)


def row_terms(u, v, scale, backend, *, labels=None, symmetric=False, row_cls=None, col_cls=None,
              exclude_diag=False, exclude_pos=False, label_smoothing=0.0, with_counts=False):
    """(row_loss [B], col_loss [N] or [0]) from the fused op; see info_nce_rows. with_counts
    adds each row's number of positives [B], which the op counted in the tiles."""
    if symmetric and (exclude_diag or exclude_pos or row_cls is not None or labels is not None):
        raise ValueError("the column (symmetric) term is defined without labels, exclusions or class ids")
    _refuse_unsupported_autodiff(u, v, scale)
    if labels is not None:
        labels = labels.long().contiguous()
    if row_cls is not None:
        row_cls, col_cls = row_cls.long().contiguous(), col_cls.long().contiguous()
    # eps as a tensor (float_tensor: built by arithmetic, so a changing eps stays symbolic under
    # torch.compile); None without smoothing. On the CPU, read without a device sync; with meta
    # inputs on meta, or the CPU tensor would send the call to the real kernel, not the shapes'.
    smoothing = None
    if label_smoothing:
        smoothing = _validation.float_tensor(label_smoothing, "meta" if u.device.type == "meta" else "cpu",
                                             torch.float64)
    row, col, row_stats, _ = torch.ops.fastcl.info_nce_rows(u, v, scale, labels, symmetric, row_cls,
                                                            col_cls, exclude_diag, exclude_pos, backend,
                                                            smoothing)
    return (row, col, row_stats[3]) if with_counts else (row, col)


def pair_logit(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """s * <a_i, b_i> per row in the compute dtype, differentiable (O(B*D))."""
    cd = scale.dtype
    return (a.to(cd) * b.to(cd)).sum(dim=1) * scale


def info_nce(q: Tensor, k: Tensor, *, temperature=None, logit_scale=None, labels=None,
             symmetric: bool = False, normalize: bool = True, reduction: str = "mean",
             label_smoothing: float = 0.0, backend: str = "auto") -> Tensor:
    """InfoNCE (one direction) or CLIP (``symmetric=True``) loss without a B x N buffer.

    Args:
        q: [B, D] queries (float16, bfloat16, float32 or float64).
        k: [N, D] keys, same device and dtype as q. Without labels N >= B and rows B..N-1 are
            extra negatives; with labels any N >= 1.
        temperature: fixed temperature tau (logits = q.k / tau). Default 0.07 if neither
            temperature nor logit_scale is given.
        logit_scale: 1-element tensor, logits = exp(logit_scale) * q.k (CLIP's learnable
            scale, the LOG of the multiplier; fastcl.nn.ClipLoss takes the multiplier, as
            open_clip does); gradients flow to it.
        labels: int64 (or int32) [B], column of k holding row i's positive (default: i).
        symmetric: CLIP loss, mean of the q->k and k->q cross-entropies; needs N == B and no
            labels. Both directions come from one pass over the tiles.
        normalize: L2-normalise q and k first (gradient flows through the normalisation).
        reduction: "mean" | "sum" | "none" (per-row losses [B]; symmetric: per-pair
            average of the two directions).
        label_smoothing: epsilon in [0, 1), as in F.cross_entropy: the target puts 1 - eps on
            the positive and eps spread uniformly over all N columns.
        backend: "auto" (on CUDA the fastest measured of cuda/triton/torch for the GPU and
            the input precision: the figures in fastcl/_dispatch.py, and triton, else cuda, for
            a GPU without figures; on a CPU torch), "cuda" (CUDA
            C++ extension), "triton", "torch" (chunked pure torch), "reference" (naive
            materialised logits).

    Returns:
        The loss, float32 for 16-bit and float32 inputs, float64 for float64 inputs
        (backend="reference" computes in the input dtype, like the naive torch it stands for);
        shape [] or [B] for reduction="none".
    """
    _validation.check_embeddings(q, k)
    _validation.check_reduction(reduction)
    symmetric = _validation.check_bool(symmetric, "symmetric")
    normalize = _validation.check_bool(normalize, "normalize")  # before the reference runs
    label_smoothing = _validation.smoothing(label_smoothing)
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
    scale = _validation.scale_tensor(temperature, logit_scale, q.device, q.dtype)
    backend = _dispatch.resolve(backend, q.device, q.dtype)

    if backend == "reference":
        return reference.info_nce_reference(
            q, k, temperature=temperature, logit_scale=logit_scale, labels=labels,
            symmetric=symmetric, normalize=normalize, reduction=reduction,
            label_smoothing=label_smoothing)

    u, v, scale = prepare(scale, normalize, q, k)
    # Smoothing inside the op: its gradient, G = P - (1 - eps) [positive] - eps / N, is formed in
    # the tiles as F.cross_entropy forms it. Added outside, as eps * (S_iy - mean_j S_ij) with a
    # gradient of its own, it nearly cancelled the op's on near-uniform rows (eps >= 0.5: up to
    # 13x naive fp32's gradient error).
    per, col = row_terms(u, v, scale, backend, labels=labels, symmetric=symmetric,
                         label_smoothing=label_smoothing)
    if symmetric:
        per = 0.5 * (per + col)  # N == B, no labels: pair i is row i and column i
    return reduce(per, reduction)
