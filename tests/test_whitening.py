import math
import numpy as np
import pytest
import torch

import fastcl
import fastcl.functional as FCL
from fastcl import whitening as Wh
from conftest import DEVICE, HAS_CUDA
from helpers import assert_within_budget, rel_err

METHODS = ["zca", "cholesky", "newton_schulz"]


def _x(n, d, seed=0, offset=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Correlated channels with a large common mean: what centring before the Gram must survive.
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5 + torch.eye(d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + offset).to(dtype)


def _group_cov(y, num_groups, ddof=0):
    n = y.shape[0]
    yg = y.double().reshape(n, num_groups, -1).transpose(0, 1)
    yc = yg - yg.mean(1, keepdim=True)
    return yc.transpose(-1, -2) @ yc / (n - ddof)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("use_perm", [False, True])
@pytest.mark.parametrize("detach_stats", [False, True])
def test_gradcheck(method, use_perm, detach_stats):
    x = _x(10, 6, seed=1).requires_grad_()
    if not detach_stats and not use_perm:  # the backward's 1 / (N - ddof) as well
        assert torch.autograd.gradcheck(lambda x: FCL.group_whiten(x, 2, eps=1e-3, method=method, ddof=1,
                                                                   backend="torch"), (x,))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(2)) if use_perm else None

    def f(x):
        return FCL.group_whiten(x, 2, eps=1e-3, method=method, perm=perm, detach_stats=detach_stats,
                                backend="torch")

    if not detach_stats:
        assert torch.autograd.gradcheck(f, (x,))
        return
    # W held constant is deliberately not the true gradient: compare with the reference whose
    # W is detached (the mean still carries gradient).
    gy = torch.randn(10, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours, = torch.autograd.grad((f(x) * gy).sum(), x)
    xp = x[:, perm] if perm is not None else x
    ref = Wh.whiten_reference(xp, 2, eps=1e-3, method=method, detach_stats=True)
    if perm is not None:
        ref = ref[:, torch.argsort(perm)]
    expected, = torch.autograd.grad((ref * gy).sum(), x)
    assert torch.allclose(ours, expected, atol=1e-10)
    full, = torch.autograd.grad((FCL.group_whiten(x, 2, eps=1e-3, method=method, perm=perm,
                                                  backend="torch") * gy).sum(), x)
    assert not torch.allclose(ours, full)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ddof", [0, 1])
def test_whitening_property_and_reference(method, ddof):
    x = _x(300, 24, seed=3, offset=50.0)
    y = FCL.group_whiten(x, 4, eps=0.0, method=method, ddof=ddof, backend="torch")
    eye = torch.eye(6, dtype=torch.float64).expand(4, 6, 6)
    assert torch.allclose(_group_cov(y, 4, ddof), eye, atol=1e-10)
    if method == "cholesky":  # independent of fastcl's matrix functions: W = L^-T
        xg = x.reshape(300, 4, 6).transpose(0, 1)
        xc = xg - xg.mean(1, keepdim=True)
        L = torch.linalg.cholesky(xc.transpose(-1, -2) @ xc / (300 - ddof))
        ref = (xc @ torch.linalg.inv(L).transpose(-1, -2)).transpose(0, 1).reshape(300, 24)
    elif method == "newton_schulz":  # the iteration written out here, not fastcl's _matrix
        xg = x.reshape(300, 4, 6).transpose(0, 1)
        xc = xg - xg.mean(1, keepdim=True)
        ref = (xc @ _newton_schulz(xc.transpose(-1, -2) @ xc / (300 - ddof), Wh.DEFAULT_NS_ITERS))
        ref = ref.transpose(0, 1).reshape(300, 24)
    else:  # zca: eigh autograd
        ref = Wh.whiten_reference(x, 4, eps=0.0, method=method, ddof=ddof)
    assert torch.allclose(y, ref, atol=1e-10)


def _newton_schulz(S, iters):
    """shared/reference/whitening.md: c = ||S||_F, Y0 = S/c, Z0 = I, T = (3I - Z Y)/2,
    Y <- Y T, Z <- T Z, W = Z / sqrt(c); one matrix at a time."""
    out = []
    for Sg in S:
        c = Sg.norm()
        eye = torch.eye(Sg.shape[0], dtype=Sg.dtype)
        Y, Z = Sg / c, eye
        for _ in range(iters):
            T = (3 * eye - Z @ Y) / 2
            Y, Z = Y @ T, T @ Z
        out.append(Z / c.sqrt())
    return torch.stack(out)


def test_newton_schulz_iteration_count():
    """For a diagonal S the coupled iteration acts on each eigenvalue alone:
    y0 = l / c, z0 = 1, t = (3 - z y) / 2, y <- y t, z <- t z; W = z / sqrt(c)."""
    lam = torch.tensor([1.0, 0.3, 0.05], dtype=torch.float64)
    c = lam.norm()
    for iters in (1, 2, 3, 7):
        y, z = lam / c, torch.ones(3, dtype=torch.float64)
        for _ in range(iters):
            t = (3 - z * y) / 2
            y, z = y * t, t * z
        W = Wh.newton_schulz_matrix(torch.diag(lam)[None], iters)[0]
        assert torch.allclose(W, torch.diag(z / c.sqrt()), atol=1e-14), iters


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_low_precision_inputs_against_float64(method, dtype):
    """16-bit and fp32 inputs: statistics in fp32, output and gradients close to float64."""
    x64 = _x(256, 32, seed=4, offset=20.0).to(dtype).double()
    gy = torch.randn(256, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x64.clone().requires_grad_()
    ref = FCL.group_whiten(x, 4, method=method, backend="torch")
    (ref * gy).sum().backward()
    xl = x64.to(dtype).requires_grad_()
    y = FCL.group_whiten(xl, 4, method=method, backend="torch")
    assert y.dtype == dtype
    (y.float() * gy.float()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    assert (y.double() - ref).norm() / ref.norm() < tol
    assert (xl.grad.double() - x.grad).norm() / x.grad.norm() < tol * 10


@pytest.mark.parametrize("backend", ["triton", "cuda"])  # skipped where unusable (conftest)
@pytest.mark.parametrize("iters", [3, None])  # 3: not converged, so every iteration shows
def test_kernel_newton_schulz_matches_torch(backend, iters):
    x = _x(96, 40, seed=6, offset=3.0, dtype=torch.float32).to(DEVICE)
    gy = torch.randn(96, 40, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    outs = []
    for b in ("torch", backend):
        xx = x.clone().requires_grad_()
        y = FCL.group_whiten(xx, 5, method="newton_schulz", iters=iters, backend=b)  # g = 8
        (y * gy).sum().backward()
        outs.append((y, xx.grad))
    (y_t, g_t), (y_k, g_k) = outs
    assert torch.allclose(y_k, y_t, atol=1e-4) and torch.allclose(g_k, g_t, atol=1e-3)


@pytest.mark.parametrize("backend", ["triton", "cuda"])  # skipped where unusable (conftest)
def test_kernel_backend_runs_its_kernel(backend, monkeypatch):
    """backend="triton" (or "cuda") runs that backend's kernel, once for all groups: the
    comparisons with torch above would pass if it quietly ran torch's iteration instead."""
    from fastcl import cuda_backend
    from fastcl.kernels import whitening as KW
    mod = KW if backend == "triton" else cuda_backend
    calls, kernel = [], mod.newton_schulz_whitening_matrix
    monkeypatch.setattr(mod, "newton_schulz_whitening_matrix",
                        lambda S, iters: calls.append((tuple(S.shape), iters)) or kernel(S, iters))
    FCL.group_whiten(_x(96, 40, seed=6, dtype=torch.float32).to(DEVICE), 5, method="newton_schulz",
                     iters=4, backend=backend)
    assert calls == [((5, 8, 8), 4)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_padding_stays_out_of_many_iterations(backend):
    """g = 24 runs padded to 32: the identity must cover the valid block only. Padding on the
    diagonal grows by 1.5 per iteration, apart from the valid block until it overflows (~220
    iterations), and then 0 * inf made the whole group NaN."""
    S = _group_cov(_x(200, 48, seed=8, dtype=torch.float32), 2).float().to(DEVICE)
    S = S + 1e-3 * torch.eye(24, device=DEVICE)
    W = torch.ops.fastcl.newton_schulz_kernel(S, 300, backend)
    assert torch.isfinite(W).all()
    assert torch.allclose(W.double().cpu(), Wh.zca_matrix(S.double().cpu())[0], atol=1e-3)


@pytest.mark.parametrize("backend,limit", [("triton", 64), ("cuda", 128)])
def test_kernel_group_size_limit(backend, limit):
    """Groups of `limit` run on the kernel (CUDA: one block per group, the largest that fits;
    Triton: at 128 its compile took over 100 s on the H100); one more is refused by name,
    before any kernel sees it, and so is the raw op's."""
    x = _x(300, limit, seed=9, dtype=torch.float32).to(DEVICE)
    y = FCL.group_whiten(x, 1, method="newton_schulz", iters=3, backend=backend)
    want = FCL.group_whiten(x, 1, method="newton_schulz", iters=3, backend="torch")
    assert torch.allclose(y, want, atol=1e-4)
    with pytest.raises(fastcl.BackendUnavailable, match=f"group size {limit + 1} > {limit}"):
        FCL.group_whiten(_x(300, limit + 1, seed=9, dtype=torch.float32).to(DEVICE), 1, method="newton_schulz",
                         backend=backend)
    with pytest.raises(ValueError, match=f"g <= {limit}"):
        torch.ops.fastcl.newton_schulz_kernel(torch.eye(limit + 1, device=DEVICE)[None], 3, backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])  # skipped where unusable
@pytest.mark.parametrize("N,g,eps", [(5, 16, 1e-3), (12, 16, 1e-4)])
def test_newton_schulz_gradient_on_ill_conditioned_groups(backend, N, g, eps):
    """N <= g: the covariance's spectrum spans eps to ~1. The backward's two terms (gy W^T and
    the covariance path) nearly cancel; built from the kernel's W and torch's recomputed one,
    they gave 10-130x naive fp32's gradient error (Triton: 3e-3 against 7e-5)."""
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(N, g, generator=gen, dtype=torch.float64).float().double()
    gy = torch.randn(N, g, generator=gen, dtype=torch.float64)

    def grad(b, dtype, device):
        xx = x.to(device, dtype).clone().requires_grad_()
        y = FCL.group_whiten(xx, 1, eps=eps, method="newton_schulz", backend=b)
        (y * gy.to(device, dtype)).sum().backward()
        return xx.grad.double().cpu()

    ref = grad("reference", torch.float64, "cpu")
    assert_within_budget("dx", grad(backend, torch.float32, DEVICE), grad("reference", torch.float32, DEVICE),
                         ref, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])  # skipped where unusable
@pytest.mark.parametrize("scale,eps", [(1e10, 1e-5), (1e-13, 0.0)])
def test_newton_schulz_at_extreme_feature_scales(backend, scale, eps):
    """fp32 features of scale 1e10 (1e-13): the iteration's c = ||S||_F squares S's entries,
    ~1e20 (1e-26), which overflowed to inf (underflowed): y came out all zeros with no error
    (all NaN), where ZCA of the same features was right to 1e-7."""
    gen = torch.Generator().manual_seed(3)
    x = (scale * torch.randn(64, 16, generator=gen, dtype=torch.float64)).float().double()
    gy = torch.randn(64, 16, generator=gen, dtype=torch.float64)

    def run(b, dtype, device):
        xx = x.to(device, dtype).clone().requires_grad_()
        y = FCL.group_whiten(xx, 2, eps=eps, method="newton_schulz", backend=b)
        (y * gy.to(device, dtype)).sum().backward()
        return y.detach().double().cpu(), xx.grad.double().cpu()

    (y, dx), (y_ref, dx_ref) = run(backend, torch.float32, DEVICE), run("reference", torch.float64, "cpu")
    assert rel_err(y, y_ref) < 1e-5, rel_err(y, y_ref)
    assert rel_err(dx, dx_ref) < 1e-4, rel_err(dx, dx_ref)


def test_newton_schulz_power_of_two_balance_changes_no_bit():
    """W(S) = W(S / f^2) / f with f a power of two: at ordinary scales the same bits as the
    iteration on S itself."""
    S = _group_cov(_x(64, 32, seed=5, dtype=torch.float32), 2).float() + 1e-3 * torch.eye(16)
    eye = torch.eye(16).expand_as(S)
    c = torch.linalg.matrix_norm(S, keepdim=True)
    Y, Z = S / c, eye
    for _ in range(Wh.DEFAULT_NS_ITERS):
        T = 1.5 * eye - 0.5 * (Z @ Y)
        Y, Z = Y @ T, T @ Z
    assert (Wh.pow2_balance(S) != 1).all()
    assert torch.equal(Wh.newton_schulz_matrix(S, Wh.DEFAULT_NS_ITERS), Z / c.sqrt())


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_writes_every_entry(backend):
    S = _group_cov(_x(64, 48, seed=8, dtype=torch.float32), 2).float().to(DEVICE)  # g = 24 (Triton pads to 32)
    if backend == "triton":
        from fastcl.kernels import whitening as K
    else:
        from fastcl import cuda_backend as K
    W = K.newton_schulz_whitening_matrix(S, 20)
    assert torch.isfinite(W).all()
    assert torch.allclose(W.double(), Wh.zca_matrix(S.double())[0], atol=1e-3)


def test_analytic_zca_backward_finite_where_eigh_autograd_is_not():
    """Orthonormal zero-mean columns: the covariance is I/N, every eigenvalue repeated."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(20, 4, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(a - a.mean(0))
    x = q.clone().requires_grad_()
    gy = torch.randn(20, 4, generator=g, dtype=torch.float64)

    y = FCL.group_whiten(x, 1, eps=0.0, method="zca", backend="torch")
    (y * gy).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.autograd.gradcheck(lambda x: FCL.group_whiten(x, 1, eps=0.0, backend="torch"), (x,))

    x2 = q.clone().requires_grad_()
    (Wh.whiten_reference(x2, 1, eps=0.0) * gy).sum().backward()
    # eigh's backward divides by lambda_i - lambda_j: inf/NaN where LAPACK returns equal eigenvalues
    # (this machine's), garbage where it returns ones a rounding error apart (seen on the GPU
    # machine's torch build).
    assert rel_err(x2.grad, x.grad) > 1e-3  # inf when not finite


def test_zca_equals_scaled_polar_factor():
    x = _x(50, 5, seed=10, offset=2.0)
    xc = x - x.mean(0)
    u, _, vh = torch.linalg.svd(xc, full_matrices=False)
    polar = u @ vh
    y = FCL.group_whiten(x, 1, eps=0.0, method="zca", backend="torch")
    assert torch.allclose(y, 50 ** 0.5 * polar, atol=1e-10)


def test_zca_invariant_to_channel_order_within_group():
    x = _x(80, 6, seed=11)
    p = torch.tensor([2, 0, 1, 5, 3, 4])  # permutes inside each of the 2 groups
    y = FCL.group_whiten(x, 2, method="zca", backend="torch")
    assert torch.allclose(FCL.group_whiten(x[:, p], 2, method="zca", backend="torch"), y[:, p], atol=1e-10)
    c = FCL.group_whiten(x, 2, method="cholesky", backend="torch")
    assert not torch.allclose(FCL.group_whiten(x[:, p], 2, method="cholesky", backend="torch"), c[:, p])


def test_perm_groups_permuted_channels_and_restores_order():
    x = _x(64, 8, seed=12)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(13))
    y = FCL.group_whiten(x, 2, perm=perm, backend="torch")
    expected = torch.empty_like(x)
    expected[:, perm] = FCL.group_whiten(x[:, perm], 2, backend="torch")
    assert torch.allclose(y, expected)


def test_newton_schulz_converges_to_zca():
    x = _x(200, 16, seed=14, offset=5.0)
    zca = FCL.group_whiten(x, 2, method="zca", backend="torch")
    errs = [float((FCL.group_whiten(x, 2, method="newton_schulz", iters=i, backend="torch") - zca).abs().max())
            for i in (2, 4, 8, 16)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    y32 = FCL.group_whiten(x.float(), 2, method="newton_schulz", backend="torch")  # default iters
    assert float((y32.double() - zca).abs().max()) < 1e-4


def test_badly_conditioned_few_samples_large_mean():
    """N only slightly above the group size and a mean offset of 1e4: two-pass centring holds."""
    x = _x(20, 16, seed=15, offset=1e4)
    for method in METHODS:
        y = FCL.group_whiten(x.float(), 1, eps=1e-6, method=method, backend="torch")
        ref = Wh.whiten_reference(x, 1, eps=1e-6, method=method)
        assert (y.double() - ref).norm() / ref.norm() < 2e-2, method


def test_shuffled_group_whiten():
    x = _x(40, 12, seed=16)
    views = FCL.shuffled_group_whiten(x, 3, k=4, generator=torch.Generator().manual_seed(0), backend="torch")
    assert views.shape == (4, 40, 12)
    again = FCL.shuffled_group_whiten(x, 3, k=4, generator=torch.Generator().manual_seed(0), backend="torch")
    assert torch.equal(views, again)
    assert not torch.allclose(views[0], views[1])  # different permutations, different views
    gen = torch.Generator().manual_seed(0)
    perms = [torch.randperm(12, generator=gen) for _ in range(4)]
    for v, p in zip(views, perms):
        assert torch.allclose(v, FCL.group_whiten(x, 3, perm=p, backend="torch"))
    # one batch per view: view i is batch i whitened with perm i (independent batches, so a
    # mix-up of views or perms shows: x, 2x and x + 1 whiten alike)
    xs = torch.stack([_x(40, 12, seed=s) for s in (30, 31, 32)])
    views = FCL.shuffled_group_whiten(xs, 3, k=3, generator=torch.Generator().manual_seed(1), backend="torch")
    assert views.shape == (3, 40, 12)
    gen = torch.Generator().manual_seed(1)
    for xi, v in zip(xs, views):
        assert torch.allclose(v, FCL.group_whiten(xi, 3, perm=torch.randperm(12, generator=gen), backend="torch"))


def test_module_running_statistics():
    m = fastcl.nn.GroupWhitening(8, 2, momentum=0.5)
    x = _x(128, 8, seed=17, offset=3.0, dtype=torch.float32)
    y = m(x)
    assert torch.allclose(y, FCL.group_whiten(x, 2))
    for _ in range(30):
        m(x)
    m.eval()
    ye = m(x)
    assert torch.allclose(_group_cov(ye, 2), torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-3)
    assert torch.allclose(m.running_mean, x.mean(0), atol=1e-5)
    # eval applies exactly (x - running_mean) @ running_whitening, group by group
    xc = (x - m.running_mean).reshape(128, 2, 4).transpose(0, 1)
    assert torch.allclose(ye, (xc @ m.running_whitening).transpose(0, 1).reshape(128, 8), atol=1e-6)


def test_module_momentum():
    """running = (1 - momentum) * running + momentum * batch, as in BatchNorm."""
    m = fastcl.nn.GroupWhitening(8, 2, momentum=0.1)
    x = _x(128, 8, seed=21, offset=3.0, dtype=torch.float32)
    _, W = FCL.group_whiten(x, 2, return_matrix=True)
    m(x)
    assert torch.allclose(m.running_mean, 0.1 * x.mean(0), atol=1e-6)
    eye = torch.eye(4).expand(2, 4, 4)
    assert torch.allclose(m.running_whitening, 0.9 * eye + 0.1 * W, atol=1e-6)


@pytest.mark.parametrize("method", ["zca", "newton_schulz"])
def test_module_and_matrix_with_reference_backend(method):
    x = _x(64, 8, seed=19, offset=1.0, dtype=torch.float64)
    y_ref, W_ref = FCL.group_whiten(x, 2, method=method, backend="reference", return_matrix=True)
    y, W = FCL.group_whiten(x, 2, method=method, backend="torch", return_matrix=True)
    assert W_ref.shape == (2, 4, 4) and not W_ref.requires_grad
    assert torch.allclose(W_ref, W, atol=1e-10) and torch.allclose(y_ref, y, atol=1e-10)
    if method == "newton_schulz":  # the reference backend shares fastcl's iteration: check it too
        xg = x.reshape(64, 2, 4).transpose(0, 1)
        xc = xg - xg.mean(1, keepdim=True)
        S = xc.transpose(-1, -2) @ xc / 64 + 1e-5 * torch.eye(4, dtype=torch.float64)
        assert torch.allclose(W, _newton_schulz(S, Wh.DEFAULT_NS_ITERS), atol=1e-12)
    m_ref = fastcl.nn.GroupWhitening(8, 2, method=method, momentum=0.5, backend="reference").double()
    m = fastcl.nn.GroupWhitening(8, 2, method=method, momentum=0.5, backend="torch").double()
    assert torch.allclose(m_ref(x), m(x), atol=1e-10)
    assert torch.allclose(m_ref.running_whitening, m.running_whitening, atol=1e-10)
    m_ref.eval(), m.eval()
    assert torch.allclose(m_ref(x), m(x), atol=1e-10)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: FCL.group_whiten(torch.randn(10, 6), 4), ValueError, "divisor"),
    (lambda: FCL.group_whiten(torch.randn(3, 8), 1, eps=0.0), ValueError, "singular"),
    (lambda: FCL.group_whiten(torch.randn(40, 4, generator=torch.Generator().manual_seed(0)).repeat(1, 2), 1,
                              eps=0.0, backend="torch"), ValueError, "rank-deficient"),
    (lambda: FCL.group_whiten(torch.randn(10, 6), 2, method="pca"), ValueError, "method"),
    # NaN in x with eps=0: LAPACK's "failed to converge" (zca), or a "singular" that misleads
    *[(lambda m=m, b=b: FCL.group_whiten(torch.randn(16, 8).index_fill_(0, torch.tensor([3]), float("nan")), 2,
                                         eps=0.0, method=m, backend=b), ValueError, "NaN or inf")
      for m in ("zca", "cholesky", "newton_schulz") for b in ("torch", "reference")],
    (lambda: FCL.group_whiten(torch.randn(10, 6), 2, perm=torch.tensor([0, 1, 2, 3, 4, 4])), ValueError, "permutation"),
    (lambda: FCL.group_whiten(torch.randn(10, 6), 2, iters=5), ValueError, "Newton-Schulz"),
    (lambda: FCL.group_whiten(torch.randn(10), 1), ValueError, "2-D"),
    (lambda: FCL.group_whiten(torch.randn(10, 6), 2, backend="triton"), fastcl.BackendUnavailable, "newton_schulz"),
    (lambda: FCL.shuffled_group_whiten(torch.randn(2, 10, 6), 2, k=3), ValueError, "views"),
    (lambda: FCL.group_whiten(torch.randn(10, 6), 2, ddof=-3), ValueError, "ddof"),
    (lambda: FCL.group_whiten(torch.randn(10, 6), 2, ddof=0.5), ValueError, "ddof"),
    (lambda: fastcl.nn.GroupWhitening(8, 0), ValueError, "positive divisor"),
    (lambda: fastcl.nn.GroupWhitening(8, 3), ValueError, "positive divisor"),
    (lambda: fastcl.nn.GroupWhitening(8, True), ValueError, "positive divisor"),
    (lambda: FCL.group_whiten(torch.randn(10, 6), True), ValueError, "positive divisor"),
    (lambda: fastcl.nn.GroupWhitening(8, 2, method="pca"), ValueError, "method"),  # at construction
    (lambda: fastcl.nn.GroupWhitening(8, 2, iters=5), ValueError, "Newton-Schulz"),
    (lambda: fastcl.nn.GroupWhitening(8, 2, eps=-1.0), ValueError, "eps"),
    (lambda: fastcl.nn.GroupWhitening(8, 2, momentum=None), ValueError, "momentum"),
    (lambda: fastcl.nn.GroupWhitening(8, 2, momentum=1.5), ValueError, "momentum"),
    (lambda: FCL.shuffled_group_whiten(torch.randn(10, 6), 2, k=0), ValueError, "number of views"),
    # N = g: centring leaves N - 1 = 7 degrees of freedom for 8 channels, whatever ddof is
    (lambda: FCL.group_whiten(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) + 3, 1, eps=0.0),
     ValueError, "singular"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_fp32_groups_are_refused(method):
    """One channel the sum of two others: fp32 rounding leaves the smallest eigenvalue at
    ~1e-7 of the largest, not 0. Every seed must be refused, not whitened to garbage."""
    for seed in range(12):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed)) + 3
        x[:, 7] = x[:, 0] + x[:, 1]
        with pytest.raises(ValueError, match="singular"):
            FCL.group_whiten(x, 1, eps=0.0, method=method, backend="torch")


@pytest.mark.parametrize("method", ["zca", "cholesky"])
@pytest.mark.parametrize("detach_stats", [False, True])
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("scale, dtype, budget", [(10, torch.float32, 1e-6), (100, torch.float32, 1e-6),
                                                  (100, torch.float16, 3e-3)], ids=str)
def test_groups_with_fewer_samples_than_channels(method, detach_stats, backend, scale, dtype, budget):
    """N - 1 < g with eps > 0, features at scale 10 to 100 around a mean of 3x that:
    - the fp32 Gram's zero eigenvalues rounded to +-1e-3, far from eps. ZCA whitened that noise
      to ~1e14, Cholesky refused the matrix as not positive-definite, and the detach_stats
      gradient took 1/sqrt(noise) for 1/sqrt(eps);
    - with the Gram alone in fp64, the fp32 centring (whose rounding W amplifies by eps^-1/2)
      and the fp32 backward, whose two terms cancel there, left 1e-2 in the output and 0.66
      (ZCA) and 8.4 (Cholesky) in the gradient at scale 100 (naive fp32 ZCA: 2.4e-2).
    Against float64 on the same (rounded) values; 16-bit x computes in fp32, so in fp64 too."""
    g = torch.Generator().manual_seed(40)
    x64 = (torch.randn(16, 128, generator=g, dtype=torch.float64) * scale + 3 * scale).to(dtype).double()
    gy = torch.randn(16, 128, generator=g, dtype=torch.float64)
    outs = []
    for dt in (torch.float64, dtype):
        x = x64.to(dt).detach().requires_grad_()
        y = FCL.group_whiten(x, 2, method=method, detach_stats=detach_stats, backend=backend)
        (y.double() * gy).sum().backward()
        outs.append((y, x.grad))
    (y64, g64), (y_, g_) = outs
    assert y_.dtype == dtype
    # measured 2e-8 to 5e-8 (fp32), 2e-4 to 6e-4 (fp16); before: 1.3e-3 to 1e-2 (output) and up
    # to 8.4 (gradient)
    assert rel_err(y_, y64) < budget
    assert rel_err(g_, g64) < budget


def test_fp64_throughout_only_where_a_group_is_rank_deficient():
    """fp64 centring, W and backward cost ~3x on a CPU: only for N - 1 < g, and only for the
    factorising methods on fp32 statistics (the Gram alone is fp64 for those: stats_dtype)."""
    from fastcl.whitening import run_dtype
    xg = lambda N, g, dt=torch.float32: torch.zeros(2, N, g, dtype=dt)  # noqa: E731
    assert run_dtype("zca", xg(64, 64)) == torch.float64
    assert run_dtype("cholesky", xg(8, 64)) == torch.float64
    assert run_dtype("zca", xg(65, 64)) == torch.float32
    assert run_dtype("newton_schulz", xg(8, 64)) == torch.float32
    assert run_dtype("zca", xg(8, 64, torch.float64)) == torch.float64


@pytest.mark.parametrize("method", ["zca", "cholesky"])
def test_nan_in_x_is_named_with_eps(method):
    """eps > 0: LAPACK's own error ("failed to converge", "not positive-definite") named NaN."""
    x = torch.randn(16, 8)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        FCL.group_whiten(x, 2, method=method, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_reference_backend_takes_16_bit_inputs_in_fp32(dtype, method):
    """The reference backend computes in the statistics' dtype, as the others (eigh and
    Cholesky have no 16-bit kernels: it raised; its Newton-Schulz ran in 16 bits, 4-7x the
    error)."""
    x = _x(64, 8, seed=41, offset=3.0, dtype=dtype)
    y = FCL.group_whiten(x, 2, method=method, backend="reference")
    assert y.dtype == dtype
    torch.testing.assert_close(y, FCL.group_whiten(x, 2, method=method, backend="torch"))


def test_well_conditioned_fp32_groups_are_accepted():
    """The singularity tolerance is about rank, not conditioning: kappa ~1e4 in fp32 passes."""
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * torch.logspace(0, -2, 8, dtype=torch.float64)  # eigenvalues spread over 1e4
    y = FCL.group_whiten(x.float(), 1, eps=0.0, method="zca", backend="torch")
    assert torch.allclose(_group_cov(y, 1), torch.eye(8, dtype=torch.float64)[None], atol=2e-2)


@pytest.mark.parametrize("method", METHODS)
def test_double_backward_raises(method):
    """The analytic backward is not itself differentiable: a gradient penalty must fail loudly,
    not return a wrong second derivative."""
    x = _x(16, 4, seed=22).requires_grad_()
    y = FCL.group_whiten(x, 2, method=method, backend="torch")
    with pytest.raises(RuntimeError, match="backend='reference'"):
        torch.autograd.grad((y * y.detach().flip(0)).sum(), x, create_graph=True)
    # The reference backend (plain autograd) has second derivatives.
    x = _x(10, 4, seed=22).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x: FCL.group_whiten(x, 2, eps=1e-3, method=method, backend="reference"), (x,))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)], ids=str)
def test_module_eval_in_16_bit_computes_in_fp32(dtype, tol):
    """With momentum 1 the running statistics are the batch's, so eval mode must whiten like
    the exact float64 op, to the output's rounding (as training mode does): the running mean
    and the centring in fp32, not 16 bits (a bf16 mean of data at 30 +- 1 is off by ~0.06)."""
    m = fastcl.nn.GroupWhitening(8, 2, momentum=1.0)
    x = _x(128, 8, seed=23, offset=30.3, dtype=torch.float32).to(dtype)
    exact = FCL.group_whiten(x.double(), 2, backend="torch")
    assert rel_err(m(x).double(), exact) < tol  # training mode
    m.eval()
    y = m(x)
    assert y.dtype == dtype
    assert rel_err(y.double(), exact) < tol


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_take_bf16_inputs_as_fp32_statistics(backend):
    """The kernels see only fp32 statistics, so the dispatch asks about fp32: bf16 inputs run
    on them (in the Triton interpreter too, which refuses bf16 operands) and match the torch
    iteration to the output's rounding."""
    x = _x(96, 16, seed=19, dtype=torch.bfloat16).to(DEVICE)
    want = FCL.group_whiten(x, 2, method="newton_schulz", backend="torch")
    got = FCL.group_whiten(x, 2, method="newton_schulz", backend=backend)
    assert got.dtype == torch.bfloat16
    assert rel_err(got.double(), want.double()) < 1e-2


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_on_gpu_bf16(backend):
    x = _x(512, 256, seed=18, dtype=torch.bfloat16).cuda()
    y = FCL.group_whiten(x, 4, method="newton_schulz", backend=backend)  # g = 64
    assert torch.allclose(_group_cov(y, 4).cpu(), torch.eye(64, dtype=torch.float64).expand(4, 64, 64), atol=5e-2)


def test_compiles_fullgraph_with_value_checks():
    """perm, shuffled groups and eps=0 compile with fullgraph=True: their value checks (a
    permutation, a non-singular covariance) become device-side asserts there, which still
    refuse bad values, instead of host checks on data (which fullgraph cannot trace)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    perm = torch.randperm(8, generator=g)
    compile = lambda f: torch.compile(f, backend="aot_eager", fullgraph=True)  # noqa: E731
    torch._dynamo.reset()
    for f in (lambda x: FCL.group_whiten(x, 2, perm=perm, backend="torch"),
              lambda x: FCL.group_whiten(x, 2, eps=0.0, backend="torch")):
        torch.testing.assert_close(compile(f)(x), f(x))
    m = fastcl.nn.GroupWhitening(8, 2, eps=0.0, backend="torch")
    assert compile(m)(x).shape == x.shape
    assert compile(lambda x: FCL.shuffled_group_whiten(x, 2, backend="torch"))(x).shape == (3, 64, 8)
    with pytest.raises(RuntimeError, match="permutation"):
        compile(lambda x: FCL.group_whiten(x, 2, perm=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]),
                                           backend="torch"))(x)
    xs = x.clone()
    xs[:, 1] = xs[:, 0]
    with pytest.raises(RuntimeError, match="singular"):
        compile(lambda x: FCL.group_whiten(x, 2, eps=0.0, backend="torch"))(xs)
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["zca", "cholesky", "newton_schulz"])
def test_autocast_does_not_lower_the_statistics(method):
    """Under CPU bf16 autocast (an encoder's AMP region) the Gram matrix and y = xc @ W used to run
    in bf16 while the output still said fp32: 1e-2 off. Whitening now computes as without
    autocast, forward, backward (also when backward() is called inside the region) and eval."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * 3 + 1
    w = torch.linspace(0, 1, 16)
    out = []
    for autocast in (False, True):
        xx = x.clone().requires_grad_()
        m = fastcl.nn.GroupWhitening(16, 2, method=method, backend="torch")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xx)
            (y * w).sum().backward()
            m.eval()
            y_eval = m(x)
        out.append((y.detach(), xx.grad, y_eval))
    for name, a, b in zip(["y", "dx", "eval y"], *out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_compiled_eval_gradient_under_autocast():
    """Eval mode's y = (x - mean) @ W, compiled under CPU bf16 autocast: the matmul ran in a
    no_autocast region, but AOTAutograd traced its backward with autocast on: dx 1.6e-3 off
    (bf16), where eager is exact in fp32."""
    g = torch.Generator().manual_seed(0)
    m = fastcl.nn.GroupWhitening(16, 2, backend="torch")
    m(torch.randn(64, 16, generator=g))
    m.eval()
    x0, w = torch.randn(18, 16, generator=g), torch.randn(18, 16, generator=g)
    want = (w.double() @ torch.block_diag(*m.running_whitening.double()).T).float()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-6)


def test_module_refuses_batches_too_small_for_its_running_matrix():
    """N <= g centred samples give a singular covariance; its W (entries ~ eps^-1/2) blended
    into the running matrix made eval's output variance ~1e4 after one 1-sample batch."""
    m = fastcl.nn.GroupWhitening(8, 2)
    x = _x(64, 8, seed=3, offset=1.0, dtype=torch.float32)
    m(x)
    before = (m.running_mean.clone(), m.running_whitening.clone())
    for n in (1, 4):
        with pytest.raises(ValueError, match="more samples than channels per group"):
            m(x[:n])
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_whitening, before[1])
    assert m(x[:5]).shape == (5, 8)  # N = g + 1 is full rank
    free = fastcl.nn.GroupWhitening(8, 2, track_running_stats=False)
    assert free(x[:2]).shape == (2, 8)  # no running matrix to spoil: batch statistics, eps


def test_module_eval_on_an_empty_batch_and_numpy_sizes():
    m = fastcl.nn.GroupWhitening(np.int64(8), np.int64(2), momentum=np.float32(0.5)).eval()
    assert m.num_features == 8 and type(m.num_features) is int  # BatchNorm1d takes np.int64 too
    out = m(torch.empty(0, 8))  # a reshape error before; BatchNorm returns [0, D] in eval
    assert out.shape == (0, 8)


def test_module_checks_its_backend_when_built():
    with pytest.raises(ValueError, match="backend must be one of"):
        fastcl.nn.GroupWhitening(8, 2, backend="gpu")
    with pytest.raises(fastcl.BackendUnavailable, match="newton_schulz"):
        fastcl.nn.GroupWhitening(8, 2, method="zca", backend="triton")  # failed at the first forward
    with pytest.raises(fastcl.BackendUnavailable, match="newton_schulz"):
        fastcl.nn.GroupWhitening(8, 2, method="cholesky", backend="cuda")
    fastcl.nn.GroupWhitening(8, 2, method="newton_schulz", backend="triton")


@pytest.mark.parametrize("method", ["cholesky", "newton_schulz"])
def test_compiles_fullgraph_with_gradients(method):
    """Dynamo traced the Function's backward, whose torch.autograd.grad it cannot trace: with an
    input that needs a gradient, cholesky and Newton-Schulz did not compile with fullgraph."""
    torch._dynamo.reset()
    x = _x(24, 8, seed=4)
    gy = torch.randn(24, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for compiled in (True, False):
        xx = x.clone().requires_grad_()
        f = lambda v: FCL.group_whiten(v, 2, method=method, backend="torch")  # noqa: E731
        f = torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f
        (f(xx) * gy).sum().backward()
        grads.append(xx.grad)
    torch.testing.assert_close(grads[0], grads[1])
    m = torch.compile(fastcl.nn.GroupWhitening(8, 2, method=method, backend="torch"), backend="aot_eager",
                      fullgraph=True)
    assert m(x.clone().requires_grad_()).shape == x.shape
    # the matrix comes back detached, as in eager mode
    fw = torch.compile(lambda v: FCL.group_whiten(v, 2, method=method, backend="torch", return_matrix=True),
                       backend="aot_eager", fullgraph=True)
    assert not fw(x.clone().requires_grad_())[1].requires_grad
    # and a singular group with eps=0 is still refused on this path
    xs = x.clone()
    xs[:, 1] = xs[:, 0]
    f0 = torch.compile(lambda v: FCL.group_whiten(v, 1, eps=0.0, method=method, backend="torch"),
                       backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="singular"):
        f0(xs.requires_grad_())
    torch._dynamo.reset()


def test_compiles_with_dynamic_shapes_and_a_changing_eps():
    """math.isfinite(eps) could not be traced once eps (or the shapes) became symbolic."""
    torch._dynamo.reset()
    f = torch.compile(lambda x, e: FCL.group_whiten(x, 2, eps=e, backend="torch"), backend="aot_eager",
                      fullgraph=True, dynamic=True)
    for n, e in ((12, 1e-5), (17, 2e-5), (30, 3e-5)):
        x = _x(n, 8, seed=n)
        torch.testing.assert_close(f(x, e), FCL.group_whiten(x, 2, eps=e, backend="torch"))
    ns = torch.compile(lambda x, e: FCL.group_whiten(x, 2, eps=e, method="newton_schulz", backend="torch"),
                       backend="aot_eager", dynamic=True)
    ns(_x(12, 8), 1e-5), ns(_x(12, 8), 2e-5)
    with pytest.raises(ValueError, match="finite"):  # "eps < inf" would guard nothing: NaN out
        ns(_x(12, 8), math.inf)
    torch._dynamo.reset()


def test_reference_backend_refuses_a_singular_group_with_eps_0():
    """As the other backends do; the reference returned NaN."""
    x = _x(64, 8, seed=2)
    x[:, 1] = x[:, 0]  # N > g, but two equal channels: singular
    with pytest.raises(ValueError, match="singular"):
        FCL.group_whiten(x, 1, eps=0.0, backend="reference")
