"""The loss family on the fused core: every output and gradient vs float64 references."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import fastcl
import fastcl.functional as FCL
import fastcl.integrations
import fastcl.nn
from fastcl import reference as R
from conftest import DEVICE, HAS_CUDA, KERNEL_BACKENDS
from helpers import Embedder, assert_within_budget

BACKENDS = KERNEL_BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _leaves(tensors, dtype, device):
    return [t.detach().to(device=device, dtype=dtype).clone().requires_grad_() for t in tensors]


def _run(fn, tensors, dtype, device, seed=0):
    """Loss and the gradients of every input; reduction="none" outputs get random weights."""
    xs = _leaves(tensors, dtype, device)
    out = fn(*xs)
    if out.dim():
        w = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
        (out * w.to(device=device, dtype=out.dtype)).sum().backward()
    else:
        out.backward()
    return [out.detach()] + [x.grad for x in xs]


def check(fused, ref, tensors, dtype, backend, names):
    """fused(backend=...) vs ref in float64 (oracle) and in `dtype` (the error budget)."""
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("the Triton interpreter computes bf16 wrongly (fastcl refuses it)")
    oracle = _run(ref, [t.double() for t in tensors], torch.float64, "cpu")
    naive = _run(ref, tensors, dtype, DEVICE)
    ours = _run(lambda *xs: fused(*xs, backend=backend), tensors, dtype, DEVICE)
    assert ours[0].shape == oracle[0].shape
    for name, a, b, r in zip(["loss"] + names, ours, naive, oracle):
        assert a is not None, f"no gradient for {name}"
        assert_within_budget(name, a, b, r, dtype)


def _views(n, d, dtype, seed=0, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    z2 = z1 + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return z1.to(dtype).double(), z2.to(dtype).double()


VIEW_SHAPES = [(2, 7), (5, 33), (37, 20)]  # 2N = 74 crosses the 32-row tiles of the interpreter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", VIEW_SHAPES + [(1, 7)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nt_xent(backend, shape, reduction):
    z1, z2 = _views(*shape, torch.float32)
    check(lambda a, b, backend: FCL.nt_xent(a, b, temperature=0.2, reduction=reduction, backend=backend),
          lambda a, b: R.nt_xent_reference(a, b, temperature=0.2, reduction=reduction),
          [z1, z2], torch.float32, backend, ["dz1", "dz2"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_nt_xent_dtypes(backend, dtype, temperature):
    z1, z2 = _views(24, 40, dtype, seed=2)
    check(lambda a, b, backend: FCL.nt_xent(a, b, temperature=temperature, backend=backend),
          lambda a, b: R.nt_xent_reference(a, b, temperature=temperature),
          [z1, z2], dtype, backend, ["dz1", "dz2"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", ["joint", "split"])
@pytest.mark.parametrize("weight", [None, "vmf"])
@pytest.mark.parametrize("shape", VIEW_SHAPES, ids=str)
def test_dcl(backend, negatives, weight, shape):
    z1, z2 = _views(*shape, torch.float32, seed=4)

    def ref(a, b):
        w = None if weight is None else R.vmf_weights(F.normalize(a, dim=-1), F.normalize(b, dim=-1)).detach()
        return R.dcl_reference(a, b, temperature=0.1, weight=w, negatives=negatives, reduction="none")

    check(lambda a, b, backend: FCL.dcl(a, b, temperature=0.1, weight=weight, negatives=negatives,
                                        reduction="none", backend=backend),
          ref, [z1, z2], torch.float32, backend, ["dz1", "dz2"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_dcl_dtypes(backend, dtype, temperature):
    z1, z2 = _views(20, 33, dtype, seed=6)
    check(lambda a, b, backend: FCL.dcl(a, b, temperature=temperature, weight="vmf", backend=backend),
          lambda a, b: R.dcl_reference(a, b, temperature=temperature, weight=R.vmf_weights(
              F.normalize(a, dim=-1), F.normalize(b, dim=-1)).detach()),
          [z1, z2], dtype, backend, ["dz1", "dz2"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dclw_gradient_through_weights(backend):
    """detach_weight=False lets the gradient flow through w, and changes it."""
    z1, z2 = _views(9, 12, torch.float32, seed=8)

    def ref(a, b):
        an, bn = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        w = torch.cat([R.vmf_weights(an, bn), R.vmf_weights(bn, an)])
        return R.dcl_reference(a, b, temperature=0.1, weight=w)

    check(lambda a, b, backend: FCL.dcl(a, b, weight="vmf", detach_weight=False, backend=backend),
          ref, [z1, z2], torch.float32, backend, ["dz1", "dz2"])
    a, b = _leaves([z1, z2], torch.float32, DEVICE)
    ga = torch.autograd.grad(FCL.dcl(a, b, weight="vmf", backend=backend), a)[0]
    gb = torch.autograd.grad(FCL.dcl(a, b, weight="vmf", detach_weight=False, backend=backend), a)[0]
    assert not torch.allclose(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("detach", [True, False])
def test_dclw_fp16_weights_in_fp32(backend, detach):
    """DCLW's vMF weights came from the fp16 similarities: unnormalised features whose
    <z1_i, z2_i> / sigma passed 65504 gave a NaN softmax, loss and gradients, where fp32
    statistics give the value (naive fp16 is NaN too, so the budget check cannot see it)."""
    g = torch.Generator().manual_seed(0)
    z1 = 40 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    z2 = z1 + 10 * torch.randn(8, 16, generator=g, dtype=torch.float64)
    z1, z2 = z1.half().double(), z2.half().double()
    kw = dict(temperature=1.0, weight="vmf", normalize=False, detach_weight=detach)
    oracle = _run(lambda a, b: FCL.dcl(a, b, **kw, backend="reference"), [z1, z2], torch.float64, "cpu")
    ours = _run(lambda a, b: FCL.dcl(a, b, **kw, backend=backend), [z1, z2], torch.float16, DEVICE)
    for name, a, r in zip(["loss", "dz1", "dz2"], ours, oracle):
        assert_within_budget(name, a, r, r, torch.float16)  # fp16's floor: 2e-3


def test_dcl_reference_backend_keeps_the_input_dtype():
    """backend="reference" computes in the input dtype, as the naive torch it stands for: the
    vMF weights (fp32 since the fp16 fix) and a float64 weight tensor promoted its loss."""
    z1, z2 = _views(6, 5, torch.float16)
    z1, z2 = z1.half(), z2.half()
    assert FCL.dcl(z1, z2, weight="vmf", backend="reference").dtype == torch.float16
    w = torch.ones(6, dtype=torch.float64)
    assert FCL.dcl(z1.float(), z2.float(), weight=w, backend="reference").dtype == torch.float32


def test_dcl_weights_have_mean_one():
    z1, z2 = _views(50, 8, torch.float64)
    assert torch.allclose(FCL.dcl_weights(z1, z2).mean(), torch.tensor(1.0, dtype=torch.float64))


def test_vmf_weights_formula():
    """w_i = 2 - N exp(c_i / sigma) / sum_j exp(c_j / sigma), c_i = <u1_i, u2_i> on normalised
    views, written out here: the DCLW oracles share fastcl.reference.vmf_weights."""
    z1, z2 = _views(9, 5, torch.float64)
    c = [sum(a * b for a, b in zip(F.normalize(z1[i], dim=0).tolist(), F.normalize(z2[i], dim=0).tolist()))
         for i in range(9)]
    e = [math.exp(ci / 0.3) for ci in c]
    expected = torch.tensor([2 - 9 * ei / sum(e) for ei in e], dtype=torch.float64)
    assert torch.allclose(FCL.dcl_weights(z1, z2, sigma=0.3), expected, atol=1e-13)
    assert torch.allclose(R.vmf_weights(F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), 0.3), expected,
                          atol=1e-13)


def test_dcl_callable_and_tensor_weights():
    z1, z2 = _views(6, 5, torch.float64)
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    by_tensor = FCL.dcl(z1, z2, weight=w, backend="torch")
    by_callable = FCL.dcl(z1, z2, weight=lambda a, b: w, backend="torch")
    assert torch.allclose(by_tensor, by_callable)
    assert torch.allclose(by_tensor, R.dcl_reference(z1, z2, weight=w))
    # A callable gets (this view, the other view), normalised: weight(n1, n2) for view 1's
    # anchors and weight(n2, n1) for view 2's.
    def f(a, b):
        return 1.0 + 0.5 * a[:, 0] - 0.25 * b[:, 1]

    n1, n2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    expected = R.dcl_reference(z1, z2, weight=torch.cat([f(n1, n2), f(n2, n1)]), reduction="none")
    usable = fastcl.available_backends(DEVICE, torch.float32)
    for backend in [b for b in BACKENDS if usable[b] is None]:
        got = FCL.dcl(z1.float().to(DEVICE), z2.float().to(DEVICE), weight=f, reduction="none", backend=backend)
        assert torch.allclose(got.double().cpu(), expected, atol=1e-5), backend
    assert fastcl.nn.DCLLoss(weight_fn=f, backend="torch")(z1, z2).item() == pytest.approx(
        expected.mean().item(), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.05, 0.02])
def test_supcon_gradient_with_near_duplicate_positives(backend, temperature):
    """Tight classes: a row's positives sit within a few fp32 ulps of its maximum logit. The
    Triton backward snapped every logit within 2^-20 of the row max onto it (meant for a
    recompute that rounds differently from the forward), which erased those real gaps: 7-15x
    naive fp32's gradient error. Where the recompute repeats the forward's rounding, no snap."""
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(5, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (24,), generator=g)
    x = (centers[labels] + 1e-3 * torch.randn(24, 8, generator=g, dtype=torch.float64)).float().double()

    def grad(fn, dtype, device):
        xx = x.to(device, dtype).requires_grad_()
        fn(xx, labels.to(device), temperature=temperature).backward()
        return xx.grad.double().cpu()

    ours = grad(lambda *a, **k: FCL.supcon(*a, backend=backend, **k), torch.float32, DEVICE)
    naive = grad(R.supcon_reference, torch.float32, DEVICE)
    assert_within_budget("dx", ours, naive, grad(R.supcon_reference, torch.float64, "cpu"), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcl_module_weight_fn_gets_a_gradient(backend):
    """lightly's DCLLoss multiplies the positive term by weight_fn(out0, out1) as is; the
    module detached it (loss equal, gradient up to 0.7 off with lightly's docstring example)."""
    if fastcl.available_backends(DEVICE, torch.float32)[backend] is not None:
        pytest.skip(fastcl.available_backends(DEVICE, torch.float32)[backend])
    z1, z2 = _views(6, 4, torch.float64)

    def wfn(a, b):
        return ((a - b) ** 2).sum(1)

    def grads(loss_fn, dtype):
        a = z1.detach().to(DEVICE, dtype).clone().requires_grad_()
        b = z2.detach().to(DEVICE, dtype).clone().requires_grad_()
        loss_fn(a, b).backward()
        return a.grad.double().cpu(), b.grad.double().cpu()

    def naive(a, b):
        n1, n2 = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return R.dcl_reference(a, b, weight=torch.cat([wfn(n1, n2), wfn(n2, n1)]))

    got = grads(fastcl.nn.DCLLoss(weight_fn=wfn, backend=backend), torch.float32)
    want = grads(naive, torch.float64)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), float((g - w).abs().max())
    # DCLW's own weights stay detached, as lightly's negative_mises_fisher_weights detaches
    w = grads(lambda a, b: R.dcl_reference(a, b, weight=FCL.dcl_weights(a, b).detach()), torch.float64)
    g = grads(fastcl.nn.DCLWLoss(backend=backend), torch.float32)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(g, w))


def test_modules_forward_their_arguments():
    """Each module passes its constructor's arguments on (not just the defaults)."""
    g = torch.Generator().manual_seed(13)
    q, k = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(9, 6, generator=g, dtype=torch.float64)
    got = fastcl.nn.InfoNCELoss(temperature=0.2, symmetric=True, reduction="none", backend="torch")(q, k)
    assert torch.allclose(got, R.info_nce_reference(q, k, temperature=0.2, symmetric=True, reduction="none"))
    got = fastcl.nn.InfoNCELoss(temperature=0.2, normalize=False, reduction="sum", backend="torch")(q, k)
    assert torch.allclose(got, R.info_nce_reference(q, k, temperature=0.2, normalize=False, reduction="sum"))
    got = fastcl.nn.InfoNCELoss(temperature=0.2, label_smoothing=0.3, backend="torch")(q, k)
    assert torch.allclose(got, R.info_nce_reference(q, k, temperature=0.2, label_smoothing=0.3))
    x, labels = _supcon_inputs(12, 5, torch.float64)
    assert torch.allclose(fastcl.nn.SupConLoss(temperature=0.3, backend="torch")(x, labels),
                          R.supcon_reference(x, labels, temperature=0.3))
    a, p = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert torch.allclose(fastcl.nn.MultipleNegativesRankingLoss(scale=7.0, backend="torch")(a, p),
                          F.cross_entropy(7.0 * F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T, torch.arange(7)))


def _supcon_inputs(b, d, dtype, views=1, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (b,), generator=g)
    centers = torch.randn(n_classes, d, generator=g, dtype=torch.float64)
    shape = (b, views, d) if views > 1 else (b, d)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x += 2 * (centers[labels][:, None] if views > 1 else centers[labels])
    return x.to(dtype).double(), labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_excluded_self_similarity_far_above_the_rest(backend):
    """NT-Xent leaves out S_ii, which for raw (normalize=False) embeddings of norm ~10 lies ~170
    above every logit kept: a log-sum-exp stabilised by a maximum taken before the exclusion
    underflows every kept term (fp32's exp gives 0 below -87) and the loss becomes inf."""
    z1, z2 = _views(6, 40, torch.float32, seed=5, noise=3.0)
    z1, z2 = 2 * z1, 2 * z2
    check(lambda a, b, backend: FCL.nt_xent(a, b, temperature=0.5, normalize=False, backend=backend),
          lambda a, b: R.nt_xent_reference(a, b, temperature=0.5, normalize=False),
          [z1, z2], torch.float32, backend, ["dz1", "dz2"])


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_supcon_anchor_without_positives(backend):
    """A class with one member in a single view: its anchor has no positive, counts for
    nothing, and gets a zero (not NaN) gradient, on every backend and the reference."""
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2, 3])  # classes 1 and 3: one member each
    outs = []
    for reduction in ("none", "mean"):
        f = x.to(DEVICE, torch.float32).clone().requires_grad_()
        out = FCL.supcon(f, labels.to(DEVICE), temperature=0.1, reduction=reduction, backend=backend)
        out.sum().backward()
        assert torch.isfinite(f.grad).all() and torch.isfinite(out).all(), reduction
        outs.append((out.detach().cpu(), f.grad.cpu()))
    assert torch.equal(outs[0][0][[2, 5]], torch.zeros(2))
    want = R.supcon_reference(x, labels, temperature=0.1)
    assert torch.allclose(outs[1][0].double(), want, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 7, 1), (6, 5, 1), (45, 20, 1), (20, 33, 2)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_supcon(backend, shape, reduction):
    b, d, views = shape
    x, labels = _supcon_inputs(b, d, torch.float32, views, seed=b)
    lab = labels.to(DEVICE)

    def flat(t):
        return torch.cat(t.unbind(1)) if t.dim() == 3 else t

    check(lambda f, backend: FCL.supcon(f, lab, temperature=0.1, reduction=reduction, backend=backend),
          lambda f: R.supcon_reference(flat(f), labels.to(f.device).repeat(views), temperature=0.1,
                                       reduction=reduction),
          [x], torch.float32, backend, ["dfeatures"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_supcon_dtypes(backend, dtype, temperature):
    x, labels = _supcon_inputs(40, 24, dtype, seed=3)
    lab = labels.to(DEVICE)
    check(lambda f, backend: FCL.supcon(f, lab, temperature=temperature, backend=backend),
          lambda f: R.supcon_reference(f, labels.to(f.device), temperature=temperature),
          [x], dtype, backend, ["dfeatures"])


def test_supcon_views_default_to_same_sample_positives():
    x, _ = _supcon_inputs(8, 6, torch.float64, views=2)
    flat = torch.cat(x.unbind(1))
    assert torch.allclose(FCL.supcon(x, backend="torch"),
                          R.supcon_reference(flat, torch.arange(8).repeat(2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_negative_ids_and_unnormalized(backend):
    """Class ids -2..1 (the kernels pad out-of-range rows and columns with -1/-2, which must not
    count as classes), and raw dot products (normalize=False: nothing projects an error away)."""
    x, labels = _supcon_inputs(45, 20, torch.float32, seed=15)
    ids = (labels - 2).to(DEVICE)
    check(lambda f, backend: FCL.supcon(f, ids, temperature=0.5, backend=backend),
          lambda f: R.supcon_reference(f, (labels - 2).to(f.device), temperature=0.5),
          [x], torch.float32, backend, ["dfeatures"])
    check(lambda f, backend: FCL.supcon(f, ids, temperature=5.0, normalize=False, backend=backend),
          lambda f: R.supcon_reference(f, (labels - 2).to(f.device), temperature=5.0, normalize=False),
          [x], torch.float32, backend, ["dfeatures"])


def test_loss_family_with_torch_chunks(monkeypatch):
    """The loss family when the torch backend's rows come in several partial chunks."""
    from fastcl import chunked
    backend = "torch"
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 9 * 74)  # 2N = 74 rows: chunks of 9
    z1, z2 = _views(37, 20, torch.float32)
    check(lambda a, b, backend: FCL.nt_xent(a, b, temperature=0.3, reduction="none", backend=backend),
          lambda a, b: R.nt_xent_reference(a, b, temperature=0.3, reduction="none"),
          [z1, z2], torch.float32, backend, ["dz1", "dz2"])
    check(lambda a, b, backend: FCL.dcl(a, b, reduction="none", backend=backend),
          lambda a, b: R.dcl_reference(a, b, reduction="none"), [z1, z2], torch.float32, backend, ["dz1", "dz2"])
    x, labels = _supcon_inputs(74, 20, torch.float32, seed=16)
    check(lambda f, backend: FCL.supcon(f, labels.to(f.device), reduction="none", backend=backend),
          lambda f: R.supcon_reference(f, labels.to(f.device), reduction="none"), [x], torch.float32, backend,
          ["dfeatures"])


def test_supcon_large_sparse_class_ids():
    x, labels = _supcon_inputs(10, 4, torch.float64)
    assert torch.allclose(FCL.supcon(x, labels * 10**12 - 5, backend="torch"),
                          R.supcon_reference(x, labels))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", ["none", "per_anchor", "pool"])
def test_multiple_negatives_ranking(backend, negatives):
    g = torch.Generator().manual_seed(9)
    a = torch.randn(13, 16, generator=g, dtype=torch.float64)
    p = a + 0.5 * torch.randn(13, 16, generator=g, dtype=torch.float64)
    n = {"none": None, "per_anchor": torch.randn(13, 3, 16, generator=g, dtype=torch.float64),
         "pool": torch.randn(29, 16, generator=g, dtype=torch.float64)}[negatives]
    tensors = [a, p] + ([] if n is None else [n])

    def ref(a, p, n=None):
        cands = p if n is None else torch.cat([p, n.reshape(-1, n.shape[-1])])
        scores = F.normalize(a, dim=-1) @ F.normalize(cands, dim=-1).T * 20.0
        return F.cross_entropy(scores, torch.arange(a.shape[0], device=a.device))

    check(lambda *xs, backend: FCL.multiple_negatives_ranking(*xs, scale=20.0, backend=backend),
          ref, tensors, torch.float32, backend, ["danchor", "dpositive", "dnegatives"][:len(tensors)])


ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# (directions, partition_mode, hardness_mode): each mode of a candidate set at least once
MNRL_VARIANTS = {
    "all_joint": (ALL_DIRECTIONS, "joint", None),
    "symmetric": (("query_to_doc", "doc_to_query"), "per_direction", None),
    "doc_to_doc_in_batch": (("query_to_doc", "doc_to_doc"), "joint", "in_batch_negatives"),
    "hard_negatives": (("query_to_doc",), "joint", "hard_negatives"),
    "all_negatives_qq": (("query_to_doc", "query_to_query"), "joint", "all_negatives"),
    "symmetric_in_batch": (("query_to_doc", "doc_to_query"), "per_direction", "in_batch_negatives"),
}


def _mnrl_inputs(B, D, negatives, seed=9, M=2, P=11):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, D, generator=g, dtype=torch.float64)
    p = a + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    # hard negatives near their anchor's positive: they matter in the softmax
    n = {"none": None, "hard": p[:, None] + 0.7 * torch.randn(B, M, D, generator=g, dtype=torch.float64),
         "pool": torch.randn(P, D, generator=g, dtype=torch.float64)}[negatives]
    return [a, p] + ([] if n is None else [n])


def _mnrl_variant(variant, scale=7.0, strength=2.5, **kw):
    directions, mode, hardness = MNRL_VARIANTS[variant]
    return dict(scale=scale, directions=directions, partition_mode=mode, hardness_mode=hardness,
                hardness_strength=strength if hardness else 0.0, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(MNRL_VARIANTS))
@pytest.mark.parametrize("negatives", ["none", "hard", "pool"])
@pytest.mark.parametrize("B,D", [(13, 16), (1, 5)], ids=str)
def test_mnrl_variants(backend, variant, negatives, B, D):
    """sentence-transformers' directions, partition modes and hardness penalties: the loss and
    every gradient against the materialised float64 reference (B=1: the off-diagonal sets are
    empty)."""
    kw = _mnrl_variant(variant)
    tensors = _mnrl_inputs(B, D, negatives)
    check(lambda *xs, backend: FCL.multiple_negatives_ranking(*xs, **kw, backend=backend),
          lambda *xs: R.mnrl_reference(*xs, **kw), tensors, torch.float32, backend,
          ["danchor", "dpositive", "dnegatives"][:len(tensors)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 20.0, 100.0])
def test_mnrl_variants_dtypes(backend, dtype, scale):
    """Every direction and a hardness penalty in 16-bit, over more rows than a 32-row tile and
    an odd D, with reduction="none" (random weights on the rows)."""
    kw = dict(_mnrl_variant("all_joint", scale=scale), hardness_mode="in_batch_negatives",
              hardness_strength=3.0, reduction="none")
    tensors = [t.to(dtype).double() for t in _mnrl_inputs(37, 33, "hard", seed=4)]
    check(lambda *xs, backend: FCL.multiple_negatives_ranking(*xs, **kw, backend=backend),
          lambda *xs: R.mnrl_reference(*xs, **kw), tensors, dtype, backend, ["danchor", "dpositive", "dnegatives"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,seed", [(100.0, 13), (1000.0, 38)])
def test_mnrl_parts_merged_at_large_scales(backend, scale, seed):
    """The variants' log Z merges per-block parts lse_k - pos; pos's gradient is -sum(w_k) d pos,
    which cancels sum(w_k d lse_k) down to the small terms on a nearly solved row. With the
    merge in fp32, its weights' rounding (~u * scale) stayed: gradients up to 10x naive fp32's
    error from float64 (scale 100; 1.4x to 5.7x the budget over seeds at scale 1000; found by a
    differential fuzz)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(n, 3, generator=g).double() for n in (16, 16, 4)]
    kw = dict(scale=scale, directions=("query_to_doc", "doc_to_doc"), reduction="sum")
    check(lambda *xs, backend: FCL.multiple_negatives_ranking(*xs, **kw, backend=backend),
          lambda *xs: R.mnrl_reference(*xs, **kw), tensors, torch.float32, backend,
          ["danchor", "dpositive", "dnegatives"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["in_batch_negatives", "all_negatives", "hard_negatives"])
@pytest.mark.parametrize("negatives", ["none", "hard"])
def test_mnrl_hardness_gradients_on_solved_rows(backend, mode, negatives):
    """Nearly solved rows (positives at cosine ~0.99995) at scale 50: their gradient is the
    negatives' e^-gap terms, ~1e-11. The penalised off-diagonal split the positive's own logit
    out as s c_ii - pos, whose gradient s p_i - s p_i, at softmax weight ~1, cancelled to
    rounding: q's gradient came out 0 (relative error 1; naive fp32's 1.6e-2)."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(16, 32, generator=g, dtype=torch.float64)
    p = a + 1e-2 * torch.randn(16, 32, generator=g, dtype=torch.float64)
    n = torch.randn(16, 2, 32, generator=g, dtype=torch.float64)
    tensors = [t.float().double() for t in ([a, p] if negatives == "none" else [a, p, n])]
    kw = dict(scale=50.0, directions=("query_to_doc", "query_to_query"), hardness_mode=mode, hardness_strength=3.0)
    check(lambda *xs, backend: FCL.multiple_negatives_ranking(*xs, **kw, backend=backend),
          lambda *xs: R.mnrl_reference(*xs, **kw), tensors, torch.float32, backend,
          ["danchor", "dpositive", "dnegatives"][:len(tensors)])


def test_mnrl_variants_reference_backend_and_modules():
    """backend='reference' is the reference; the modules pass their options through."""
    a, p, n = _mnrl_inputs(6, 4, "hard")
    kw = _mnrl_variant("doc_to_doc_in_batch")
    expected = R.mnrl_reference(a, p, n, **kw)
    assert torch.equal(FCL.multiple_negatives_ranking(a, p, n, **kw, backend="reference"), expected)
    module = fastcl.nn.MultipleNegativesRankingLoss(**kw, backend="torch")
    assert torch.allclose(module(a, p, *n.unbind(1)), expected, rtol=0, atol=1e-12)
    assert "doc_to_doc" in repr(module) and "in_batch_negatives" in repr(module)

    drop_in = fastcl.integrations.MultipleNegativesRankingLoss(Embedder(), **kw)
    got = drop_in([{"x": t} for t in (a, p, *n.unbind(1))], None)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert drop_in.get_config_dict()["hardness_mode"] == "in_batch_negatives"
    sym = fastcl.integrations.MultipleNegativesSymmetricRankingLoss(Embedder(), scale=7.0)
    assert torch.allclose(sym([{"x": a}, {"x": p}], None), R.mnrl_reference(a, p, **_mnrl_variant("symmetric")),
                          rtol=0, atol=1e-12)


def test_mnrl_takes_one_fused_pass_where_it_is_an_info_nce(monkeypatch):
    """The plain loss and the symmetric one on pairs are InfoNCEs (the symmetric one CLIP's):
    one call of the fused op; the other variants take the blocks' passes."""
    calls = []
    real = fastcl.losses.info_nce
    monkeypatch.setattr(fastcl.losses, "info_nce", lambda *a, **kw: calls.append(kw["symmetric"]) or real(*a, **kw))
    a, p, n = _mnrl_inputs(6, 5, "hard", seed=4)
    sym = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
    cases = [(dict(negatives=n), [False]), (dict(**sym), [True]),
             (dict(hardness_mode="hard_negatives", hardness_strength=2.0), [False]),  # no hard negative to penalise
             (dict(negatives=n, **sym), []), (dict(negatives=n[:, 0], **sym), []),
             (dict(hardness_mode="all_negatives", hardness_strength=2.0), [])]
    for kw, want in cases:
        calls.clear()
        got = FCL.multiple_negatives_ranking(a, p, scale=5.0, backend="torch", **kw)
        assert calls == want, kw
        assert torch.allclose(got, R.mnrl_reference(a, p, scale=5.0, **kw), rtol=0, atol=1e-12), kw


def test_mnrl_hardness_needs_a_mode_and_a_strength():
    """sentence-transformers applies no penalty without both (and warns when a mode has no
    strength); fastcl warns in both cases, and a module once, when it is built."""
    a, p, n = _mnrl_inputs(6, 4, "hard")
    plain = FCL.multiple_negatives_ranking(a, p, n, backend="torch")
    for kw in (dict(hardness_mode="hard_negatives"), dict(hardness_strength=1.0)):
        with pytest.warns(UserWarning, match="no hardness penalty"):
            assert torch.equal(FCL.multiple_negatives_ranking(a, p, n, **kw, backend="torch"), plain)
    # a strength with a mode changes the loss (the test above would pass on an ignored penalty)
    assert not torch.allclose(FCL.multiple_negatives_ranking(a, p, n, hardness_mode="hard_negatives",
                                                             hardness_strength=1.0, backend="torch"), plain)
    with pytest.warns(UserWarning, match="no hardness penalty") as record:
        module = fastcl.nn.MultipleNegativesRankingLoss(20.0, "torch", hardness_mode="all_negatives")
        assert torch.equal(module(a, p, n), plain)
    assert len(record) == 1


def test_mnrl_variants_edge_cases():
    """B = 1 with a strength too small to change s + a (the penalised set is empty: -inf, not
    NaN); nearly solved rows in fp32 keep the plain loss's precision (log Z - pos is computed
    relative to pos, not as the difference of two logits near the scale); one [B, D] negative
    given to the module is a column of hard negatives, as in sentence-transformers."""
    a, p, n = _mnrl_inputs(1, 5, "hard", seed=3)
    for strength, dtype in ((1e-7, torch.float32), (1e-15, torch.float64)):
        for mode in fastcl.losses.HARDNESS_MODES:
            kw = dict(scale=20.0, directions=ALL_DIRECTIONS, hardness_mode=mode, hardness_strength=strength)
            x = [t.to(dtype).requires_grad_() for t in (a, p, n)]
            loss = FCL.multiple_negatives_ranking(*x, backend="torch", **kw)
            grads = torch.autograd.grad(loss, x)
            want = R.mnrl_reference(a, p, n, **kw)
            assert torch.allclose(loss.double(), want, rtol=0, atol=1e-5), (mode, dtype, loss, want)
            assert all(torch.isfinite(g).all() for g in grads), (mode, dtype)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(48, 32, generator=g, dtype=torch.float64)
    p = a + 0.1 * torch.randn(48, 32, generator=g, dtype=torch.float64)  # solved at scale 100
    n = torch.randn(48, 2, 32, generator=g, dtype=torch.float64)
    for kw in (dict(directions=("query_to_doc", "query_to_query")), dict(directions=("query_to_doc", "doc_to_query")),
               dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
               dict(directions=ALL_DIRECTIONS, hardness_mode="all_negatives", hardness_strength=3.0),
               dict(negatives=n, hardness_mode="hard_negatives", hardness_strength=3.0),
               dict(negatives=n, directions=ALL_DIRECTIONS, hardness_mode="in_batch_negatives",
                    hardness_strength=3.0)):
        want = R.mnrl_reference(a, p, scale=100.0, reduction="none", **kw)
        kw32 = {k: v.float() if k == "negatives" else v for k, v in kw.items()}
        got = FCL.multiple_negatives_ranking(a.float(), p.float(), scale=100.0, reduction="none",
                                             backend="torch", **kw32)
        # torch's fp32 (and the difference of fp32 logits near 100) is 1e-5 off here
        assert (got.double() - want).abs().max() <= 1e-6, kw
    a, p, n = _mnrl_inputs(6, 5, "hard", seed=8, M=1)
    kw = dict(scale=20.0, directions=ALL_DIRECTIONS, hardness_mode="hard_negatives", hardness_strength=5.0)
    module = fastcl.nn.MultipleNegativesRankingLoss(backend="torch", **kw)
    assert torch.allclose(module(a, p, n[:, 0]), R.mnrl_reference(a, p, n, **kw), rtol=0, atol=1e-12)
    pool = n[:5, 0]  # P != B: a pool, owned by nobody
    assert torch.allclose(module(a, p, pool), R.mnrl_reference(a, p, pool, **kw), rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_multiple_negatives_ranking_reduction(reduction):
    g = torch.Generator().manual_seed(14)
    a, p = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    scores = 20.0 * F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T
    assert torch.allclose(FCL.multiple_negatives_ranking(a, p, reduction=reduction, backend="torch"),
                          F.cross_entropy(scores, torch.arange(6), reduction=reduction))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_info_nce_label_smoothing(backend, symmetric, reduction):
    g = torch.Generator().manual_seed(10)
    q = torch.randn(40, 12, generator=g, dtype=torch.float64)
    k = q + 0.5 * torch.randn(40 if symmetric else 55, 12, generator=g, dtype=torch.float64)[:, :12] \
        if symmetric else torch.randn(55, 12, generator=g, dtype=torch.float64)
    # Without symmetry: positives given by labels, anywhere among the 55 keys.
    labels = None if symmetric else torch.randperm(55, generator=g)[:40]
    lab = None if labels is None else labels.to(DEVICE)
    check(lambda a, b, backend: FCL.info_nce(a, b, temperature=0.1, symmetric=symmetric, labels=lab,
                                             label_smoothing=0.1, reduction=reduction, backend=backend),
          lambda a, b: R.info_nce_reference(a, b, temperature=0.1, symmetric=symmetric, label_smoothing=0.1,
                                            labels=None if labels is None else labels.to(a.device),
                                            reduction=reduction),
          [q, k], torch.float32, backend, ["dq", "dk"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("eps", [0.5, 0.9, 0.99])
def test_info_nce_label_smoothing_near_uniform_rows(backend, symmetric, eps):
    """Large eps on near-uniform rows (scale 0.1, tau = 10). The smoothing's gradient used to be
    a term of its own, outside the tiles: it cancelled the op's and its fp32 input gradients
    erred 2-17x naive fp32's. The tiles now form F.cross_entropy's G = P - (1 - eps) onehot -
    eps / N: within the usual 4x of naive fp32, with no floor for the input gradients (their
    errors here are ~2e-7). The loss and d logit_scale keep fp32's floor: their errors at this
    scale (up to 2e-6, also without smoothing) come from the forward's statistics, not from it.
    On a GPU Triton's fp32 dots are 3xTF32, rounded unlike naive's IEEE fp32: the floor stays."""
    g = torch.Generator().manual_seed(int(eps * 100) + symmetric)
    q = torch.randn(70, 33, generator=g, dtype=torch.float64)  # 70: across the tiles
    k = torch.randn(70 if symmetric else 90, 33, generator=g, dtype=torch.float64)
    labels = None if symmetric else torch.randperm(90, generator=g)[:70]
    lab = None if labels is None else labels.to(DEVICE)
    ls = torch.tensor([math.log(0.1)], dtype=torch.float64)

    def ref(a, b, s):
        return R.info_nce_reference(a, b, logit_scale=s, symmetric=symmetric, label_smoothing=eps,
                                    labels=None if labels is None else labels.to(a.device))

    oracle = _run(ref, [q, k, ls], torch.float64, "cpu")
    naive = _run(ref, [q, k, ls], torch.float32, DEVICE)
    ours = _run(lambda a, b, s: FCL.info_nce(a, b, logit_scale=s, symmetric=symmetric, labels=lab,
                                             label_smoothing=eps, backend=backend), [q, k, ls], torch.float32, DEVICE)
    for name, a, b, r in zip(["loss", "dq", "dk", "dlogit_scale"], ours, naive, oracle):
        no_floor = name in ("dq", "dk") and not (backend == "triton" and HAS_CUDA)
        assert_within_budget(name, a, b, r, torch.float32, floor=0 if no_floor else None)


@pytest.mark.parametrize("name", ["nt_xent", "dcl_joint", "dcl_split", "dclw_grad", "supcon"])
def test_gradcheck(name):
    z1, z2 = _views(4, 3, torch.float64, seed=12)
    z1.requires_grad_()
    z2.requires_grad_()
    labels = torch.tensor([0, 1, 0, 1])
    fn = {
        "nt_xent": lambda a, b: FCL.nt_xent(a, b, temperature=0.3, reduction="none", backend="torch"),
        "dcl_joint": lambda a, b: FCL.dcl(a, b, reduction="none", backend="torch"),
        "dcl_split": lambda a, b: FCL.dcl(a, b, negatives="split", reduction="none", backend="torch"),
        "dclw_grad": lambda a, b: FCL.dcl(a, b, weight="vmf", detach_weight=False, backend="torch"),
        "supcon": lambda a, b: FCL.supcon(torch.cat([a, b]), labels.repeat(2), reduction="none",
                                          backend="torch"),
    }[name]
    assert torch.autograd.gradcheck(fn, (z1, z2))


def test_modules():
    z1, z2 = _views(6, 8, torch.float64)
    assert torch.allclose(fastcl.nn.NTXentLoss(temperature=0.3)(z1, z2), R.nt_xent_reference(z1, z2, temperature=0.3))
    assert torch.allclose(fastcl.nn.DCLLoss()(z1, z2), R.dcl_reference(z1, z2))
    w = R.vmf_weights(F.normalize(z1, dim=-1), F.normalize(z2, dim=-1), sigma=0.3)
    assert torch.allclose(fastcl.nn.DCLWLoss(sigma=0.3)(z1, z2), R.dcl_reference(z1, z2, weight=w))
    x, labels = _supcon_inputs(12, 5, torch.float64)
    assert torch.allclose(fastcl.nn.SupConLoss()(x, labels), R.supcon_reference(x, labels))
    negs = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
    # sentence-transformers' MNRL: cross-entropy over scale * cos(anchor_i, [positives; negatives])
    cos = F.normalize(z1, dim=-1) @ F.normalize(torch.cat([z2] + negs), dim=-1).T
    expected = F.cross_entropy(20.0 * cos, torch.arange(6))
    assert torch.allclose(fastcl.nn.MultipleNegativesRankingLoss()(z1, z2, *negs), expected)


def test_clip_loss_float_multiplier_keeps_float64():
    """A Python-float logit_scale on fp64 features stays fp64 (its log and exp in fp32 cost ~1e-7)."""
    a, b = _views(8, 6, torch.float64)
    logits = 14.0 * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    expected = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    got = fastcl.nn.ClipLoss(normalize=True)(a, b, 14.0)
    assert got.dtype == torch.float64
    assert abs(got.item() - expected.item()) < 1e-12


def test_nt_xent_module_takes_lightlys_disabled_memory_bank():
    """lightly takes memory_bank_size as an int or (size, dim), with size 0 for none; (0, dim)
    was refused as a memory bank."""
    a, b = _views(6, 5, torch.float64)
    want = fastcl.nn.NTXentLoss()(a, b)
    for size in (0, (0, 5), [0, 5]):
        torch.testing.assert_close(fastcl.nn.NTXentLoss(memory_bank_size=size)(a, b), want, rtol=0, atol=0)


def _dot_named_cos_sim(a, b):
    return a @ b.T


_dot_named_cos_sim.__name__ = "cos_sim"  # what the check once went by


@pytest.mark.parametrize("call, exc, match", [
    (lambda: FCL.nt_xent(torch.randn(4, 3), torch.randn(5, 3)), ValueError, "same shape"),
    (lambda: FCL.dcl(torch.randn(1, 3), torch.randn(1, 3)), ValueError, "at least 2 pairs"),
    (lambda: FCL.dcl(torch.randn(4, 3), torch.randn(4, 3), negatives="both"), ValueError, "joint"),
    (lambda: FCL.dcl(torch.randn(4, 3), torch.randn(4, 3), weight="exp"), ValueError, "vmf"),
    (lambda: FCL.dcl(torch.randn(4, 3), torch.randn(4, 3), weight=torch.ones(3)), ValueError, r"shape \[4\]"),
    (lambda: FCL.supcon(torch.randn(4, 3)), ValueError, "several views"),
    (lambda: FCL.supcon(torch.randn(4, 3), torch.zeros(4)), TypeError, "integer"),
    (lambda: FCL.supcon(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), ValueError, r"\[4\]"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 2, 3)),
     ValueError, "B=4"),
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), label_smoothing=1.0), ValueError, "label_smoothing"),
    (lambda: fastcl.nn.NTXentLoss(memory_bank_size=128), NotImplementedError, "memory bank"),
    (lambda: fastcl.nn.NTXentLoss(memory_bank_size=(128, 3)), NotImplementedError, "memory bank"),
    (lambda: fastcl.nn.DCLLoss(gather_distributed="yes"), TypeError, "gather_distributed"),
    (lambda: fastcl.nn.NTXentLoss(gather_distributed="yes"), TypeError, "gather_distributed"),
    (lambda: fastcl.nn.SupConLoss(gather_distributed="yes"), TypeError, "gather_distributed"),
    (lambda: fastcl.nn.MultipleNegativesRankingLoss(gather_across_devices="no"), TypeError, "gather_across_devices"),
    (lambda: fastcl.integrations.MultipleNegativesRankingLoss(None, gather_across_devices="yes"), TypeError,
     "gather_across_devices"),
    (lambda: FCL.dcl(torch.randn(4, 3), torch.randn(4, 3), weight="vmf", sigma=0.0), ValueError, "sigma"),
    (lambda: FCL.dcl_weights(torch.randn(4, 3), torch.randn(4, 3), sigma=-1.0), ValueError, "sigma"),
    # dcl_weights checked nothing: a 1-D pair gave a number, [4, 3] with [5, 3] torch's broadcast error
    (lambda: FCL.dcl_weights(torch.randn(3), torch.randn(3)), ValueError, "2-D"),
    (lambda: FCL.dcl_weights(torch.randn(4, 3), torch.randn(5, 3)), ValueError, "same shape"),
    (lambda: FCL.dcl_weights(torch.ones(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.long)),
     TypeError, "float"),
    (lambda: FCL.supcon(torch.randn(4, 0, 3), torch.zeros(4, dtype=torch.long)), ValueError, "V = 0"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), scale=0.0), ValueError,
     "scale must be a positive"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), scale=-20.0), ValueError,
     "scale must be a positive"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), [torch.randn(4, 3)]),
     TypeError, "torch.stack"),
    (lambda: fastcl.nn.ClipLoss(init_temperature=0.0), ValueError, "init_temperature"),
    (lambda: fastcl.nn.ClipLoss(init_temperature=-1), ValueError, "init_temperature"),
    (lambda: fastcl.nn.ClipLoss()(torch.randn(4, 3), torch.randn(4, 3), 0.0), ValueError, "logit_scale"),
    (lambda: fastcl.nn.ClipLoss()(torch.randn(4, 3), torch.randn(4, 3), torch.ones(2)), ValueError,
     "one element"),
    # These losses have no logit_scale=: None must not silently become info_nce's 0.07.
    (lambda: FCL.nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=None), TypeError, "temperature"),
    (lambda: FCL.dcl(torch.randn(4, 3), torch.randn(4, 3), temperature=None), TypeError, "temperature"),
    (lambda: FCL.supcon(torch.randn(4, 3), torch.arange(4), temperature=None), TypeError, "temperature"),
    (lambda: fastcl.nn.NTXentLoss(temperature=None)(torch.randn(4, 3), torch.randn(4, 3)), TypeError,
     "temperature"),
    (lambda: FCL.dcl(torch.randn(4, 3), torch.randn(4, 3), weight=torch.ones(4, device="meta")), ValueError,
     "device"),
    (lambda: FCL.dcl(torch.randn(4, 3), torch.randn(4, 3), weight=torch.ones(4, dtype=torch.long)), TypeError,
     "floating"),
    (lambda: fastcl.integrations.MultipleNegativesRankingLoss(None, scale=0), ValueError, "scale"),
    # sentence-transformers' rules for its variant options, in every entry point
    (lambda: fastcl.integrations.MultipleNegativesRankingLoss(None, directions=("doc_to_query",)),
     ValueError, "must include 'query_to_doc'"),
    (lambda: fastcl.integrations.MultipleNegativesRankingLoss(None, directions=()), ValueError, "non-empty"),
    (lambda: fastcl.nn.MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_pos")), ValueError,
     "doc_to_pos"),
    (lambda: fastcl.nn.MultipleNegativesRankingLoss(directions="query_to_doc"), TypeError, "tuple of direction"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), partition_mode="separate"),
     ValueError, "partition_mode must be"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), partition_mode="per_direction",
                                            directions=("query_to_doc", "query_to_query")), ValueError,
     "use partition_mode='joint'"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), hardness_mode="hardest"),
     ValueError, "hardness_mode must be"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), hardness_mode="hard_negatives",
                                            hardness_strength=-1.0), ValueError, "hardness_strength"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), hardness_mode="all_negatives",
                                            hardness_strength=float("nan")), ValueError, "hardness_strength"),
    # a strength whose s + alpha overflows: the error named a temperature the caller never gave
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), hardness_mode="all_negatives",
                                            hardness_strength=1e308), ValueError, r"scale \+ hardness_strength"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 1, 3),
                                            directions=("query_to_doc", "doc_to_doc"), hardness_mode="hard_negatives",
                                            hardness_strength=1e39), ValueError, r"at most 1.18e\+38 for torch.float32"),
    (lambda: fastcl.integrations.MultipleNegativesSymmetricRankingLoss(None, scale=-1), ValueError, "scale"),
    # the similarity is asked of its values: a dot product named cos_sim used to pass
    (lambda: fastcl.integrations.MultipleNegativesRankingLoss(None, similarity_fct=_dot_named_cos_sim),
     NotImplementedError, "not cosine"),
    (lambda: fastcl.integrations.MultipleNegativesRankingLoss(None, similarity_fct=lambda a, b: a @ b.T),
     NotImplementedError, "not cosine"),
    # symmetric="no" used to compute the symmetric loss silently on backend='reference'
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), symmetric="no", backend="reference"), TypeError,
     "symmetric must be True or False"),
    (lambda: fastcl.nn.InfoNCELoss(symmetric="yes")(torch.randn(4, 3), torch.randn(4, 3)), TypeError, "symmetric"),
    (lambda: fastcl.nn.ClipLoss(max_scale=-1), ValueError, "max_scale"),
    (lambda: fastcl.nn.ClipLoss(world_size=0), ValueError, "world_size"),
    (lambda: fastcl.nn.ClipLoss(rank=5, world_size=2), ValueError, "rank"),
    (lambda: fastcl.nn.GroupWhitening(-4, 2), ValueError, "number of features"),
    (lambda: fastcl.nn.GroupWhitening(8.0, 2), ValueError, "number of features"),
    (lambda: fastcl.nn.GroupWhitening(0, 1), ValueError, "number of features"),
    (lambda: fastcl.nn.GroupWhitening(8, 2, eps=None), TypeError, "eps"),
    (lambda: fastcl.nn.GroupWhitening(8, 2, detach_stats="no"), TypeError, "detach_stats"),
    (lambda: FCL.group_whiten(torch.randn(16, 8), 2, detach_stats="no"), TypeError, "detach_stats"),
    # eval mode used to return truncated integers (train mode refused them)
    (lambda: fastcl.nn.GroupWhitening(4, 2).eval()(torch.ones(8, 4, dtype=torch.long)), TypeError, "floating"),
    # the loss modules check their settings when built (they used to wait for the first forward)
    (lambda: fastcl.nn.InfoNCELoss(temperature=-1), ValueError, "temperature"),
    (lambda: fastcl.nn.InfoNCELoss(reduction="x"), ValueError, "reduction"),
    (lambda: fastcl.nn.InfoNCELoss(label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: fastcl.nn.InfoNCELoss(normalize="no"), TypeError, "normalize"),
    (lambda: fastcl.nn.NTXentLoss(temperature=0), ValueError, "temperature"),
    (lambda: fastcl.nn.SupConLoss(backend="x"), ValueError, "backend"),
    (lambda: fastcl.nn.DCLWLoss(sigma=-1), ValueError, "sigma"),
    (lambda: fastcl.nn.DCLLoss(weight_fn=3), TypeError, "weight_fn"),
    (lambda: fastcl.nn.MultipleNegativesRankingLoss(scale=0), ValueError, "scale"),
    (lambda: fastcl.nn.ClipLoss(backend="x"), ValueError, "backend"),
    # label_smoothing="0.1" passed float() on the torch and triton backends, not on the reference
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), label_smoothing="0.1"), TypeError,
     "label_smoothing"),
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), label_smoothing=torch.tensor(0.1)), TypeError,
     "label_smoothing"),
    # 1/temperature overflowing the scale's dtype gave a NaN loss
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), temperature=1e-39), ValueError, "too large"),
    # 1/t = 3.3e38 is finite, but the loss (m - pos up to 2/t) was inf
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), temperature=3e-39), ValueError, "too large"),
    # 1/t = 1.2e38: twice it finite, but not in the kernels' log2 units (their loss was inf)
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), temperature=8.4e-39), ValueError,
     r"at most 1.18e\+38: twice it, in the kernels' log2 units"),
    # nothing bounded a logit_scale: at 88 the Triton kernels' d logit_scale was NaN (0 * -inf)
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), logit_scale=torch.tensor(88.0)), ValueError,
     r"logit_scale must be at most 87.66 for torch.float32 inputs"),
    (lambda: FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), logit_scale=torch.tensor(float("nan"))), ValueError,
     r"logit_scale must be at most .* got nan"),
    # MNRL's scale in its own terms: its InfoNCE pass named a temperature the caller never gave
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), scale=1e39), ValueError,
     r"scale must be at most 1.18e\+38 for torch.float32 inputs, got 1e\+39"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), scale=1e-320), ValueError,
     "scale must be at least"),
    (lambda: FCL.multiple_negatives_ranking(torch.randn(4, 3), torch.randn(4, 3), scale=1e39,
                                            directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
     ValueError, "scale must be at most"),
    (lambda: fastcl.nn.MultipleNegativesRankingLoss(scale=1e-320), ValueError, "scale must be at least"),
    (lambda: fastcl.nn.MultipleNegativesRankingLoss(scale=1e308, hardness_mode="all_negatives",
                                                    hardness_strength=1e308), ValueError, "scale \\+ hardness_strength"),
    (lambda: FCL.info_nce(torch.randn(4, 3).double(), torch.randn(4, 3).double(), temperature=5e-324), ValueError,
     "too large"),
    # strings read as True: return_matrix="no" returned a tuple, detach_weight="no" detached
    (lambda: FCL.group_whiten(torch.randn(16, 8), 2, return_matrix="no"), TypeError, "return_matrix"),
    (lambda: FCL.dcl(torch.randn(4, 3), torch.randn(4, 3), weight="vmf", detach_weight="no"), TypeError,
     "detach_weight"),
    (lambda: fastcl.whitening.shuffled_group_whiten(torch.randn(16, 8), 2, return_matrix=True), TypeError,
     "return_matrix"),
    (lambda: fastcl.whitening.shuffled_group_whiten(torch.randn(16, 8), 2, perm=torch.arange(8)), TypeError,
     "perm= is group_whiten's"),
    (lambda: fastcl.whitening.shuffled_group_whiten(torch.randn(16, 8).numpy(), 2), TypeError, "torch.Tensor"),
    # errors that named no received shape or type, or only torch's own message
    (lambda: fastcl.nn.MultipleNegativesRankingLoss()(torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 4),
                                                      torch.randn(7, 4)), ValueError, r"\(8, 4\), \(7, 4\)"),
    (lambda: FCL.dcl(torch.randn(5, 3), torch.randn(5, 3), weight=torch.ones(6)), ValueError,
     r"shape \[5\], got \(6,\)"),
    (lambda: fastcl.nn.SupConLoss()(torch.randn(4)), ValueError, r"\[B, V, D\], got \(4,\)"),
    (lambda: fastcl.nn.SupConLoss()([torch.randn(4, 3)]), ValueError, "got list"),
    (lambda: fastcl.nn.InfoNCELoss(temperature=torch.tensor(0.1)), TypeError, "logit_scale"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("loss", ["info_nce", "nt_xent", "dcl", "supcon"])
def test_reference_refuses_a_string_normalize(loss):
    """normalize="no" read as True on backend='reference' (the others refused it)."""
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    call = {"info_nce": lambda **kw: FCL.info_nce(z1, z2, **kw), "nt_xent": lambda **kw: FCL.nt_xent(z1, z2, **kw),
            "dcl": lambda **kw: FCL.dcl(z1, z2, **kw),
            "supcon": lambda **kw: FCL.supcon(torch.stack([z1, z2], 1), **kw)}[loss]
    with pytest.raises(TypeError, match="normalize must be True or False"):
        call(normalize="no", backend="reference")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_numpy_bools_are_bools(backend):
    """np.True_ (a NumPy comparison's result, a config read with NumPy) and np.int64(0) were
    refused; each flag now takes them and gives what the Python bool gives."""
    np = pytest.importorskip("numpy")
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    x = torch.randn(16, 8)
    calls = [
        lambda f: FCL.info_nce(z1, z2, symmetric=f(True), normalize=f(False), backend=backend),
        lambda f: FCL.nt_xent(z1, z2, normalize=f(False), backend=backend),
        lambda f: FCL.dcl(z1, z2, weight="vmf", detach_weight=f(False), normalize=f(False), backend=backend),
        lambda f: FCL.supcon(torch.stack([z1, z2], 1), normalize=f(False), backend=backend),
        lambda f: FCL.group_whiten(x, 2, return_matrix=f(True), detach_stats=f(True),
                                   backend="torch" if backend == "torch" else "reference")[1],
    ]
    for call in calls:
        want = call(bool)
        for f in (np.bool_, lambda b: np.int64(int(b))):
            assert torch.equal(call(f), want)
    m = fastcl.nn.GroupWhitening(8, 2, detach_stats=np.False_, track_running_stats=np.True_)
    assert m.track_running_stats
    with pytest.raises(TypeError, match="symmetric"):
        FCL.info_nce(z1, z2, symmetric=np.array([True, False]))
    with pytest.raises(TypeError, match="symmetric"):
        FCL.info_nce(z1, z2, symmetric=np.int64(2))


def test_info_nce_module_takes_none_for_the_default_temperature():
    """As info_nce does; checking the settings at construction must not refuse it."""
    q, k = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(fastcl.nn.InfoNCELoss(temperature=None, backend="torch")(q, k),
                       FCL.info_nce(q, k, backend="torch"))


# --- equality with the libraries users have today (skipped where they are not installed) ---

def _has(module):
    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not _has("pytorch_metric_learning"), reason="pytorch-metric-learning not installed")
def test_equals_pytorch_metric_learning():
    from pytorch_metric_learning import losses as pml
    z1, z2 = _views(9, 6, torch.float64)
    emb = torch.cat([z1, z2])
    pairs = torch.arange(9).repeat(2)
    assert torch.allclose(pml.NTXentLoss(temperature=0.07)(emb, pairs),
                          FCL.nt_xent(z1, z2, temperature=0.07, backend="torch"), atol=1e-8)
    x, labels = _supcon_inputs(15, 6, torch.float64)
    assert torch.allclose(pml.SupConLoss(temperature=0.1)(x, labels),
                          FCL.supcon(x, labels, temperature=0.1, backend="torch"))


@pytest.mark.skipif(not _has("lightly"), reason="lightly not installed")
def test_equals_lightly():
    from lightly import loss as ll
    z1, z2 = _views(9, 6, torch.float64)
    assert torch.allclose(ll.NTXentLoss(temperature=0.5)(z1, z2), fastcl.nn.NTXentLoss()(z1, z2))
    assert torch.allclose(ll.DCLLoss(temperature=0.1)(z1, z2), fastcl.nn.DCLLoss()(z1, z2))
    assert torch.allclose(ll.DCLWLoss(temperature=0.1, sigma=0.5)(z1, z2), fastcl.nn.DCLWLoss()(z1, z2))


@pytest.mark.skipif(not _has("sentence_transformers"), reason="sentence-transformers not installed")
def test_equals_sentence_transformers_mnrl():
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # releases before the module move
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(7, 10, generator=g, dtype=torch.float64) for _ in range(3))
    st = MultipleNegativesRankingLoss(Embedder(), scale=20.0)
    expected = st([{"x": a}, {"x": p}, {"x": n}], None)
    assert torch.allclose(expected, fastcl.nn.MultipleNegativesRankingLoss(scale=20.0)(a, p, n))
    from fastcl.integrations import MultipleNegativesRankingLoss as FusedMNRL
    assert torch.allclose(expected, FusedMNRL(Embedder(), scale=20.0)([{"x": a}, {"x": p}, {"x": n}], None))


@pytest.mark.skipif(not _has("sentence_transformers"), reason="sentence-transformers not installed")
@pytest.mark.filterwarnings("ignore:The MultipleNegativesSymmetricRankingLoss is deprecated:DeprecationWarning")
def test_mnrl_variants_equal_sentence_transformers():
    """Every direction set, partition mode and hardness mode of sentence-transformers' own MNRL
    (and its symmetric loss), with 0, 1 and 2 hard-negative columns: the fused drop-in gives
    its loss and gradients."""
    try:
        from sentence_transformers.sentence_transformer import losses as st
    except ImportError:  # releases before the module move
        from sentence_transformers import losses as st
    import itertools

    a, p, n = _mnrl_inputs(7, 5, "hard", seed=2)
    columns = [a, p, *n.unbind(1)]
    cases = [(st.MultipleNegativesSymmetricRankingLoss, fastcl.integrations.MultipleNegativesSymmetricRankingLoss,
              dict(scale=7.0))]
    for k in range(1, 4):
        for dirs in itertools.combinations(ALL_DIRECTIONS[1:], k - 1):
            for mode, hardness in itertools.product(("joint", "per_direction"), (None,) + fastcl.losses.HARDNESS_MODES):
                if mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(dirs):
                    continue
                kw = dict(scale=7.0, directions=("query_to_doc",) + dirs, partition_mode=mode,
                          hardness_mode=hardness, hardness_strength=2.0 if hardness else 0.0)
                cases.append((st.MultipleNegativesRankingLoss, fastcl.integrations.MultipleNegativesRankingLoss, kw))
    for ncols in (2, 3, 4):
        for theirs, ours, kw in cases:
            results = []
            for cls in (theirs, ours):
                xs = [c.clone().requires_grad_() for c in columns[:ncols]]
                loss = cls(Embedder(), **kw)([{"x": x} for x in xs], None)
                results.append([loss] + list(torch.autograd.grad(loss, xs)))
            for x, y in zip(*results):
                assert torch.allclose(x, y, rtol=0, atol=1e-12), (ncols, kw, (x - y).abs().max())


def test_mnrl_drop_in_accepts_cosine_by_its_values():
    from fastcl.integrations import MultipleNegativesRankingLoss as FusedMNRL
    cos = lambda a, b: torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T  # noqa: E731
    FusedMNRL(None, similarity_fct=cos)
    if _has("sentence_transformers"):
        from sentence_transformers import util
        FusedMNRL(None, similarity_fct=util.cos_sim)


@pytest.mark.skipif(not all(_has(m) for m in ("sentence_transformers", "datasets", "accelerate")),
                    reason="sentence-transformers, datasets or accelerate not installed")
def test_mnrl_drop_in_trains_like_the_original_in_sentence_transformer_trainer(tmp_path, monkeypatch):
    """The fused loss inside SentenceTransformerTrainer: the same steps as sentence-transformers'
    own MultipleNegativesRankingLoss, from the same start (an offline model built here)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    try:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    except ImportError:  # releases before the module move
        from sentence_transformers.models import StaticEmbedding
    from tokenizers import Tokenizer, models, pre_tokenizers
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STMNRL
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss as STMNRL
    from fastcl.integrations import MultipleNegativesRankingLoss as FusedMNRL

    words = "the a cat dog sat ran on mat park fast slow red blue big small [UNK]".split()
    data = Dataset.from_dict({"anchor": ["the cat sat", "a dog ran", "red mat", "big park"] * 4,
                              "positive": ["cat sat on mat", "dog ran fast", "the red mat", "a big park"] * 4})
    weights = []
    for loss_cls in (STMNRL, FusedMNRL):
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        torch.manual_seed(0)
        model = SentenceTransformer(modules=[StaticEmbedding(tok, embedding_dim=16)], device="cpu")
        start = model[0].embedding.weight.detach().clone()
        # SGD: updates linear in the gradient. Adam turns rounding-level differences of gradients
        # that are zero in exact arithmetic (duplicated rows) into full +-lr steps.
        args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / loss_cls.__name__), max_steps=3,
                                                    per_device_train_batch_size=4, report_to="none",
                                                    save_strategy="no", learning_rate=0.5, optim="sgd",
                                                    use_cpu=True)
        SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss_cls(model)).train()
        weights.append(model[0].embedding.weight.detach().clone())
    assert not torch.allclose(weights[1], start)  # it trained
    assert torch.allclose(weights[0], weights[1], atol=1e-5), float((weights[0] - weights[1]).abs().max())


def test_module_reprs_show_their_settings():
    assert "sigma=0.25" in repr(fastcl.nn.DCLWLoss(temperature=0.2, sigma=0.25))
    assert "temperature=0.3" in repr(fastcl.nn.NTXentLoss(temperature=0.3))
    assert "temperature=0.3" in repr(fastcl.nn.SupConLoss(temperature=0.3))
    assert "scale=10" in repr(fastcl.nn.MultipleNegativesRankingLoss(scale=10))
    # the distributed flags came after backend: positional calls of before still work
    assert "backend='torch'" in repr(fastcl.nn.SupConLoss(0.3, "torch"))
    assert "backend='torch'" in repr(fastcl.nn.MultipleNegativesRankingLoss(10, "torch"))
    assert "reduction='sum'" in repr(fastcl.nn.InfoNCELoss(reduction="sum"))
    assert "label_smoothing=0.1" in repr(fastcl.nn.InfoNCELoss(label_smoothing=0.1))
    assert "max_scale=50" in repr(fastcl.nn.ClipLoss(max_scale=50))
    r = repr(fastcl.nn.GroupWhitening(8, 2, eps=1e-3, momentum=0.2, ddof=1, track_running_stats=False))
    assert all(s in r for s in ("eps=0.001", "momentum=0.2", "ddof=1", "track_running_stats=False")), r
