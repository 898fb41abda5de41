"""torch.compile(fullgraph=True) on the paths that run a kernel backend.

The other compile tests use backend="torch" on the CPU. A kernel backend adds two things to
trace: the dispatch asks whether Triton imports and what the GPU is, and the whitening
kernel is launched from Python. Dynamo could trace neither: fullgraph=True failed for
backend="triton" anywhere, and for the default backend="auto" on every GPU. Here:
- the Triton backend (and on a GPU the default one) compiled with fullgraph, in the CPU
  interpreter where there is no GPU, value and gradients equal to eager;
- strict torch.export (Dynamo, as fullgraph) of the losses (functional and a module) and the
  whitening on fake CUDA tensors, the GPU's facts faked, so that the GPU dispatch is traced on a
  machine without a GPU. The traced graph must call the fastcl op with the backend that eager dispatch picks.
  Fake CUDA tensors need a CUDA build of torch (no GPU): CI runs these in scripts/build_cuda.sh,
  with the CUDA extension built, so backend="cuda" is traced there too.
"""
import pytest
import torch

import fastcl.functional as FCL
import fastcl.nn
from fastcl import _dispatch
from conftest import DEVICE, HAS_CUDA

# On the CPU the Triton backend runs in the interpreter (fp32: it refuses bf16). On a GPU, bf16
# and fp32, the CUDA extension's kernels, and the default backend, which picks by the measured
# figures (on sm_90: Triton for bf16, the extension for fp32 where it is built).
DTYPES = [torch.bfloat16, torch.float32] if HAS_CUDA else [torch.float32]
KERNEL_BACKENDS = ["triton", "cuda", "auto"] if HAS_CUDA else ["triton"]


def _losses(backend):
    """name -> f(a [B, D], b [B, D], logit_scale) -> loss, each on the fused op."""
    lab = lambda a: torch.arange(a.shape[0], device=a.device) % 3  # noqa: E731
    return {
        "info_nce": lambda a, b, ls: FCL.info_nce(a, b, logit_scale=ls, backend=backend),
        "clip": lambda a, b, ls: FCL.info_nce(a, b, logit_scale=ls, symmetric=True, backend=backend),
        "nt_xent": lambda a, b, ls: FCL.nt_xent(a, b, temperature=0.2, backend=backend),
        "dcl": lambda a, b, ls: FCL.dcl(a, b, temperature=0.2, weight="vmf", backend=backend),
        "supcon": lambda a, b, ls: FCL.supcon(torch.cat([a, b]), torch.cat([lab(a), lab(b)]), backend=backend),
        "mnrl": lambda a, b, ls: FCL.multiple_negatives_ranking(a, b, backend=backend),
        "mnrl_variant": lambda a, b, ls: FCL.multiple_negatives_ranking(
            a, b, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
            hardness_mode="all_negatives", hardness_strength=1.0, backend=backend),
        "module": lambda a, b, ls: fastcl.nn.InfoNCELoss(temperature=0.1, backend=backend)(a, b),
    }


def _skip_unless_usable(backend, dtype, device=DEVICE):
    reason = _dispatch.why_not(backend, torch.device(device), dtype) if backend != "auto" else None
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.skipif(_dispatch._import_error("triton") is not None, reason="needs triton")
def test_compiled_call_first_in_a_fresh_process():
    """The other tests here run after eager calls, which fill the dispatch's import cache:
    Dynamo then traces a dict lookup. The first call of a fresh process must trace the import check
    itself (assume_constant_result), with fullgraph, for backend="triton" and "auto"."""
    import os
    import subprocess
    import sys
    code = f"""if True:
        import torch, fastcl.functional as FCL
        q = torch.randn(6, 8, device="{DEVICE}", requires_grad=True)
        k = torch.randn(6, 8, device="{DEVICE}")
        for backend in ("triton", "auto"):
            f = torch.compile(lambda q, k: FCL.info_nce(q, k, backend=backend), fullgraph=True,
                              backend="eager")
            f(q, k).backward()
        print("compiled")
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         timeout=300)  # TRITON_INTERPRET (the CPU) is inherited from conftest
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


# The parameter is `backend` so that conftest skips backend="cuda" where it is not built.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(_losses("triton")))
def test_kernel_backend_compiles_fullgraph(name, backend, dtype):
    _skip_unless_usable(backend, dtype)
    f = _losses(backend)[name]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(21, 12, generator=g).to(DEVICE, dtype) for _ in range(2))
    results = []
    for run in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        ls = torch.tensor(2.5, device=DEVICE, requires_grad=True)
        loss = run(x, y, ls)
        loss.backward()
        results.append([loss.detach()] + [t.grad if t.grad is not None else torch.zeros(()) for t in (x, y, ls)])
    for eager, compiled in zip(*results):
        assert torch.isfinite(compiled).all()
        torch.testing.assert_close(compiled, eager)


def test_mnrl_compiles_with_dynamic_shapes_and_a_changing_strength():
    """A symbolic hardness strength (dynamic=True, or a module whose strength follows a
    schedule) traces: the option checks compare it with floats only, and warn outside the graph."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 8, generator=g), torch.randn(9, 8, generator=g)
    n = torch.randn(9, 2, 8, generator=g)
    f = lambda a, b, n, strength: FCL.multiple_negatives_ranking(  # noqa: E731
        a, b, n, directions=("query_to_doc", "doc_to_doc"), hardness_mode="all_negatives",
        hardness_strength=strength, backend="torch")
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    module = fastcl.nn.MultipleNegativesRankingLoss(backend="torch", hardness_mode="hard_negatives",
                                                    hardness_strength=1.0)
    compiled_module = torch.compile(module, backend="aot_eager", fullgraph=True)
    for strength in (1.0, 2.5, 0.5):
        torch.testing.assert_close(compiled(a, b, n, strength), f(a, b, n, strength))
        module.hardness_strength = strength
        torch.testing.assert_close(compiled_module(a, b, n), module(a, b, n))
    torch.testing.assert_close(compiled(a, b, n, 0.0), FCL.multiple_negatives_ranking(
        a, b, n, directions=("query_to_doc", "doc_to_doc"), backend="torch"))
    plain = torch.compile(lambda a, b: FCL.multiple_negatives_ranking(a, b, backend="torch"),
                          backend="aot_eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(plain(a, b), FCL.multiple_negatives_ranking(a, b, backend="torch"))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_whitening_compiles_fullgraph(backend):
    """The Newton-Schulz kernel runs inside its op (fastcl::newton_schulz_kernel): Dynamo traced
    into the kernel's launch before, which fullgraph refused."""
    _skip_unless_usable(backend, torch.float32)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    f = lambda x: FCL.group_whiten(x, 2, method="newton_schulz", backend=backend)  # noqa: E731
    m = fastcl.nn.GroupWhitening(16, 2, method="newton_schulz", backend=backend).to(DEVICE)
    compiled_m = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        want = f(x)
        torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x), want)
        torch.testing.assert_close(compiled_m(x), want)  # training mode: the batch's statistics
    torch.testing.assert_close(m.running_mean, 0.1 * x.mean(0))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_ops_pass_opcheck(backend):
    """torch.library.opcheck: schema, fake implementation (shapes and strides: the whitening
    op's fake kept a transposed input's strides, where the kernels return a contiguous W),
    autograd registration, and AOT dispatch, of the ops as torch.compile calls them."""
    _skip_unless_usable(backend, torch.float32)
    g = torch.Generator().manual_seed(2)
    u, v = (torch.randn(n, 6, generator=g).to(DEVICE).requires_grad_() for n in (5, 7))
    s = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    labels = torch.tensor([0, 6, 1, 0, 3], device=DEVICE)
    op = torch.ops.fastcl.info_nce_rows
    torch.library.opcheck(op, (u, v[:5], s, None, True, None, None, False, False, backend))
    torch.library.opcheck(op, (u, v, s, labels, False, None, None, False, True, backend))
    # A transposed u (its backward's fake kept those strides, the kernels write contiguous
    # gradients: inductor's assert failed) and a [1] scale (the Triton backward returned d scale
    # as [], which autograd refused even in eager).
    ut = torch.randn(6, 5, generator=g).to(DEVICE).T.requires_grad_()
    s1 = torch.tensor([2.0], device=DEVICE, requires_grad=True)
    torch.library.opcheck(op, (ut, v, s1, labels, False, None, None, False, True, backend))
    torch.library.opcheck(op, (ut, v[:5].T.contiguous().T, s1, None, True, None, None, False, False, backend))
    if backend != "torch":
        S = torch.randn(2, 8, 8, generator=g).to(DEVICE)
        S = (S @ S.transpose(1, 2) + 8 * torch.eye(8, device=DEVICE)).transpose(1, 2)  # not contiguous
        torch.library.opcheck(torch.ops.fastcl.newton_schulz_kernel, (S, 3, backend))


def _why_no_fake_cuda():
    """None where FakeTensorMode can compute with CUDA tensors without a GPU: a CUDA build of
    torch (scripts/build_cuda.sh runs these tests in one), recent enough (torch 2.4 asks the
    CUDA driver for a fake tensor's slice)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    try:
        with FakeTensorMode():
            (torch.empty(4, 4, device="cuda")[:2] + 1).sum()
    except Exception as e:
        return f"fake CUDA tensors do not work with this torch ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return None


_NO_FAKE_CUDA = _why_no_fake_cuda()
needs_fake_cuda = pytest.mark.skipif(_NO_FAKE_CUDA is not None, reason=str(_NO_FAKE_CUDA))


@pytest.fixture
def fake_h100(monkeypatch):
    """The dispatch's view of the machine: one sm_90 GPU with 227 KiB of shared memory. Only
    the dispatch's own availability check is faked (Dynamo asks torch.cuda.is_available() too,
    and would then look for the GPU); the device queries are torch's, run by Dynamo at trace
    time through the dispatch's constant-result functions. On a machine with a GPU, Dynamo asks
    the real one more than the fake props hold (has_triton reads `.major`): there the real
    GPU stands in, if it is an sm_90."""
    if torch.cuda.is_available():
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("these traces assume an sm_90's measured figures; this GPU is another")
        return
    props = type("Props", (), {"shared_memory_per_block_optin": 232448})()
    monkeypatch.setattr(_dispatch, "_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


def _fastcl_calls(ep):
    """[(op name, backend argument)] for every fastcl op the exported program calls."""
    calls = []
    for gm in ep.graph_module.modules():
        for node in getattr(gm, "graph", torch.fx.Graph()).nodes:
            name = str(node.target)
            if node.op == "call_function" and name.startswith("fastcl."):
                calls.append((name.split(".")[1], node.args[-1]))
    return calls


def _export_on_fake_cuda(f, dtype, *shapes):
    from torch._subclasses.fake_tensor import FakeTensorMode

    class M(torch.nn.Module):
        def forward(self, *xs):
            return f(*xs)

    with FakeTensorMode(allow_non_fake_inputs=True):
        xs = [torch.empty(s, device="cuda", dtype=dtype) for s in shapes]
        return torch.export.export(M(), tuple(xs), strict=True)


# gpu_backend, not backend: conftest would skip backend="cuda" for the CPU's sake.
@needs_fake_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("gpu_backend", ["auto", "triton", "cuda", "torch"])
def test_gpu_dispatch_traces_fullgraph(fake_h100, gpu_backend, dtype):
    """Dynamo traces the dispatch of the losses on a (fake) GPU, for each backend; the graph
    calls the op with the backend that eager dispatch picks, per the measured figures."""
    _skip_unless_usable(gpu_backend, dtype, "cuda")
    want = _dispatch.resolve(gpu_backend, torch.device("cuda"), dtype)
    if gpu_backend == "auto":  # sm_90's measured figures: Triton for 16-bit, cuda (or Triton) for fp32
        cuda_built = _dispatch.why_not("cuda", torch.device("cuda"), dtype) is None
        assert want == ("triton" if dtype == torch.bfloat16 else "cuda" if cuda_built else "triton")
    for name, f in _losses(gpu_backend).items():
        ep = _export_on_fake_cuda(lambda a, b, ls: f(a, b, ls), dtype, (24, 16), (24, 16), ())
        calls = _fastcl_calls(ep)
        assert calls and all(c == ("info_nce_rows", want) for c in calls), (name, calls)


@needs_fake_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("gpu_backend", ["auto", "triton", "cuda", "torch"])
def test_gpu_whitening_dispatch_traces_fullgraph(fake_h100, gpu_backend, dtype):
    """The kernels see fp32 statistics whatever x's dtype: bf16 x takes fp32's measured
    figures on sm_90 (the torch iteration, no op) and runs on either kernel."""
    _skip_unless_usable(gpu_backend, torch.float32, "cuda")
    f = lambda x: FCL.group_whiten(x, 4, method="newton_schulz", backend=gpu_backend)  # noqa: E731
    calls = _fastcl_calls(_export_on_fake_cuda(f, dtype, (48, 32)))
    want = [] if gpu_backend in ("auto", "torch") else [("newton_schulz_kernel", gpu_backend)]
    assert calls == want
