import importlib.util
import math
import platform

import pytest
import torch
import torch.nn.functional as F

import fastcl
import fastcl.functional as FCL
from fastcl import chunked
from conftest import DEVICE, HAS_CUDA, KERNEL_BACKENDS, USABLE_BACKENDS
from helpers import FLAG_CASES, assert_within_budget

BACKENDS = KERNEL_BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _interpreter_bf16(backend, dtype):
    """The Triton interpreter computes bf16 wrongly, so fastcl refuses it (see test_errors)."""
    return backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA
# (B, N, D): B=1, D=1, odd D, B not a multiple of the tile (32 in the interpreter, 64/128 on
# GPUs), N > B (extra negatives), several row blocks per persistent program.
SHAPES = [(1, 1, 1), (5, 5, 7), (33, 33, 1), (70, 70, 33), (45, 100, 20), (130, 130, 65)]
if HAS_CUDA:
    SHAPES += [(257, 257, 129), (300, 1000, 64), (1000, 1000, 512)]


def _inputs(B, N, D, dtype, seed, scale_value=None, corr=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    k = torch.randn(N, D, generator=g, dtype=torch.float64)
    # Correlated positives, like a trained model's, so the loss is not trivially log(N).
    k[:B] += corr * q[: min(B, N)]
    return q.to(dtype).double(), k.to(dtype).double()  # values exactly representable in dtype


def _run(fn, q, k, ls, dtype, device, upstream, **kw):
    leaf = lambda t, dt: t.detach().to(device=device, dtype=dt).clone().requires_grad_()  # noqa: E731
    qq, kk = leaf(q, dtype), leaf(k, dtype)
    lls = leaf(ls, torch.float32 if dtype != torch.float64 else dtype)
    out = fn(qq, kk, logit_scale=lls, **kw)
    w = upstream.to(device=device, dtype=out.dtype) if out.dim() else None
    (out * w).sum().backward() if w is not None else out.backward()
    return out.detach(), qq.grad, kk.grad, lls.grad


def _check(backend, B, N, D, dtype, temperature, symmetric=False, labels=None, reduction="none",
           normalize=True, seed=0, corr=2.0, floor=None):
    q, k = _inputs(B, N, D, dtype, seed, corr=corr)
    ls = torch.tensor(math.log(1.0 / temperature), dtype=torch.float64)
    upstream = torch.rand(B, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    kw = dict(symmetric=symmetric, labels=labels, reduction=reduction, normalize=normalize)
    lab = None if labels is None else labels.to(DEVICE)
    ref = _run(fastcl.info_nce_reference, q, k, ls, torch.float64, "cpu", upstream, **{**kw, "labels": labels})
    naive = _run(fastcl.info_nce_reference, q, k, ls, dtype, DEVICE, upstream, **{**kw, "labels": lab})
    ours = _run(FCL.info_nce, q, k, ls, dtype, DEVICE, upstream, backend=backend, **{**kw, "labels": lab})
    assert ours[0].shape == ref[0].shape
    assert ours[0].dtype == torch.float32  # the loss comes back in fp32 for 16-bit inputs too
    for name, a, b, r in zip(["loss", "dq", "dk", "dlogit_scale"], ours, naive, ref):
        assert_within_budget(name, a, b, r, dtype, floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_fp32(backend, symmetric, shape):
    B, N, D = shape
    if symmetric and N != B:
        pytest.skip("symmetric needs N == B")
    # In 1-D, x/|x| is piecewise constant: the exact gradient is 0 and both sides would compare
    # rounding noise amplified by 1/|x|. Test D=1 on raw dot products instead.
    # On a GPU, Triton's fp32 dots are 3xTF32 (about 2^-21 per product, cuBLAS fp32's 2^-24):
    # d logit_scale, a sum of B*N terms that cancel, came to 2.02e-6 at 1000x1000x512 on the
    # H100 (2026-11-24), against the fp32 floor of 2e-6 and naive fp32's 4.2e-7.
    floor = 4e-6 if backend == "triton" and HAS_CUDA else None
    _check(backend, B, N, D, torch.float32, 0.07 if D > 1 else 4.0, symmetric=symmetric, normalize=D > 1,
           floor=floor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("log_scale", [-120.0, -800.0, -1e4])
def test_logit_scale_whose_exp_underflows(backend, dtype, log_scale):
    """exp(logit_scale) = 0: dL/ds, formed as sum(G S) / s, was 0/0, and d logit_scale = s dL/ds
    NaN (an SGD step of lr = 10 took ClipLoss's scale there). Naive autograd gives 0, and a loss
    of log(B) (log(2B) summed both ways) for logits that are all ~0."""
    if backend != "torch" and dtype == torch.float64:
        pytest.skip("the kernels take 16- and 32-bit inputs")
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(7, 5, generator=g, dtype=dtype).to(DEVICE) for _ in range(2))
    ls = torch.tensor(log_scale, dtype=dtype, device=DEVICE, requires_grad=True)
    loss = FCL.info_nce(q, k, logit_scale=ls, symmetric=True, backend=backend)
    loss.backward()
    # d logit_scale = s dL/ds, |dL/ds| a few units here: 0 where s underflows (fp32), ~s in fp64
    assert abs(ls.grad.item()) <= 10 * math.exp(log_scale)
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.01, 0.07, 1.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dtypes_and_temperatures(backend, dtype, temperature, symmetric):
    if _interpreter_bf16(backend, dtype):
        pytest.skip("bf16 is refused in the Triton interpreter")
    # tau=0.01 makes |logits| up to 100: fine for fp32 accumulation, would overflow exp in fp16.
    _check(backend, 70, 70, 40, dtype, temperature, symmetric=symmetric, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("B, D", [(40, 8), (64, 16)])
def test_logit_scale_100_with_one_backward_slab(backend, symmetric, B, D):
    """tau = 0.01 (CLIP's largest logit scale), D inside one backward D-slab (narrower than the
    forward's chunk in the interpreter), rows far from solved: the recompute must round S as
    the forward did, or the rows' probabilities miss summing to 1 and the scale multiplies
    that. One dot over the slab against the forward's chunk: 6x naive fp32's gradient error,
    as was the interpreter's dV recompute as V U^T under OpenBLAS's Haswell/Zen kernels (AMD
    CPUs). Naive's error here (3e-7) is below fp32's floor, so on the CPU the budget is 4x
    naive's alone. On a GPU the usual floor stays: Triton's fp32 is 3xTF32 there, whose
    rounding differs from naive's IEEE fp32 and has not been measured on a GPU yet."""
    _check(backend, B, B, D, torch.float32, 0.01, symmetric=symmetric, seed=7, corr=0.3,
           floor=None if HAS_CUDA else 0.0)


@pytest.mark.skipif(HAS_CUDA or importlib.util.find_spec("triton") is None, reason="the Triton CPU interpreter")
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="OpenBLAS's x86 kernels")
def test_interpreter_recompute_under_openblas_haswell_kernels():
    """The interpreter's dV launch forms U V^T and transposes it (FWD_ORIENT): OpenBLAS's
    Haswell/Zen sgemm rounds V U^T differently in the last bit, which the logit scale 100 test
    sees. This machine's OpenBLAS picks its SkylakeX kernels, which agree either way, so a child
    process runs that test with the Haswell ones (OPENBLAS_CORETYPE; x86 only)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "logit_scale_100_with_one_backward_slab and triton"],
                         env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]


def _check_raw_op(backend, dtype, q, k, scale, w_row, w_col=None, labels=None, cls=None, exclude_diag=False,
                  exclude_pos=False, smoothing=0.0):
    """The raw op as the sum of w_row * row (+ w_col * col: symmetric when w_col is given): its
    outputs and every gradient (u, v, scale) on `backend` against float64, within the
    same-dtype torch budget. Returns `backend`'s outputs and gradients."""
    sym = w_col is not None
    eps = torch.tensor(smoothing, dtype=torch.float64) if smoothing else None

    def run(backend, dt):
        u, v = (x.to(device=DEVICE, dtype=dt).clone().requires_grad_() for x in (q, k))
        s = torch.tensor(scale, device=DEVICE, dtype=torch.float64 if dt == torch.float64 else torch.float32,
                         requires_grad=True)
        lab, c = (None if t is None else t.to(DEVICE) for t in (labels, cls))
        row, col, _, _ = torch.ops.fastcl.info_nce_rows(u, v, s, lab, sym, c, c, exclude_diag, exclude_pos,
                                                        backend, eps)
        out = (row * w_row.to(DEVICE, row.dtype)).sum()
        if sym:
            out = out + (col * w_col.to(DEVICE, col.dtype)).sum()
        out.backward()
        return [t.detach().cpu() for t in (row, col, u.grad, v.grad, s.grad)]

    ref, same, ours = run("torch", torch.float64), run("torch", dtype), run(backend, dtype)
    for name, a, b, r in zip(["row", "col", "du", "dv", "dscale"], ours, same, ref):
        assert torch.isfinite(a).all(), name
        assert_within_budget(name, a, b, r, dtype)
    return ours


@pytest.mark.parametrize("backend", BACKENDS)
def test_raw_op_takes_a_negative_scale(backend):
    """The custom op takes any scale (the public API only positive ones). A negative scale once
    made the kernels' gradient amplification 2^60, which overflowed fp16's G to inf."""
    dtype = torch.float16
    q, k = _inputs(45, 45, 20, dtype, seed=3)
    q, k = (F.normalize(x, dim=1).to(dtype).double() for x in (q, k))
    w = torch.rand(45, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    _check_raw_op(backend, dtype, q, k, -1 / 0.07, w, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "labels_extra_negatives", "symmetric", "exclude_diag", "dcl", "supcon"])
def test_logits_below_minus_1e30(backend, case):
    """Rows (and columns) whose every logit lies below -1e30 (log2 units), from a scale past 1e30
    (temperature < 1e-30 is legal in fp32) or features of norm ~1e15. The kernels started each
    row's running max at -1e30, a finite stand-in for -inf: it stayed the max, every exp2 then
    underflowed, and the loss came out -inf where torch gives the true value. The raw op's
    negative scale on features within ~20 degrees of one axis puts every logit there."""
    cfg = FLAG_CASES[case]
    B, D = 45, 7  # two row blocks of the interpreter's 32, the second one part padding
    N = B + cfg.get("N_extra", 0)
    g = torch.Generator().manual_seed(11)
    cone = lambda n: F.normalize(3 * D ** 0.5 * F.one_hot(torch.zeros(n, dtype=torch.long), D).double()  # noqa: E731
                                 + torch.randn(n, D, generator=g, dtype=torch.float64), dim=1).float().double()
    q, k = cone(B), cone(N)
    labels = torch.randint(0, N, (B,), generator=g) if cfg.get("labels") else None
    cls = torch.randint(0, 4, (B,), generator=g) if cfg.get("multi") else None
    w_row = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    w_col = torch.rand(N, generator=g, dtype=torch.float64) + 0.5 if cfg.get("symmetric") else None
    _check_raw_op(backend, torch.float32, q, k, -1e31, w_row, w_col, labels, cls,
                  cfg.get("exclude_diag", False), cfg.get("exclude_pos", False))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_raw_op_weighs_rows_and_columns_apart(backend, dtype):
    """The losses weigh a row's and its column's term alike, but the op returns them apart and
    takes an upstream gradient for each: the kernels must not read one for the other, nor size
    their fp16 gradient amplification from one. The column weights are negative (a maximised
    term) and larger: an amplification sized by the signed maximum overflowed G."""
    q, k = _inputs(45, 45, 20, dtype, seed=6, corr=1.0)
    q, k = (F.normalize(x, dim=1).to(dtype).double() for x in (q, k))
    g = torch.Generator().manual_seed(8)
    w_row = torch.rand(45, generator=g, dtype=torch.float64) + 0.5
    w_col = -30 * (torch.rand(45, generator=g, dtype=torch.float64) + 0.5)
    _check_raw_op(backend, dtype, q, k, 1 / 0.07, w_row, w_col)


def test_gradient_amplification_is_a_power_of_two():
    """grad_amp's factor is undone after the products: only a power of two comes out exactly.
    Its bound takes |g|, whatever the signs."""
    from fastcl._common import grad_amp
    s = torch.tensor(14.3)
    for g_row, g_col in [(torch.rand(7) * 3e-5, None), (-torch.rand(7), torch.rand(7) * 0.1),
                         (torch.full((3,), -2.0), torch.full((3,), -5.0))]:
        amp = grad_amp(s, g_row, g_col)
        e = torch.log2(amp)
        assert amp.shape == (1,) and amp.dtype == torch.float32 and torch.equal(e, e.round()), amp
        bound = float(s) * sum(float(g.abs().max()) for g in (g_row, g_col) if g is not None)
        assert 2.0 ** 13 < bound * float(amp) <= 2.0 ** 14, (bound, amp)


@pytest.mark.parametrize("symmetric", [False, True])
def test_triton_one_dot_slab_path(monkeypatch, symmetric):
    """The backward's one-dot S recompute (16-bit inputs on a GPU take it): correct at tau = 0.07,
    with one D-slab (D = 20) and with several (D = 150: the one dot is only where one slab
    covers D; with several, S must still sum every slab)."""
    monkeypatch.setenv("FASTCL_BWD_SAME_CHUNKS", "0")
    from fastcl.kernels.info_nce import backward_config
    assert backward_config(torch.device(DEVICE), torch.float16, 20)["SAME_CHUNKS"] is False
    assert backward_config(torch.device(DEVICE), torch.float16, 20)["ONE_SLAB"] is True
    assert backward_config(torch.device(DEVICE), torch.float16, 600)["ONE_SLAB"] is False
    for D in (20, 150 if not HAS_CUDA else 600):
        for dtype in (torch.float32, torch.float16):
            _check("triton", 45, 45, D, dtype, 0.07, symmetric=symmetric, seed=2)


def _triton_variants():
    try:
        from benchmarks.bench_info_nce import VARIANTS
    except ModuleNotFoundError:  # tests run against an installed wheel, off the checkout's path
        return {}                 # (scripts/build_cuda.sh): nothing to time there
    return {name: env for name, (be, env) in VARIANTS.items() if be == "triton"}


@pytest.mark.skipif(not HAS_CUDA, reason="FASTCL_BWD_* set GPU tiles; the interpreter has its own small ones")
@pytest.mark.parametrize("variant", sorted(_triton_variants()))
def test_triton_variants_the_benchmark_times(monkeypatch, variant):
    """Each Triton backward variant that gpu_run.sh times must compute the loss it is timed
    for, at the dtype and D it is timed at: bf16 at D = 512 (which crosses two 256-wide slabs),
    and the one-dot recompute also at fp32, D = 128. B = 200: partial 64- and 128-row tiles."""
    for name, value in _triton_variants()[variant].items():
        monkeypatch.setenv(name, value)
    cases = [(torch.bfloat16, 512)] + ([(torch.float32, 128)] if variant == "fastcl-triton-onedot" else [])
    for dtype, D in cases:
        for symmetric in (False, True):
            _check("triton", 200, 200, D, dtype, 0.07, symmetric=symmetric, seed=4)


@pytest.mark.parametrize("case", [*FLAG_CASES, "symmetric_smoothed", "symmetric_wide"])
def test_triton_split_over_columns(monkeypatch, case):
    """FASTCL_TRITON_SPLIT: programs that each take a range of column blocks (split-K, for
    batches with few row blocks), their partial row statistics and gradients merged after.
    Every flag case, against float64 within the budget, and close to the unsplit kernels.
    B = 65, the interpreter's 32-wide blocks: the last column block holds one column, so with
    exclude_diag row 64's last split has no column left (max NEG, sum 0 in the merge). On a
    GPU (blocks of 64 and 128), B = 257 does the same. "wide": D = 150, three of the
    interpreter's 64-wide D-slabs, each storing its own slice of a split's partial gradient."""
    cfg = FLAG_CASES.get(case, dict(symmetric=True))
    B, D = (257 if HAS_CUDA else 65), (150 if case == "symmetric_wide" else 33)
    N = B + cfg.get("N_extra", 0)
    g = torch.Generator().manual_seed(21)
    q, k = (F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1) for n in (B, N))
    labels = torch.randint(0, N, (B,), generator=g) if cfg.get("labels") else None
    if cfg.get("no_positive"):
        labels = torch.full((B,), -1)
    cls = torch.randint(0, 4, (B,), generator=g) if cfg.get("multi") else None
    w_row = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    w_col = torch.rand(N, generator=g, dtype=torch.float64) + 0.5 if cfg.get("symmetric") else None
    args = (q, k, 1 / 0.07, w_row, w_col, labels, cls, cfg.get("exclude_diag", False),
            cfg.get("exclude_pos", False), 0.3 if case == "symmetric_smoothed" else 0.0)
    from fastcl.kernels import info_nce as K
    grids, launch = [], K._launch
    monkeypatch.setattr(K, "_launch", lambda kernel, grid, *a: grids.append(grid) or launch(kernel, grid, *a))
    for dtype in (torch.float32, torch.float16) + ((torch.bfloat16,) if HAS_CUDA else ()):
        monkeypatch.setenv("FASTCL_TRITON_SPLIT", "1")
        whole = _check_raw_op("triton", dtype, *args)
        for splits in ("2", "3"):
            monkeypatch.setenv("FASTCL_TRITON_SPLIT", splits)
            grids.clear()
            part = _check_raw_op("triton", dtype, *args)
            # every launch (forward, dU, dV) split: each has 3 or more blocks of 32 to split
            # (even splits: 4 blocks in 3 splits take 2 each, so 2 splits)
            assert len(grids) == 3 and all(gr[1] >= 2 for gr in grids), grids
            for name, a, b in zip(["row", "col", "du", "dv", "dscale"], part, whole):
                # the same sums in another order: a few roundings apart
                tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
                assert torch.allclose(a.double(), b.double(), rtol=tol, atol=tol / 10), (splits, name)


def test_triton_split_counts(monkeypatch):
    """How FASTCL_TRITON_SPLIT divides the column blocks: none by default, evenly, "auto" up to
    two programs per SM (an H100's 132 here), the backward's fp32 partials bounded."""
    from fastcl.kernels import info_nce as K
    monkeypatch.setattr(K, "_num_programs", lambda device, n: min(n, 264))
    cuda = torch.device("cuda")
    monkeypatch.delenv("FASTCL_TRITON_SPLIT", raising=False)
    assert K._splits(cuda, 32, 32) == (1, 32)  # the default, until a GPU has timed the splits
    monkeypatch.setenv("FASTCL_TRITON_SPLIT", "auto")
    assert K._splits(cuda, 32, 32) == (8, 4)  # B = 4096's forward: 9 wanted, 4 blocks each -> 8
    assert K._splits(cuda, 264, 256) == (1, 256)  # enough row programs: no split
    assert K._splits(cuda, 2, 3) == (3, 1)  # no more splits than blocks
    assert K._splits(cuda, 1, 0) == (1, 1)  # no columns
    # the backward's partials: [splits, B, D] fp32 within SPLIT_ELEMENTS
    monkeypatch.setenv("FASTCL_TRITON_SPLIT", "64")
    assert K._splits(cuda, 64, 64, 4096 * 512) == (16, 4)
    assert K._splits(cuda, 4096, 4096, 1 << 28) == (1, 4096)
    for bad in ("0", "-2", "two", ""):
        monkeypatch.setenv("FASTCL_TRITON_SPLIT", bad)
        with pytest.raises(ValueError, match="FASTCL_TRITON_SPLIT"):
            K._splits(cuda, 32, 32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_labels(backend, reduction):
    B, N = 37, 90
    labels = torch.randperm(N, generator=torch.Generator().manual_seed(5))[:B]
    _check(backend, B, N, 24, torch.float32, 0.1, labels=labels, reduction=reduction)
    _check(backend, B, B, 24, torch.float32, 0.1, symmetric=True, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_embedding_row(backend):
    """A zero row (padding, a dead encoder output) normalises to zero, as F.normalize does:
    logits 0 for that row, a finite loss and gradient, not 0/0."""
    q = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    k = torch.randn(7, 5, generator=torch.Generator().manual_seed(4))
    q[2] = 0
    qq = q.to(DEVICE).requires_grad_()
    out = FCL.info_nce(qq, k.to(DEVICE), temperature=0.1, symmetric=True, backend=backend)
    out.backward()
    want = fastcl.info_nce_reference(q.double(), k.double(), temperature=0.1, symmetric=True)
    assert torch.isfinite(qq.grad).all() and abs(float(out) - float(want)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_no_normalize(backend):
    # Raw dot products (scaled down so the logits stay in a sensible range).
    _check(backend, 50, 64, 17, torch.float32, 4.0, normalize=False)
    _check(backend, 50, 50, 17, torch.float32, 4.0, normalize=False, symmetric=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Strided views reach the kernels (normalize=False keeps them views); loss and gradients."""
    g = torch.Generator().manual_seed(7)
    base_q = torch.randn(48, 2 * 20, generator=g).to(DEVICE)
    base_k = torch.randn(20, 48, generator=g).to(DEVICE)
    outs = []
    for strided in (True, False):
        bq, bk = base_q.clone().requires_grad_(), base_k.clone().requires_grad_()
        q, k = bq[:, ::2], bk.T  # a column-strided view and a transposed view
        if not strided:
            q, k = q.contiguous(), k.contiguous()
        assert q.is_contiguous() != strided and k.is_contiguous() != strided
        out = FCL.info_nce(q, k, temperature=4.0, symmetric=True, normalize=False, backend=backend)
        out.backward()
        outs.append((out.detach(), bq.grad, bk.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)
    ref = fastcl.info_nce_reference(base_q[:, ::2].double().cpu(), base_k.T.double().cpu(),
                                    temperature=4.0, symmetric=True, normalize=False)
    assert abs(float(outs[0][0]) - float(ref)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_small_gradients_near_best_representable(dtype, symmetric):
    """A nearly solved batch with mean reduction: gradient entries ~1e-7 are fp16 subnormals,
    so even the exact gradient rounded to fp16 is ~40% off at 4096 x 512 (fp16 training needs a
    GradScaler). Naive fp16 torch loses them too, so instead of the usual budget this bounds
    ours by twice the error of the float64 gradient rounded to the dtype."""
    B, D = (4096, 512) if HAS_CUDA else (256, 40)
    g = torch.Generator().manual_seed(21)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    k = (q + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)).to(dtype).double()
    q = q.to(dtype).double()
    q64, k64 = q.clone().requires_grad_(), k.clone().requires_grad_()
    fastcl.info_nce_reference(q64, k64, temperature=0.07, symmetric=symmetric).backward()
    floor = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    for backend in USABLE_BACKENDS:
        if _interpreter_bf16(backend, dtype):
            continue
        qq = q.to(DEVICE, dtype).requires_grad_()
        kk = k.to(DEVICE, dtype).requires_grad_()
        FCL.info_nce(qq, kk, temperature=0.07, symmetric=symmetric, backend=backend).backward()
        for ours, ref in ((qq.grad, q64.grad), (kk.grad, k64.grad)):
            err = float((ours.double().cpu() - ref).norm() / ref.norm())
            best = float((ref.to(dtype).double() - ref).norm() / ref.norm())
            assert err <= 2 * best + floor, (backend, err, best)


def test_fp16_large_scale_no_overflow():
    # Unnormalised fp16 inputs with big norms at tau=0.01: logits far beyond fp16's range.
    q = torch.randn(40, 32, dtype=torch.float64) * 30
    k = q + torch.randn(40, 32, dtype=torch.float64)
    ref = fastcl.info_nce_reference(q, k, temperature=0.01, normalize=True)
    for backend in USABLE_BACKENDS:
        out = FCL.info_nce(q.half().to(DEVICE), k.half().to(DEVICE), temperature=0.01, backend=backend)
        assert torch.isfinite(out)
        assert abs(float(out) - float(ref)) <= 2e-3 * max(1.0, abs(float(ref)))


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_torch_backend(symmetric):
    g = torch.Generator().manual_seed(11)
    q = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6 if symmetric else 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ls = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    labels = None if symmetric else torch.tensor([8, 0, 3, 3, 1, 7])

    def f(q, k, ls):
        return FCL.info_nce(q, k, logit_scale=ls, labels=labels, symmetric=symmetric,
                            reduction="none", backend="torch")

    assert torch.autograd.gradcheck(f, (q, k, ls))
    chunked_ref = fastcl.info_nce_reference(q, k, logit_scale=ls, labels=labels, symmetric=symmetric)
    assert torch.allclose(f(q, k, ls).mean(), chunked_ref)


def _expected_auto(dtype):
    """What `auto` should pick: torch without a GPU; on a GPU the fastest usable backend in the
    measured figures for its architecture (fp32 on an H100: cuda where built), else triton."""
    if not HAS_CUDA:
        return "torch"
    usable = fastcl.available_backends(DEVICE, dtype)
    major, minor = torch.cuda.get_device_capability()
    figs = fastcl._dispatch.MEASURED_MS.get(f"sm_{major}{minor}", {}).get("info_nce", {}).get(
        "fp32" if dtype == torch.float32 else "16bit", {})
    figs = {b: ms for b, ms in figs.items() if usable[b] is None}
    return min(figs, key=figs.get) if figs else "triton"


def test_auto_backend_and_module():
    q, k = torch.randn(20, 8, device=DEVICE), torch.randn(20, 8, device=DEVICE)
    expected = FCL.info_nce(q, k, temperature=0.2, backend=_expected_auto(torch.float32))
    assert torch.equal(FCL.info_nce(q, k, temperature=0.2), expected)
    loss = fastcl.nn.InfoNCELoss(temperature=0.2)(q, k)
    assert torch.equal(loss, expected)


def test_clip_module_learns_scale():
    m = fastcl.nn.ClipLoss(init_temperature=0.07, normalize=True, backend="torch").double()
    img = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(16, 8, dtype=torch.float64)
    loss = m(img, txt)
    loss.backward()
    ref = fastcl.info_nce_reference(img, txt, logit_scale=m.logit_scale.detach(), symmetric=True)
    assert torch.allclose(loss, ref)
    assert m.logit_scale.grad is not None and m.logit_scale.grad != 0
    with torch.no_grad():
        m.logit_scale.fill_(10.0)  # as if a step pushed it past the cap: clamped to log(100)
    m.logit_scale.grad = None
    clamped = fastcl.info_nce_reference(img, txt, temperature=0.01, symmetric=True)
    loss = m(img, txt)
    assert torch.allclose(loss, clamped)
    # The parameter itself is clamped (as open_clip's loop does), so the gradient still flows:
    # a clamp inside the graph gave exactly 0 here and the scale stayed frozen past the cap.
    loss.backward()
    assert float(m.logit_scale) == pytest.approx(math.log(100.0)) and float(m.logit_scale.grad) != 0
    with pytest.raises(ValueError, match="below 1/max_scale"):
        fastcl.nn.ClipLoss(init_temperature=0.005)
    with pytest.raises(ValueError, match="max_scale"):
        fastcl.nn.ClipLoss(max_scale=0)


def test_clip_module_scale_clamp_leaves_autograd_and_errors_alone():
    """The clamp bumped the parameter's version: a graph that saved it earlier in the step (a
    regulariser) could not run its backward. A call that failed its checks clamped it anyway."""
    m = fastcl.nn.ClipLoss(init_temperature=0.07, backend="torch")
    img, txt = torch.randn(6, 4), torch.randn(6, 4)
    reg = 1e-3 * m.logit_scale ** 2
    (m(img, txt) + reg).backward()  # RuntimeError: ... modified by an inplace operation
    assert m.logit_scale.grad is not None
    with torch.no_grad():
        m.logit_scale.fill_(7.0)
    with pytest.raises(ValueError, match="same feature dimension"):
        m(img, torch.randn(6, 5))
    assert float(m.logit_scale) == 7.0  # untouched by the refused call
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        m([[1.0, 2.0]] * 4, txt)  # AttributeError: 'list' object has no attribute 'device'
    m(img, txt)
    assert float(m.logit_scale) == pytest.approx(math.log(100.0))  # clamped by the next call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_scale_tensors_are_taken_at_their_value(dtype):
    """A bf16 model's logit_scale (or open_clip's multiplier logit_scale.exp()) is a 16-bit
    tensor. Its log and exp ran in 16 bits: a bf16 multiplier of 100 acted as 99.0 (loss 1e-2
    off, against fp32's 1e-7)."""
    g = torch.Generator().manual_seed(0)
    img, txt = (F.normalize(torch.randn(16, 8, generator=g), dim=1).to(DEVICE) for _ in range(2))
    kw = dict(symmetric=True, normalize=False)
    mult = torch.tensor(100.0 if dtype == torch.bfloat16 else 1 / 0.07, dtype=dtype)
    got = fastcl.nn.ClipLoss(backend="torch")(img, txt, mult.to(DEVICE))
    want = fastcl.info_nce_reference(img.double().cpu(), txt.double().cpu(), logit_scale=mult.double().log(), **kw)
    assert abs(float(got) / float(want) - 1) < 1e-6
    log_scale = torch.tensor(math.log(100.0), dtype=dtype)
    got = FCL.info_nce(img, txt, logit_scale=log_scale.to(DEVICE), backend="torch", **kw)
    want = fastcl.info_nce_reference(img.double().cpu(), txt.double().cpu(), logit_scale=log_scale.double(), **kw)
    assert abs(float(got) / float(want) - 1) < 1e-6


def test_clip_module_open_clip_signature():
    """open_clip's call: normalised features and the multiplier exp(logit_scale)."""
    img = torch.nn.functional.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1)
    ls = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    out = fastcl.nn.ClipLoss()(img, txt, ls.exp(), output_dict=True)
    logits = ls.exp() * img @ txt.T
    labels = torch.arange(12)
    ref = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(out["contrastive_loss"], ref)
    g1, = torch.autograd.grad(out["contrastive_loss"], ls)
    g2, = torch.autograd.grad(ref, ls)
    assert torch.allclose(g1, g2)
    with pytest.raises(ValueError, match="logit_scale"):
        fastcl.nn.ClipLoss()(img, txt)


def test_clip_module_takes_open_clip_logit_bias():
    """open_clip's forward is (img, txt, logit_scale, logit_bias=None, output_dict=False), and its
    trainer passes a model's logit_bias on: the bias went into output_dict (a dict came back) or
    was refused. One bias on every logit: the same loss, and a gradient of 0 for it."""
    img = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    bias = torch.tensor([-3.0], requires_grad=True)
    clip = fastcl.nn.ClipLoss()
    want = clip(img, txt, scale)
    got = clip(img, txt, scale, bias)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.backward()
    assert bias.grad is not None and bias.grad.shape == (1,) and bias.grad.item() == 0.0
    out = clip(img, txt, scale, None, True)  # open_clip's positional output_dict
    torch.testing.assert_close(out["contrastive_loss"], want, rtol=0, atol=0)
    torch.testing.assert_close(clip(img, txt, scale, logit_bias=2.5, output_dict=True)["contrastive_loss"], want,
                               rtol=0, atol=0)
    assert torch.isnan(clip(img, txt, scale, torch.tensor(float("nan"))))  # as open_clip's
    for bad in (torch.zeros(7), torch.zeros(7, 7), torch.tensor(1), float("inf"), float("nan"), "0"):
        with pytest.raises(ValueError, match="logit_bias"):
            clip(img, txt, scale, bad)
    # a changing float bias under fullgraph (math.isfinite of Dynamo's symbolic float failed)
    torch._dynamo.reset()
    compiled = torch.compile(clip, backend="aot_eager", fullgraph=True)
    for b in (2.5, 3.5, -1.0):
        torch.testing.assert_close(compiled(img, txt, scale, b), want)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip not installed")
def test_clip_module_equals_open_clip():
    import open_clip
    img = torch.nn.functional.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.0, dtype=torch.float64)
    assert torch.allclose(open_clip.ClipLoss()(img, txt, scale), fastcl.nn.ClipLoss()(img, txt, scale))
    bias = torch.tensor(-10.0, dtype=torch.float64)  # open_clip's init_logit_bias models
    theirs = open_clip.ClipLoss()(img, txt, scale, bias, True)["contrastive_loss"]
    ours = fastcl.nn.ClipLoss()(img, txt, scale, bias, True)["contrastive_loss"]
    torch.testing.assert_close(ours, theirs)


def test_drop_in_for_cross_entropy():
    q, k = torch.randn(32, 16), torch.randn(32, 16)
    t = 0.05
    naive = torch.nn.functional.cross_entropy(
        torch.nn.functional.normalize(q) @ torch.nn.functional.normalize(k).T / t, torch.arange(32))
    assert torch.allclose(FCL.info_nce(q, k, temperature=t), naive, atol=1e-5)


def test_torch_compile_fullgraph():
    q, k = torch.randn(24, 8), torch.randn(24, 8)
    ls = torch.tensor(2.0, requires_grad=True)

    def f(q, k, ls):
        return FCL.info_nce(q, k, logit_scale=ls, symmetric=True, backend="torch")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, ls)
    out.backward()
    ls2 = ls.detach().clone().requires_grad_()
    ref = f(q, k, ls2)
    ref.backward()
    assert torch.allclose(out, ref) and torch.allclose(ls.grad, ls2.grad)


def test_torch_compile_of_vmap_over_logit_scale():
    """vmap over logit_scale inside torch.compile: a graph assert on the (batched) scale, tried
    for the bound's check, failed to trace."""
    q, k, ls = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([1.0, 2.0])
    loss = lambda q, k, ls: FCL.info_nce(q, k, logit_scale=ls, backend="torch")
    f = torch.compile(lambda q, k, ls: torch.vmap(loss, in_dims=(None, None, 0))(q, k, ls), backend="aot_eager")
    torch.testing.assert_close(f(q, k, ls), torch.stack([loss(q, k, x) for x in ls]))


def test_torch_compile_refuses_out_of_range_labels():
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    f = torch.compile(lambda q, k, y: FCL.info_nce(q, k, labels=y, backend="torch"),
                      backend="aot_eager", fullgraph=True)
    assert torch.isfinite(f(q, k, torch.tensor([0, 1, 2, 3, 4, 5])))
    with pytest.raises(RuntimeError, match="must lie in"):
        f(q, k, torch.tensor([0, 1, 2, 3, 4, 6]))
    with pytest.raises(RuntimeError, match="must lie in"):
        f(q, k, torch.tensor([0, 1, -1, 3, 4, 5]))  # negative too: the device-side check's other half


def test_torch_backend_chunks_when_one_row_exceeds_the_budget(monkeypatch):
    """N alone past CHUNK_ELEMENTS: chunks of one row, not of zero (an endless or empty loop)."""
    q, k = torch.randn(5, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    want = FCL.info_nce(q, k, backend="reference")
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4)
    assert list(chunked._chunks(5, 9)) == [(i, i + 1) for i in range(5)]
    assert torch.allclose(FCL.info_nce(q, k, backend="torch"), want)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_backend_memory_not_quadratic(monkeypatch, symmetric):
    """The largest tensor the chunked backend creates is bounded by the chunk, not B*N."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 1 << 16)
    D = 8
    for B in (1024, 4096):
        u, v = torch.randn(B, D), torch.randn(B, D)
        s = torch.tensor(5.0)
        with _LargestTensor() as mode:
            _, _, row_stats, col_stats = chunked.lse_forward(u, v, s, None, symmetric)
            chunked.lse_backward(u, v, s, row_stats, col_stats, torch.ones(B), torch.ones(B), None,
                                 symmetric)
        assert mode.largest <= max(1 << 16, B * D), (B, mode.largest)
    assert mode.largest * 200 < B * B  # at B=4096: the full matrix would be 256x the bound


@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_backend_several_chunks(monkeypatch, symmetric):
    """Values and gradients when the torch backend's rows come in several chunks of 7, the last
    one partial (the other tests' shapes fit one chunk)."""
    B, N = (40, 40) if symmetric else (37, 90)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 7 * N)
    assert len(list(chunked._chunks(B, N))) == 6
    labels = None if symmetric else torch.randperm(N, generator=torch.Generator().manual_seed(6))[:B]
    _check("torch", B, N, 11, torch.float32, 0.1, symmetric=symmetric, labels=labels)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_column_max_in_another_programs_rows(backend):
    """CLIP loss at tau = 0.01 where the rows of one persistent program are anti-aligned with
    every column and another program holds the columns' maxima: merging the programs' column
    statistics on anything but their maximum overflows exp2."""
    B, D = 64, 8
    u, v = torch.zeros(B, D), torch.zeros(B, D)
    u[:32, 0], u[:32, 1], u[32:, 0] = -1.0, 0.1, 1.0
    v[:, 0], v[:, 2] = 1.0, torch.linspace(-1, 1, B)
    u += 0.01 * torch.randn(B, D, generator=torch.Generator().manual_seed(0))
    ref = fastcl.info_nce_reference(u.double(), v.double(), temperature=0.01, symmetric=True)
    out = FCL.info_nce(u.to(DEVICE), v.to(DEVICE), temperature=0.01, symmetric=True, backend=backend)
    assert float(out) == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fp16_gradients_under_a_loss_scale(backend):
    """fp16 with a GradScaler-sized loss scale (2^17): G * s leaves fp16's range (~1e5 > 65504)
    though the gradients fit; the kernels' power-of-two amplitude keeps them finite."""
    g = torch.Generator().manual_seed(0)
    q, k = (0.05 * torch.randn(16, 16, generator=g)).half(), (0.05 * torch.randn(16, 16, generator=g)).half()
    qq, kk = q.to(DEVICE).clone().requires_grad_(), k.to(DEVICE).clone().requires_grad_()
    (2.0 ** 17 * FCL.info_nce(qq, kk, temperature=0.07, symmetric=True, normalize=False, backend=backend)).backward()
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    (2.0 ** 17 * fastcl.info_nce_reference(q64, k64, temperature=0.07, symmetric=True, normalize=False)).backward()
    for got, exact in ((qq.grad, q64.grad), (kk.grad, k64.grad)):
        assert torch.isfinite(got).all()
        assert float((got.double().cpu() - exact).norm() / exact.norm()) < 2e-3


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_multi_positive_rows_without_positives(backend):
    """Rows whose class has no other member: positive logit 0 and count 0 in the statistics
    (not 0/0), finite gradients."""
    from fastcl.info_nce import _impl
    impl = _impl(backend)
    u = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(0)), dim=-1).to(DEVICE)
    cls = torch.tensor([0, 0, 1, 1] * 9 + [7, 8, 9, 10], device=DEVICE)  # the last 4: no positive
    s = torch.tensor(10.0, device=DEVICE)
    _, _, rs, cs = impl.lse_forward(u, u, s, None, False, row_cls=cls, col_cls=cls, exclude_diag=True)
    assert torch.isfinite(rs).all()
    assert rs[2, -4:].tolist() == [0.0] * 4 and rs[3, -4:].tolist() == [0.0] * 4
    gr = torch.ones(40, device=DEVICE)
    du, dv, ds = impl.lse_backward(u, u, s, rs, cs, gr, gr, None, False, row_cls=cls, col_cls=cls,
                                   exclude_diag=True)
    assert torch.isfinite(du).all() and torch.isfinite(dv).all() and torch.isfinite(ds)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_forward_writes_every_row(backend):
    """The launchers poison their outputs with NaN: any row a kernel skips would stay NaN."""
    from fastcl.info_nce import _impl
    K = _impl(backend)
    for B, N in [(1, 1), (31, 33), (97, 97), (200, 64)]:
        u, v = torch.randn(B, 16, device=DEVICE), torch.randn(N, 16, device=DEVICE)
        sym = B == N
        labels = None if sym else torch.randint(0, N, (B,), device=DEVICE)
        row, col, row_stats, col_stats = K.lse_forward(u, v, torch.tensor(3.0, device=DEVICE), labels, sym)
        for t in (row, col, row_stats, col_stats):
            assert torch.isfinite(t).all()
        S = 3.0 * (u.double() @ v.double().T)
        y = torch.arange(B, device=DEVICE) if labels is None else labels
        expected = torch.logsumexp(S, 1) - S[torch.arange(B), y]
        assert torch.allclose(row.double(), expected, atol=1e-4)
        if sym:
            assert torch.allclose(col.double(), torch.logsumexp(S, 0) - S.diag(), atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_a_positive_in_the_key_block(backend):
    """The op's contract for a key block that lacks some rows' positives (the distributed ring
    passes such blocks): label -1 or >= N, or no labels and N < B, means no positive there:
    pos = 0 in the loss and the statistics, and no -1 in the gradient."""
    from fastcl.info_nce import _impl
    impl = _impl(backend)
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    s, gr = torch.tensor(2.5), torch.rand(9, generator=g, dtype=torch.float64) + 0.5
    for labels in (torch.tensor([0, 7, -1, 3, 5, 2, 6, -4, 1]), None):
        y = torch.arange(9) if labels is None else labels
        has = (y >= 0) & (y < 6)
        uu, vv = u.clone().requires_grad_(), v.clone().requires_grad_()
        S = s.double() * uu @ vv.T
        pos = torch.where(has, S.gather(1, y.clamp(0, 5)[:, None])[:, 0], 0.0)
        expected = torch.logsumexp(S, 1) - pos
        (expected * gr).sum().backward()
        lab = None if labels is None else labels.to(DEVICE)
        U, V, sd = u.float().to(DEVICE), v.float().to(DEVICE), s.to(DEVICE)
        row, _, rs, cs = impl.lse_forward(U, V, sd, lab, False)
        assert torch.allclose(row.double().cpu(), expected.detach(), atol=1e-5), labels
        assert (rs[2].cpu()[~has] == 0).all()
        du, dv, _ = impl.lse_backward(U, V, sd, rs, cs, gr.float().to(DEVICE), gr.float().to(DEVICE), lab, False)
        assert torch.allclose(du.double().cpu(), uu.grad, atol=1e-5), labels
        assert torch.allclose(dv.double().cpu(), vv.grad, atol=1e-5), labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_takes_the_stored_positive(backend):
    """The backward's P_iy is exp(stored pos_i - max_i - log-sum_i), not the recomputed logit's:
    so P - 1 keeps its digits on nearly solved rows wherever a recompute rounds differently
    (other tiles, a positive merged from another block). Shifting the stored positive by 0.01
    must move dU and dV exactly as that formula says."""
    from fastcl.info_nce import _impl
    impl = _impl(backend)
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(7, 6, generator=g, dtype=torch.float64), torch.randn(7, 6, generator=g, dtype=torch.float64)
    s, gr, shift = 2.0, torch.rand(7, generator=g, dtype=torch.float64) + 0.5, 0.01
    U, V, sd = u.float().to(DEVICE), v.float().to(DEVICE), torch.tensor(s, device=DEVICE)
    _, _, rs, cs = impl.lse_forward(U, V, sd, None, False)
    rs = rs.clone()
    rs[2] += shift / impl.LOG_UNIT
    grd = gr.float().to(DEVICE)
    du, dv, _ = impl.lse_backward(U, V, sd, rs, cs, grd, grd, None, False)
    S = s * u @ v.T
    lse = torch.logsumexp(S, 1, keepdim=True)
    P = torch.exp(S - lse)
    P.diagonal().mul_(math.exp(shift))
    G = gr[:, None] * (P - torch.eye(7, dtype=torch.float64))
    assert torch.allclose(du.double().cpu(), s * G @ v, atol=1e-5)
    assert torch.allclose(dv.double().cpu(), s * G.T @ u, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_logit_scale_gradient_beats_naive_fp32(backend, symmetric):
    """d logit_scale = sum_ij G_ij S_ij / s, whose rows (columns) of G sum to zero: centred on
    each row's (column's) positive, its fp32 error stays far below naive fp32 torch's (2-9e-6
    relative at tau = 0.07, where the value is small). The error budget of the other tests
    divides by max(1, |value|), which would not see this."""
    for seed in range(3):
        q, k = _inputs(130, 130, 65, torch.float32, seed)
        ls = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
        up = torch.ones(130, dtype=torch.float64)
        ref = float(_run(fastcl.info_nce_reference, q, k, ls, torch.float64, "cpu", up, symmetric=symmetric)[3])
        ours = float(_run(FCL.info_nce, q, k, ls, torch.float32, DEVICE, up, symmetric=symmetric,
                          backend=backend)[3])
        assert abs(ours - ref) <= 2e-6 * abs(ref), (seed, ours, ref)


def test_triton_fp32_precision_choice(monkeypatch):
    """fp32 dots in the Triton kernels: 3xTF32 by default, TF32 only when torch's matmuls may use
    it, IEEE on request; 16-bit operands are unaffected; a wrong setting is an error, not a
    silent fallback. (On a GPU, the float64 tests above hold the default to the fp32 budget.)"""
    info = pytest.importorskip("fastcl.kernels.info_nce")
    matmul = torch.backends.cuda.matmul  # a settings object: monkeypatch cannot undo its fields
    saved = matmul.allow_tf32
    monkeypatch.delenv("FASTCL_TRITON_FP32", raising=False)
    try:
        matmul.allow_tf32 = False
        assert info._precision(torch.float32) == "tf32x3"
        assert info._precision(torch.bfloat16) == "ieee"
        monkeypatch.setenv("FASTCL_TRITON_FP32", "ieee")
        assert info._precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert info._precision(torch.float32) == "tf32"
        matmul.allow_tf32 = False
        monkeypatch.setenv("FASTCL_TRITON_FP32", "fp64")
        with pytest.raises(ValueError, match="FASTCL_TRITON_FP32"):
            info._precision(torch.float32)
    finally:
        matmul.allow_tf32 = saved


def test_triton_launch_steps_down_to_a_config_that_fits(monkeypatch):
    """A GPU with less shared memory than the configs assume raises OutOfResources at load time;
    the launcher tries the next config of its ladder (fewer stages; the backward's chunked
    recompute), remembers the one that loaded, and re-raises if none does."""
    from triton.runtime.errors import OutOfResources
    from fastcl.kernels import info_nce as K
    monkeypatch.setattr(K, "_FITS", {})
    launches = []

    class Kernel:  # loads only with the chunked recompute and at most `limit` stages (or if roomy)
        limit = 1
        roomy = False

        def __getitem__(self, grid):
            def run(*args, **kw):
                launches.append((kw["SAME_CHUNKS"], kw["num_stages"]))
                if not self.roomy and (not kw["SAME_CHUNKS"] or kw["num_stages"] > self.limit):
                    raise OutOfResources(300000, 232448, "shared memory")
            return run

    kernel = Kernel()
    cfg = dict(BM=64, BN=64, BK=64, BD=512, ONE_SLAB=True, SAME_CHUNKS=False, num_warps=8, num_stages=3)
    dev = torch.device("cuda", 0)
    used = K._launch(kernel, (4,), (), dict(TRANSPOSED=False), cfg, dev, torch.bfloat16)
    assert launches == [(False, 3), (True, 3), (True, 2), (True, 1)]
    assert used == dict(cfg, SAME_CHUNKS=True, num_stages=1)
    launches.clear()
    K._launch(kernel, (4,), (), dict(TRANSPOSED=False), cfg, dev, torch.bfloat16)
    assert launches == [(True, 1)]  # remembered: straight to the config that loads
    # Remembered per flags and per dtype: another flag set (here one that loads with the first
    # config) or dtype starts from the top of its own ladder.
    launches.clear()
    Kernel.roomy = True
    K._launch(kernel, (4,), (), dict(TRANSPOSED=True), cfg, dev, torch.bfloat16)
    assert launches == [(False, 3)]
    Kernel.roomy = False
    launches.clear()
    K._launch(kernel, (4,), (), dict(TRANSPOSED=False), cfg, dev, torch.float16)
    assert launches == [(False, 3), (True, 3), (True, 2), (True, 1)]
    kernel.limit = 0  # nothing fits: the error surfaces
    monkeypatch.setattr(K, "_FITS", {})
    with pytest.raises(OutOfResources):
        K._launch(kernel, (4,), (), dict(TRANSPOSED=False), cfg, dev, torch.bfloat16)
    assert K._ladder(dict(num_stages=3)) == [dict(num_stages=s) for s in (3, 2, 1)]


def test_autocast_does_not_reach_inside_the_op():
    """Under CPU bf16 autocast the op computes in its inputs' dtype, forward and backward alike:
    a bf16 forward against an fp32 recompute left P's rows summing to 1 +- 1e-2 (wrong gradients)."""
    g = torch.Generator().manual_seed(0)
    q0, k0 = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    out = []
    for autocast in (False, True):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = FCL.info_nce(q, k, temperature=0.5, normalize=False, reduction="sum", backend="torch")
        loss.backward()
        out.append((loss.detach(), q.grad, k.grad))
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(out[1][2].sum(0).norm()) < 1e-4  # sum_i (P_i - onehot_i) q_i-weights: rows sum to 1


def test_compiled_checks_hold_once_the_floats_are_symbolic():
    """After two values a float argument is symbolic in the graph. "t < inf" installed no
    guard, so an infinite temperature ran the cached graph (the loss came out log N); a bad
    label_smoothing's message formatted the symbolic value, which Dynamo cannot trace."""
    import torch._dynamo
    torch._dynamo.reset()
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    f = torch.compile(lambda q, k, t: FCL.info_nce(q, k, temperature=t, backend="torch"), backend="aot_eager")
    f(q, k, 0.1), f(q, k, 0.2)
    with pytest.raises(ValueError, match="positive finite"):
        f(q, k, math.inf)
    h = torch.compile(lambda q, k, e: FCL.info_nce(q, k, label_smoothing=e, backend="torch"), backend="aot_eager")
    h(q, k, 0.1), h(q, k, 0.2)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        h(q, k, 1.0)
    torch._dynamo.reset()


def test_compiled_label_smoothing_stays_symbolic():
    """label_smoothing reaches the fused op as a 0-dim tensor: as a float argument of the op,
    Dynamo guarded on its value and compiled a graph per value (6 values, 6 graphs). Now: the
    first value, then one symbolic graph, and one for eps = 0 (no smoothing). Where Dynamo
    specialises every float (torch 2.4), by torch's design, each value compiles anyway."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    if getattr(torch._dynamo.config, "specialize_float", False):
        pytest.skip("this torch's Dynamo specialises every float")
    torch._dynamo.reset()
    counters.clear()
    q, k = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    h = torch.compile(lambda q, k, e: FCL.info_nce(q, k, label_smoothing=e, symmetric=True, backend="torch"),
                      backend="aot_eager")
    for e in (0.1, 0.2, 0.3, 0.0, 0.45, 0.7):
        got = h(q, k, e)
        want = FCL.info_nce(q, k, label_smoothing=e, symmetric=True, backend="torch")
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5),
                    reason="torch 2.4's aot_export refuses any in-place update of a parameter")
def test_clip_module_exports_with_its_own_scale():
    """torch.export (non-strict) refused the .data clamp; while tracing, the clamp is a plain
    in-place one, and the exported program clamps as eager does."""
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    m = fastcl.nn.ClipLoss(init_temperature=0.07, backend="torch")
    with torch.no_grad():
        m.logit_scale.fill_(6.0)  # above the cap
    ep = torch.export.export(m, (q, k), strict=False)
    want = fastcl.nn.ClipLoss(init_temperature=0.01, backend="torch")(q, k)  # the cap, 1/100
    assert torch.allclose(ep.module()(q, k), want)


def test_scale_from_temperature_is_one_rounding_of_its_reciprocal():
    """The tensor's division gives Python's 1.0 / t (both correctly rounded in float64), then one
    rounding to fp32."""
    from fastcl import _validation
    for t in (0.07, 0.1, 1 / 3, 3e-5, 7.0):
        s64 = _validation.scale_tensor(t, None, torch.device("cpu"), torch.float64)
        s32 = _validation.scale_tensor(t, None, torch.device("cpu"), torch.float32)
        assert s64.dtype == torch.float64 and s64.item() == 1.0 / t
        assert s32.dtype == torch.float32 and s32.item() == torch.tensor(1.0 / t, dtype=torch.float64).float().item()


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compile_is_dynamic_in_key_count_and_temperature(compiler):
    """Labels must not pin N into the graph (one compile per key count until the recompile limit),
    and a Python-float temperature that changes must neither break fullgraph compilation nor
    recompile per value (under aot_eager torch.tensor(1 / t) baked each value in: 9 values hit
    the recompile limit). Where Dynamo specialises every float (torch 2.4), by torch's own
    design, the temperature stays fixed. On torch 2.11 (the GPU image), 1.0 / t computed in
    Python was baked in per value (now the tensor divides); torch 2.13 kept it symbolic."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    vary_t = not getattr(torch._dynamo.config, "specialize_float", False)
    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda q, k, y, t: FCL.info_nce(q, k, labels=y, temperature=t, backend="torch"),
                      fullgraph=True, backend=compiler)
    clip = torch.compile(fastcl.nn.ClipLoss(backend="torch"), fullgraph=True, backend=compiler)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 8, generator=g)
    for i in range(10):
        n, t = 7 + 2 * (i % 4), 0.1 + 0.03 * i * vary_t
        k = torch.randn(n, 8, generator=g)
        y = torch.randint(0, n, (5,), generator=g)
        assert torch.allclose(f(q, k, y, t), FCL.info_nce(q, k, labels=y, temperature=t, backend="torch"))
        assert torch.allclose(clip(q, k[:5], 1 / t), FCL.info_nce(q, k[:5], temperature=t, symmetric=True,
                                                                  normalize=False, backend="torch"))
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keys", ["fewer_keys", "labels_out_of_range"])
def test_raw_op_smoothing_on_rows_without_a_positive(backend, keys):
    """The raw op takes rows without a positive: without labels the rows i >= N, with labels
    those outside [0, N) (distributed key blocks). With smoothing such a row's G sums to
    1 - eps, not 0, so d scale must not centre it (a centre there changed d scale itself:
    18.03 against 18.28), and the forward's eps * mean term must still come without S_iy."""
    g = torch.Generator().manual_seed(3)
    B, N, D, eps = 6, 4, 5, 0.3
    u, v = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    labels = None if keys == "fewer_keys" else torch.tensor([0, 3, -1, 4, 2, 7])
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    s0 = torch.tensor(1.7, dtype=torch.float64)

    def oracle(u, v, s):
        S = s * u @ v.T
        y = torch.arange(B) if labels is None else labels
        has = (y >= 0) & (y < N)
        pos = torch.where(has, S.gather(1, y.clamp(0, N - 1)[:, None])[:, 0], 0.0)
        return torch.logsumexp(S, 1) - (1 - eps) * pos - eps * S.mean(1)

    leaves = [t.clone().requires_grad_() for t in (u, v, s0)]
    ref = oracle(*leaves)
    ref_g = torch.autograd.grad((ref * w).sum(), leaves)
    dev_leaves = [t.to(device=DEVICE, dtype=torch.float32).requires_grad_() for t in (u, v, s0)]
    lab = None if labels is None else labels.to(DEVICE)
    row, _, _, _ = torch.ops.fastcl.info_nce_rows(*dev_leaves, lab, False, None, None, False, False, backend,
                                                  torch.tensor(eps, dtype=torch.float64))
    got_g = torch.autograd.grad((row * w.to(DEVICE, torch.float32)).sum(), dev_leaves)
    assert torch.allclose(row.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(["du", "dv", "dscale"], got_g, ref_g):
        assert torch.allclose(a.double().cpu(), b, rtol=1e-4, atol=1e-5), (name, a, b)
