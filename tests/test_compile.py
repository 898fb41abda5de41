"""torch.compile(fullgraph=True) on the paths that run a kernel backend.

The other compile tests use backend="torch" on the CPU. A kernel backend adds two things to
trace: the dispatch asks whether Triton imports and what the GPU is, and the whitening
kernel is launched from Python. Dynamo could trace neither: fullgraph=True failed for
backend="triton" anywhere, and for the default backend="auto" on every GPU. Here:
- the Triton backend (and on a GPU the default one) compiled with fullgraph, in the CPU
  interpreter where there is no GPU, value and gradients equal to eager;
- strict torch.export (Dynamo, as fullgraph) of every entry point on fake CUDA tensors, the
  GPU's facts faked in fastcl._dispatch, so that the GPU dispatch is traced on a machine without
  a GPU. The traced graph must call the fastcl op with the backend that eager dispatch picks.
  Fake CUDA tensors need a CUDA build of torch (no GPU): CI runs these in scripts/build_cuda.sh,
  with the CUDA extension built, so backend="cuda" is traced there too.
"""
import pytest
import torch

import fastcl.functional as FCL
import fastcl.nn
from fastcl import _dispatch
from conftest import DEVICE, HAS_CUDA, why_not_here

# On the CPU the Triton backend runs in the interpreter (fp32: it refuses bf16); on a GPU, bf16
# and the default backend too, which picks by the measured figures.
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
KERNEL_BACKENDS = ["triton", "auto"] if HAS_CUDA else ["triton"]


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
        "module": lambda a, b, ls: fastcl.nn.InfoNCELoss(temperature=0.1, backend=backend)(a, b),
    }


def _skip_unless_usable(backend):
    reason = why_not_here(backend, DTYPE) if backend != "auto" else None
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("kernel_backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(_losses("triton")))
def test_kernel_backend_compiles_fullgraph(name, kernel_backend):
    _skip_unless_usable(kernel_backend)
    f = _losses(kernel_backend)[name]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(21, 12, generator=g).to(DEVICE, DTYPE) for _ in range(2))
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


@pytest.mark.parametrize("kernel_backend", KERNEL_BACKENDS)
def test_kernel_whitening_compiles_fullgraph(kernel_backend):
    """The Newton-Schulz kernel runs inside its op (fastcl::newton_schulz_matrix): Dynamo traced
    into the kernel's launch before, which fullgraph refused."""
    _skip_unless_usable(kernel_backend)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    f = lambda x: FCL.group_whiten(x, 2, method="newton_schulz", backend=kernel_backend)  # noqa: E731
    m = fastcl.nn.GroupWhitening(16, 2, method="newton_schulz", backend=kernel_backend).to(DEVICE)
    compiled_m = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        want = f(x)
        torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x), want)
        torch.testing.assert_close(compiled_m(x), want)  # training mode: the batch's statistics
    torch.testing.assert_close(m.running_mean, 0.1 * x.mean(0))


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
    time through the dispatch's constant-result functions."""
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


# (gpu_backend, not backend: conftest skips backend="cuda" where it cannot run on the CPU)
@needs_fake_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gpu_backend", ["auto", "triton", "cuda", "torch"])
def test_gpu_dispatch_traces_fullgraph(fake_h100, gpu_backend, dtype):
    """Dynamo traces the dispatch of every loss on a (fake) GPU, for each backend; the graph
    calls the op with the backend that eager dispatch picks, per the measured figures."""
    backend = gpu_backend
    reason = _dispatch.why_not(backend, torch.device("cuda"), dtype) if backend != "auto" else None
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    want = _dispatch.resolve(backend, torch.device("cuda"), dtype)
    if backend == "auto":  # sm_90's measured figures: Triton for 16-bit, cuda (or torch) for fp32
        assert want == ("triton" if dtype == torch.bfloat16 else
                        "torch" if _dispatch.why_not("cuda", torch.device("cuda"), dtype) else "cuda")
    for name, f in _losses(backend).items():
        ep = _export_on_fake_cuda(lambda a, b, ls: f(a, b, ls), dtype, (24, 16), (24, 16), ())
        calls = _fastcl_calls(ep)
        assert calls and all(c == ("info_nce_rows", want) for c in calls), (name, calls)


@needs_fake_cuda
@pytest.mark.parametrize("gpu_backend", ["auto", "triton", "cuda", "torch"])
def test_gpu_whitening_dispatch_traces_fullgraph(fake_h100, gpu_backend):
    backend = gpu_backend
    reason = _dispatch.why_not(backend, torch.device("cuda"), torch.float32) if backend != "auto" else None
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    f = lambda x: FCL.group_whiten(x, 4, method="newton_schulz", backend=backend)  # noqa: E731
    calls = _fastcl_calls(_export_on_fake_cuda(f, torch.float32, (48, 32)))
    # auto: the measured figures for sm_90 pick the torch iteration (no kernel, no op)
    want = [] if backend in ("auto", "torch") else [("newton_schulz_matrix", backend)]
    assert calls == want
