"""Group whitening (ZCA / Cholesky / Newton-Schulz) with an analytic backward.

Per group of g channels: xc = x - mean (centred BEFORE the Gram matrix, in fp32 or fp64;
the Gram in fp64 for ZCA and Cholesky, see stats_dtype, and all of it in fp64 for them when a
group has fewer samples than channels, see run_dtype),
S = xc^T xc / (N - ddof) + eps I, y = xc W(S):
  zca:           W = U diag(lambda)^-1/2 U^T         (symmetric, channel-order invariant)
  cholesky:      S = L L^T, W = L^-T                  (cheapest; depends on channel order)
  newton_schulz: coupled Frobenius-scaled iteration   (matmuls only)
Backward, with G_W = xc^T dY:
  dxc = dY W^T + xc (G_S + G_S^T) / (N - ddof), dx = dxc - mean_rows(dxc)
where G_S comes from the analytic ZCA formula U[(U^T sym(G_W) U) o K]U^T with
K_ij = -1/(s_i s_j (s_i + s_j)), s = sqrt(lambda). It stays finite for repeated eigenvalues,
unlike autograd through eigh. Cholesky and Newton-Schulz differentiate their small [G, g, g]
matrix function with autograd (torch's analytic Cholesky backward; NS unrolled).
"""
import numbers
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch, _validation
from ._common import no_autocast, refuse_func_transforms
from .chunked import compute_dtype as _cdt

METHODS = ("zca", "cholesky", "newton_schulz")
DEFAULT_NS_ITERS = 20


# ----------------------------------------------------------------------------- matrix functions
def zca_matrix(S: Tensor, eps: float = 0.0):
    """W = S^-1/2 for a batch of SPD matrices [G, g, g] = covariance + eps I, plus (U, sigma)
    for the backward. The eigenvalues are floored at eps, their exact lower bound: in fp32 the
    zero eigenvalues of a rank-deficient covariance (N - 1 < g) come out as rounding noise,
    far below eps and even negative, and whitened that noise to ~1e14."""
    lam, U = _linalg(torch.linalg.eigh, S)
    sigma = lam.clamp_min(max(eps, torch.finfo(S.dtype).tiny)).sqrt()
    return (U / sigma[..., None, :]) @ U.transpose(-1, -2), (U, sigma)


def zca_grad_cov(G_W: Tensor, U: Tensor, sigma: Tensor) -> Tensor:
    """G_S = U[(U^T sym(G_W) U) o K]U^T, K_ij = -1 / (s_i s_j (s_i + s_j))."""
    sym = 0.5 * (G_W + G_W.transpose(-1, -2))
    K = -1.0 / (sigma[..., :, None] * sigma[..., None, :] * (sigma[..., :, None] + sigma[..., None, :]))
    return U @ ((U.transpose(-1, -2) @ sym @ U) * K) @ U.transpose(-1, -2)


def cholesky_matrix(S: Tensor) -> Tensor:
    """W = L^-T with S = L L^T, so that (xc W)^T (xc W) / n = L^-1 S L^-T = I."""
    L = _linalg(torch.linalg.cholesky, S)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    return torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)


def newton_schulz_matrix(S: Tensor, iters: int) -> Tensor:
    """Coupled Newton-Schulz: Y0 = S/c, Z0 = I, T = (3I - Z Y)/2, Y <- Y T, Z <- T Z;
    W = Z / sqrt(c) with c = ||S||_F. Converges for any SPD S (eigenvalues of S/c in (0, 1]).
    On S / f^2 (pow2_balance), then W / f: the same bits, without c's overflow."""
    f = pow2_balance(S)
    S = S / f / f
    c = torch.linalg.matrix_norm(S, keepdim=True)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    Y, Z = S / c, eye
    for _ in range(iters):
        T = 1.5 * eye - 0.5 * (Z @ Y)
        Y, Z = Y @ T, T @ Z
    return Z / c.sqrt() / f


def pow2_balance(S: Tensor) -> Tensor:
    """f [G, 1, 1]: per group, a power of two with max|S| / f^2 in [1/2, 2). Newton-Schulz's
    c = ||S||_F squares S's entries, which overflowed fp32 at feature scale ~3e9 (W = 0, no
    error) and underflowed at ~1e-11 (NaN). Scaling by powers of two is exact, so W(S) =
    W(S / f^2) / f changes no bit elsewhere. f^2 itself may leave fp32's range: it is applied
    as two divisions by f."""
    _, e = torch.frexp(S.detach().abs().amax(dim=(-2, -1), keepdim=True))
    return torch.ldexp(torch.ones_like(S[..., :1, :1]).detach(), torch.div(e, 2, rounding_mode="floor"))


def _linalg(fn, S):
    """fn(S), with LAPACK's error on a non-finite S (eigh "failed to converge", Cholesky "not
    positive-definite") named as what it is: NaN or inf in x."""
    if _validation._compiling():  # no try/except around a traced op
        return fn(S)
    try:
        return fn(S)
    except torch.linalg.LinAlgError:
        if bool(torch.isfinite(S).all()):
            raise
    raise ValueError("a group's covariance is not finite: x holds NaN or inf")


def _matrix(S, method, iters):
    if method == "cholesky":
        return cholesky_matrix(S)
    return newton_schulz_matrix(S, iters)


# ----------------------------------------------------------------------------- the op
def stats_dtype(method: str, xg: Tensor) -> torch.dtype:
    """S's dtype: fp64 for the factorising methods (ZCA, Cholesky) on fp32 statistics, where
    the device has fp64. Rounding the fp32 Gram of a rank-deficient group (N - 1 < g) puts its
    zero eigenvalues at about +-g u lambda_max, far above eps at feature scale 10: Cholesky
    failed ("not positive-definite") on covariance + eps I, and ZCA's W got 1/sqrt(noise)
    instead of 1/sqrt(eps) there (30% off in the detach_stats gradient). The fp64 Gram of the
    fp32 xc is PSD to ~1e-16 (errors then ~1e-3, from xc's own rounding). Its cost, fwd+bwd on
    a 2-core CPU, D = 768, groups of 64: 1.1-1.6x (benchmarks/ab_whitening_stats.py, figures
    in benchmarks/RESULTS.md); on a GPU not yet measured. Newton-Schulz (matmuls only) stays in fp32."""
    if method in ("zca", "cholesky") and xg.dtype == torch.float32 and xg.device.type in ("cpu", "cuda"):
        return torch.float64
    return xg.dtype


def run_dtype(method: str, xg: Tensor, n: Optional[int] = None) -> torch.dtype:
    """The dtype the op runs in, for xg [G, N, g] in the compute dtype: xg's, but fp64 for ZCA
    and Cholesky of fp32 statistics (stats_dtype) when N - 1 < g. There the covariance has
    zero eigenvalues (eps after the shift), and fp32 centring leaves ~1e-3 of rounding in
    those directions, which W amplifies by eps^-1/2. The backward's dY W^T + xc (G_S + G_S^T)/n,
    whose G_S is ~sigma^-3 there, cancelled: at feature scale 100 the output was 1e-2 off, and
    the gradient 0.66 (ZCA) and 8.4 (Cholesky) relative, against naive fp32 ZCA's 2.4e-2. In
    fp64 both are within 1e-7. Such batches are small (N <= g), so fp64 costs little; with more
    samples fp64 throughout would cost ~3x the fp32 op on a CPU (2026-11-24), and the Gram
    alone in fp64 serves (stats_dtype)."""
    n = xg.shape[1] if n is None else n  # the samples over all ranks (fastcl.distributed)
    if stats_dtype(method, xg) == torch.float64 and n - 1 < xg.shape[2]:
        return torch.float64
    return xg.dtype


def group_stats(xg: Tensor, eps: float, ddof: int, dtype: Optional[torch.dtype] = None, over=None):
    """xg [G, N, g] in the compute dtype -> (xc, S) with the mean removed before the Gram;
    S in `dtype` (default xg's: see stats_dtype). over: None (this batch), or (allsum, n): the
    statistics of n samples spread over processes, allsum(t) summing t over them (the mean's
    sum first, then the centred Gram: two passes, as here)."""
    if over is None:
        xc = xg - xg.mean(dim=1, keepdim=True)
        n = xg.shape[1]
    else:
        allsum, n = over
        xc = xg - allsum(xg.sum(dim=1, keepdim=True)) / n
    xs = xc if dtype is None else xc.to(dtype)
    S = xs.transpose(-1, -2) @ xs
    S = (S if over is None else over[0](S)) / (n - ddof)
    if eps:
        S = S + eps * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    return xc, S


def _check_not_singular(S: Tensor, eps: float, dtype: Optional[torch.dtype] = None):
    """With eps == 0 a rank-deficient group would whiten to ~1e19: refuse it, and name NaN or
    inf in x as such (one host sync for both). Rank-deficient means
    lambda_min <= g * (S's dtype's machine epsilon) * lambda_max, NumPy's matrix_rank
    tolerance: eigh puts a singular S's smallest eigenvalue at a few machine epsilons of the
    largest (~1e-7 in fp32, ~1e-16 in fp64), not at 0. dtype: the data's (default S's), whose
    rounding the tolerance is of."""
    if eps == 0 and _validation.has_values(S):
        finite = torch.isfinite(S).all()
        # eigh fails to converge on NaN (LAPACK's message about conditioning): a stand-in then
        lam = torch.linalg.eigvalsh(torch.where(finite, S, torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)))
        tol = S.shape[-1] * torch.finfo(dtype or S.dtype).eps
        _validation.require_all(
            (finite, "a group's covariance is not finite: x holds NaN or inf"),
            ((lam[..., 0] > tol * lam[..., -1].abs()).all(),
             "a group's covariance is singular (rank-deficient channels): use eps > 0"))


KERNEL_MAX_GROUP = 128  # the kernels keep a group's g x g matrices in one program (block)
# Triton's program unrolls its fp32 ("ieee") g x g dots per thread: at g = 128, ptxas took over
# 100 s on the H100 (2026-11-24); g = 64 compiled and ran in the benchmark.
TRITON_MAX_GROUP = 64


def _max_group(backend):
    """The largest group size `backend`'s Newton-Schulz kernel takes."""
    return TRITON_MAX_GROUP if backend == "triton" else KERNEL_MAX_GROUP


@torch.library.custom_op("fastcl::newton_schulz_kernel", mutates_args=())
def newton_schulz_kernel(S: Tensor, iters: int, backend: str) -> Tensor:
    """W ~= S^-1/2 for SPD S [G, g, g] float32, g <= 128 (64 for "triton"), by the fused
    Newton-Schulz kernel of `backend` ("triton" or "cuda"). An op of its own, so that
    torch.compile calls the kernel instead of tracing its launch (which failed with
    fullgraph=True)."""
    max_g = _max_group(backend)
    if S.dim() != 3 or S.shape[1] != S.shape[2] or S.shape[1] > max_g or S.dtype != torch.float32:
        raise ValueError(f"fastcl::newton_schulz_kernel: S must be float32 [G, g, g] with g <= "
                         f"{max_g}, got {S.dtype} {tuple(S.shape)}")
    if backend == "triton":
        from .kernels import whitening as K
        kernel = K.newton_schulz_whitening_matrix
    elif backend == "cuda":
        from . import cuda_backend
        kernel = cuda_backend.newton_schulz_whitening_matrix
    else:
        raise ValueError(f"fastcl::newton_schulz_kernel: no kernel for backend {backend!r}")
    f = pow2_balance(S)  # as newton_schulz_matrix: the kernels' c squares S's entries
    return kernel(S / f / f, iters) / f


@newton_schulz_kernel.register_fake
def _(S, iters, backend):
    return S.new_empty(S.shape)  # contiguous, as the kernels return it


class _GroupWhiten(torch.autograd.Function):
    """xg [G, N, g] in run_dtype -> (y, W) in xg's dtype. data_dtype: the dtype xg's values
    were computed in, whose machine epsilon the eps = 0 rank test takes."""
    @staticmethod
    def forward(ctx, xg, eps, ddof, method, iters, detach_stats, backend, data_dtype, over=None):
        xc, S = group_stats(xg, eps, ddof, stats_dtype(method, xg), over)
        _check_not_singular(S, eps, data_dtype)  # before eigh, which fails to converge on NaN
        if method == "zca":
            W, (U, sigma) = zca_matrix(S, eps)
            W = W.to(xc.dtype)
            ctx.save_for_backward(xc, W, U, sigma)
        else:
            if backend in ("triton", "cuda"):  # method == "newton_schulz", checked by the dispatch
                W = torch.ops.fastcl.newton_schulz_kernel(S, iters, backend)
            else:
                W = _matrix(S, method, iters).to(xc.dtype)
            ctx.save_for_backward(xc, W, S)
        ctx.cfg = (ddof, method, iters, detach_stats, over)
        ctx.mark_non_differentiable(W)
        return xc @ W, W  # W for running statistics (GroupWhitening); it gets no gradient

    @staticmethod
    def backward(ctx, gy, _gW):
        if torch.is_grad_enabled():  # create_graph=True: this backward has no graph of its own
            raise RuntimeError("group_whiten's analytic backward cannot be differentiated again "
                               "(create_graph=True); use backend='reference' for higher-order gradients")
        with no_autocast(gy.device):  # a backward() called inside autocast: still fp32
            return _GroupWhiten._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        ddof, method, iters, detach_stats, over = ctx.cfg
        xc, W = ctx.saved_tensors[:2]
        # Across processes, W's and the mean's gradients sum every process's contributions
        allsum, n = ((lambda t: t), xc.shape[1]) if over is None else over
        if detach_stats:
            gxc = gy @ W.transpose(-1, -2)
        else:
            G_W = allsum(xc.transpose(-1, -2) @ gy)
            if method == "zca":
                U, sigma = ctx.saved_tensors[2:]
                G_S = zca_grad_cov(G_W.to(U.dtype), U, sigma).to(xc.dtype)
            else:  # differentiate the [G, g, g] matrix function itself (NS: unrolled)
                S = ctx.saved_tensors[2].detach().requires_grad_()
                with torch.enable_grad():
                    W = _matrix(S, method, iters)
                    G_S, = torch.autograd.grad(W, S, G_W.to(S.dtype))
                W, G_S = W.to(xc.dtype), G_S.to(xc.dtype)  # S in fp64 for Cholesky (stats_dtype)
                # gy W^T and the G_S term nearly cancel on ill-conditioned groups: both from the
                # same W. The kernels' W (Triton, CUDA) differs from this one by rounding, which
                # the cancellation made 10-130x naive's gradient error.
            gxc = gy @ W.detach().transpose(-1, -2)
            gxc = gxc + xc @ (G_S + G_S.transpose(-1, -2)) / (n - ddof)
        mean = gxc.mean(dim=1, keepdim=True) if over is None else allsum(gxc.sum(dim=1, keepdim=True)) / n
        return gxc - mean, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public API
def check_options(D, num_groups, eps, ddof, method, iters):
    """The options' own checks (no data needed): also run by the GroupWhitening constructor."""
    if not _validation.is_int(D) or D < 1:
        raise ValueError(f"the number of features must be a positive integer, got {D!r}")
    if not _validation.is_int(num_groups) or num_groups < 1 or D % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of D={D}, got {num_groups!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number >= 0, got {eps!r}")
    # comparisons that torch.compile can guard on a symbolic eps (math.isfinite cannot trace it)
    if not (eps >= 0 and eps <= _validation.FLOAT_MAX):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if iters is not None and (method != "newton_schulz" or not _validation.is_int(iters) or iters < 1):
        raise ValueError("iters is the number of Newton-Schulz iterations (>= 1, method='newton_schulz')")
    if not _validation.is_int(ddof) or ddof < 0:
        raise ValueError(f"ddof must be an integer >= 0, got {ddof!r}")


def _check(x, num_groups, eps, ddof, method, iters, perm):
    check_input(x, num_groups, eps, ddof, method, iters, perm)
    check_samples(x.shape[0], x.shape[1] // num_groups, eps, ddof)


def check_input(x, num_groups, eps, ddof, method, iters, perm):
    """Everything but the number of samples (the distributed op's is the sum over ranks)."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [N, D], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    D = x.shape[1]
    check_options(D, num_groups, eps, ddof, method, iters)
    if perm is not None:
        if not isinstance(perm, Tensor) or perm.shape != (D,) or perm.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"perm must be an integer tensor of shape [{D}]")
        if _validation.has_values(perm):
            _validation.require((torch.sort(perm).values == torch.arange(D, device=perm.device)).all(),
                                "perm must be a permutation of range(D)")


def check_samples(N, g, eps, ddof):
    if N - ddof < 1:
        raise ValueError(f"need N - ddof >= 1 samples, got N={N}, ddof={ddof}")
    if N - 1 < g and eps == 0:  # centring leaves N - 1 degrees of freedom, whatever ddof is
        raise ValueError(f"the group covariance is singular: N = {N} centred samples span at most "
                         f"{N - 1} < group size {g} dimensions; use more samples, fewer channels "
                         f"per group, or eps > 0")


def group_whiten(x: Tensor, num_groups: int, *, eps: float = 1e-5, method: str = "zca",
                 iters: Optional[int] = None, perm: Optional[Tensor] = None, ddof: int = 0,
                 detach_stats: bool = False, backend: str = "auto", return_matrix: bool = False):
    """Whiten x [N, D] in num_groups groups of D/num_groups consecutive channels.

    Args:
        x: [N, D] floating (16-bit inputs get fp32 statistics).
        num_groups: G, a divisor of D; the group size is g = D / G.
        eps: added to the covariance's diagonal (needed when N - 1 < group size: centring
            leaves N - 1 degrees of freedom).
        method: "zca" | "cholesky" | "newton_schulz" (see the module docstring).
        iters: Newton-Schulz iterations (default 20: at condition number 1e4 and g = 16-128,
            fp32's W is 5e-5 to 1e-3 relative off float64 ZCA, from fp32 rounding: fp64's 20
            iterations are within 2e-12; measured, 2026-11-24).
        perm: LongTensor [D]: channels are permuted by perm before grouping and the output is
            put back in the original channel order.
        ddof: the covariance divides by N - ddof.
        detach_stats: treat W as a constant (the stop-gradient of WhitenedCSE / Zero-CL); the
            mean is still differentiated.
        backend: "auto" (on CUDA the fastest measured: the figures in fastcl/_dispatch.py; else
            torch) | "torch" | "triton" (Newton-Schulz matrix in one fused Triton program per
            group, group size <= 64) | "cuda" (same, CUDA C++, group size <= 128) |
            "reference" (naive torch.linalg autograd).
    Returns:
        y [N, D] in x's dtype; each group of y satisfies y^T y / (N - ddof) ~= I. With
        return_matrix=True, also the batch's whitening matrices W [G, g, g] (detached; in the
        permuted channel order if perm is given).
    """
    _check(x, num_groups, eps, ddof, method, iters, perm)
    detach_stats = _validation.check_bool(detach_stats, "detach_stats")
    return_matrix = _validation.check_bool(return_matrix, "return_matrix")
    iters = DEFAULT_NS_ITERS if iters is None else iters
    backend = resolve_backend(backend, x, method, x.shape[1] // num_groups)
    with no_autocast(x.device):  # fp32 statistics under autocast too (its bf16 Gram was 1e-2 off)
        y, W = _whiten(x, num_groups, eps, ddof, method, iters, perm, detach_stats, backend)
    return (y, W) if return_matrix else y


def resolve_backend(backend, x, method, g):
    # The kernels see only the statistics, in the compute dtype (fp32 for 16-bit x): dispatch on
    # it, so that 16-bit inputs take fp32's measured figures (and the Triton interpreter, which
    # refuses bf16 operands, runs them).
    return _dispatch.resolve(backend, x.device, _cdt(x.dtype), {"triton": _kernel_limits(method, g, "triton"),
                                                         "cuda": _cuda_limits(method, g, x.device)},
                             op="group_whiten")


def _whiten(x, num_groups, eps, ddof, method, iters, perm, detach_stats, backend, over=None):
    """over: None, or (allsum, n) for statistics over processes (fastcl.distributed: the
    analytic backward only; the reference and the compiled path are one process's)."""
    N, D = x.shape
    g = D // num_groups
    xp = x[:, perm] if perm is not None else x
    xg = xp.to(_cdt(x.dtype)).reshape(N, num_groups, g).transpose(0, 1)
    if over is not None:
        refuse_func_transforms("the distributed group whitening (an autograd.Function with collectives) "
                               "does not run under torch.func transforms (grad, vjp, jacrev, jvp, vmap)",
                               refused=("Grad", "Jvp", "Vmap"))
        yg, W = _GroupWhiten.apply(xg.to(run_dtype(method, xg, over[1])), eps, ddof, method, iters, detach_stats,
                                   backend, xg.dtype, over)
        y, W = yg.transpose(0, 1).reshape(N, D).to(x.dtype), W.to(xg.dtype)
    elif backend == "reference":
        if eps == 0:  # refused as the other backends refuse it (the reference gave NaN)
            _check_not_singular(group_stats(xg.detach(), eps, ddof)[1], eps)
        # in the statistics' dtype, as the other backends (eigh and Cholesky have no 16-bit
        # kernels, and need fp64 for fp32's rank-deficient groups: stats_dtype)
        y, W = whiten_reference(xp.to(stats_dtype(method, xg)), num_groups, eps=eps, method=method, iters=iters,
                                ddof=ddof, detach_stats=detach_stats, return_matrix=True)
        y, W = y.to(x.dtype), W.detach().to(xg.dtype)
    else:
        xr = xg.to(run_dtype(method, xg))
        if (method != "zca" and not detach_stats and _validation._compiling() and torch.is_grad_enabled()
                and xg.requires_grad):
            # Dynamo traces the Function's backward when it compiles the forward, and cannot
            # trace its torch.autograd.grad (a graph break, an error with fullgraph=True). The
            # same math by plain autograd, W from the torch iteration: the kernels' W serves
            # eager calls, and the gradient came from this iteration anyway.
            xc, S = group_stats(xr, eps, ddof, stats_dtype(method, xr))
            _check_not_singular(S.detach(), eps, xg.dtype)
            W = _matrix(S, method, iters).to(xc.dtype)
            yg, W = xc @ W, W.detach()
        else:
            refuse_func_transforms(
                "group_whiten's analytic backward (an autograd.Function) does not run under "
                "torch.func transforms (grad, vjp, jacrev, jvp, vmap). Use loss.backward() or "
                "torch.autograd.grad, or backend='reference' for torch.func",
                refused=("Grad", "Jvp", "Vmap"))
            yg, W = _GroupWhiten.apply(xr, eps, ddof, method, iters, detach_stats, backend, xg.dtype)
        y, W = yg.transpose(0, 1).reshape(N, D).to(x.dtype), W.to(xg.dtype)
    if perm is not None:
        y = y[:, torch.argsort(perm.to(y.device))]
    return y, W


def _cuda_limits(method, g, device):
    """_kernel_limits, plus the CUDA kernel's shared memory: Y, Z, T of g x g fp32 per block
    (g = 128 fits an H100's 227 KiB, not an A100's 163 or an sm_86/89 card's 99)."""
    reason = _kernel_limits(method, g, "cuda")
    if reason is None and device.type == "cuda":
        have = _dispatch.shared_memory_per_block(device)
        need = (3 * g * g + 8) * 4
        if have is not None and need > have:
            reason = (f"group size {g} needs {need} bytes of shared memory per block, this GPU "
                      f"has {have}")
    return reason


def check_backend(method, backend, g):
    """The backend's checks that need no data (the GroupWhitening constructor runs them; where
    the backend can run is known only from the input's device)."""
    _dispatch.check_name(backend)
    reason = _kernel_limits(method, g, backend) if backend in ("triton", "cuda") else None
    if reason is not None:
        raise _dispatch.BackendUnavailable(f"backend={backend!r} is not usable: {reason}")


def _kernel_limits(method, g, backend):
    """Why this call is outside `backend`'s whitening kernel, Triton's or CUDA's (None if it is
    not)."""
    if method != "newton_schulz":
        return (f"it implements method='newton_schulz' only (got {method!r}); eigh and Cholesky "
                f"run in backend='torch'")
    if g > KERNEL_MAX_GROUP:
        return f"group size {g} > {KERNEL_MAX_GROUP} does not fit one program (block) per group"
    if g > _max_group(backend):  # only Triton's limit is below KERNEL_MAX_GROUP
        return (f"group size {g} > {TRITON_MAX_GROUP}: the Triton kernel's compile took over 100 s on an "
                f"H100 at g = 128; backend='cuda' (g <= {KERNEL_MAX_GROUP}) or 'torch' take it")
    return None


def whiten_reference(x, num_groups, *, eps=1e-5, method="zca", iters=DEFAULT_NS_ITERS, ddof=0,
                     detach_stats=False, return_matrix=False):
    """Naive group whitening with plain autograd (ZCA through eigh): the test oracle.
    y [N, D], and with return_matrix=True also W [G, g, g]."""
    N, D = x.shape
    g = D // num_groups
    xg = x.reshape(N, num_groups, g).transpose(0, 1)
    xc = xg - xg.mean(dim=1, keepdim=True)
    S = xc.transpose(-1, -2) @ xc / (N - ddof) + eps * torch.eye(g, dtype=x.dtype, device=x.device)
    if method == "zca":
        lam, U = torch.linalg.eigh(S)
        # floored at eps, the eigenvalues' exact bound (see zca_matrix): rounding put them below
        W = U @ torch.diag_embed(lam.clamp_min(eps).rsqrt()) @ U.transpose(-1, -2)
    else:
        W = _matrix(S, method, iters)
    if detach_stats:
        W = W.detach()
    y = (xc @ W).transpose(0, 1).reshape(N, D)
    return (y, W) if return_matrix else y


def shuffled_views(x, k, generator, kwargs):
    """shuffled_group_whiten's checks: (its k views of x, k permutations [k, D] on x's device)."""
    if not _validation.is_int(k) or k < 1:
        raise ValueError(f"k is the number of views (an integer >= 1), got {k!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    for name in ("perm", "return_matrix"):
        if name in kwargs:
            raise TypeError(f"shuffled_group_whiten draws each view's perm itself and returns the views "
                            f"only; {name}= is group_whiten's")
    if x.dim() == 3:
        if x.shape[0] != k:
            raise ValueError(f"x has {x.shape[0]} views but k={k}")
        views = x.unbind(0)
    elif x.dim() == 2:
        views = [x] * k
    else:
        raise ValueError(f"x must be [N, D] or [k, N, D], got {tuple(x.shape)}")
    perms = torch.stack([torch.randperm(x.shape[-1], generator=generator) for _ in range(k)]).to(x.device)
    return views, perms


def shuffled_group_whiten(x: Tensor, num_groups: int, k: int = 3, *, generator=None, **kwargs) -> Tensor:
    """k views, each whitened with its own random channel permutation (WhitenedCSE).

    x: [N, D] (the same batch for every view) or [k, N, D] (one batch per view).
    Returns [k, N, D]. kwargs go to :func:`group_whiten`.
    """
    views, perms = shuffled_views(x, k, generator, kwargs)
    return torch.stack([group_whiten(v, num_groups, perm=p, **kwargs) for v, p in zip(views, perms)])
