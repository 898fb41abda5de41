import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastcl
import fastcl.functional as FCL
from fastcl import _dispatch as Dp
from conftest import DEVICE, HAS_CUDA

q = torch.randn(4, 8)
k = torch.randn(4, 8)
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ((torch.randn(4), k), {}, ValueError, "2-D"),
    ((torch.randn(4, 2, 4), k), {}, ValueError, "2-D"),
    ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, "feature dimension 0"),
    ((q, k), {"label_smoothing": -0.1}, ValueError, "label_smoothing"),
    ((q, k), {"label_smoothing": True}, TypeError, "label_smoothing"),
    ((q, k), {"label_smoothing": False}, TypeError, "label_smoothing"),
    ((q, k), {"logit_scale": torch.tensor(2)}, ValueError, "floating tensor"),
    ((q, torch.randn(4, 9)), {}, ValueError, "same feature dimension"),
    ((q, k.double()), {}, TypeError, "same dtype"),
    ((q.long(), k.long()), {}, TypeError, "float16, bfloat16, float32 or float64"),
    ((q, k.to("meta")), {}, ValueError, "same device"),
    ((torch.randn(0, 8), torch.randn(0, 8)), {}, ValueError, "empty batch"),
    ((q, torch.randn(3, 8)), {}, ValueError, "fewer rows"),
    ((q, torch.randn(6, 8)), {"symmetric": True}, ValueError, "as many keys"),
    ((q, k), {"symmetric": True, "labels": torch.arange(4)}, ValueError, "labels are not supported"),
    ((q, k), {"labels": torch.tensor([0, 1, 2, 4])}, ValueError, r"\[0, 4\)"),
    ((q, k), {"labels": torch.tensor([0, 1, -1, 2])}, ValueError, r"\[0, 4\)"),
    ((q, k), {"labels": torch.tensor([0.0, 1, 2, 3])}, TypeError, "integer"),
    ((q, k), {"labels": torch.arange(3)}, ValueError, "shape"),
    ((q, k), {"labels": torch.arange(4)[:, None]}, ValueError, "shape"),
    ((q, k), {"labels": torch.arange(4, device="meta")}, ValueError, "must be on cpu"),
    ((q, k), {"logit_scale": torch.tensor(1.0, device="meta")}, ValueError, "must be on cpu"),
    ((q, k), {"reduction": "avg"}, ValueError, "reduction"),
    ((q, k), {"temperature": 0.0}, ValueError, "positive"),
    ((q, k), {"temperature": float("nan")}, ValueError, "positive"),
    ((q, k), {"temperature": 0.1, "logit_scale": torch.tensor(1.0)}, ValueError, "not both"),
    ((q, k), {"logit_scale": 2.0}, TypeError, "tensor"),
    ((q, k), {"logit_scale": torch.ones(2)}, ValueError, "one element"),
    ((q, k), {"temperature": "0.1"}, TypeError, "positive number"),
    ((q, k), {"temperature": True}, TypeError, "positive number"),
    ((q, k), {"backend": "magic"}, ValueError, "backend must be one of"),
    ((q, k), {"normalize": "no"}, TypeError, "normalize must be True or False"),
])
def test_bad_input_raises(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FCL.info_nce(*args, **kwargs)


def test_cuda_backend_says_why():
    # CPU tensors: either the extension is not built/loadable, or it is and needs CUDA tensors.
    from fastcl import cuda_backend
    built = importlib.util.find_spec("fastcl._C") is not None
    match = "CUDA C\\+\\+ kernels need CUDA" if built and cuda_backend.unavailable() is None else "fastcl._C"
    with pytest.raises(fastcl.BackendUnavailable, match=match):
        FCL.info_nce(q, k, backend="cuda")
    if not built:
        assert "fastcl._C" in cuda_backend.unavailable()


def test_triton_refuses_float64():
    with pytest.raises(fastcl.BackendUnavailable, match="float64"):
        FCL.info_nce(q.double(), k.double(), backend="triton")


@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter behaviour")
def test_triton_refuses_bf16_in_interpreter():
    with pytest.raises(fastcl.BackendUnavailable, match="bfloat16"):
        FCL.info_nce(q.bfloat16(), k.bfloat16(), backend="triton")
    # the raw op too (it returned values ~1e10)
    with pytest.raises(fastcl.BackendUnavailable, match="info_nce_rows: backend='triton': .*bfloat16"):
        torch.ops.fastcl.info_nce_rows(q.bfloat16(), k.bfloat16(), torch.tensor(10.0), None, False, None, None,
                                       False, False, "triton")


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors without a GPU")
def test_triton_on_cpu_without_interpreter():
    """The kernels' mode is fixed when they are imported (triton.jit reads TRITON_INTERPRET
    then): setting the variable afterwards must not make the dispatch call them usable."""
    code = """if True:
        import os, torch, fastcl, fastcl.functional as FCL
        q = torch.randn(4, 8)
        assert "CUDA device" in fastcl.available_backends("cpu")["triton"]  # imports the kernels
        os.environ["TRITON_INTERPRET"] = "1"
        assert "CUDA device" in fastcl.available_backends("cpu")["triton"]
        try:
            FCL.info_nce(q, q, backend="triton")
        except fastcl.BackendUnavailable as e:
            assert "before importing fastcl" in str(e), e
        else:
            raise AssertionError("triton ran compiled kernels on CPU tensors")
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=300)


def test_auto_on_a_gpu_takes_the_fastest_measured_figure(monkeypatch):
    """auto on a GPU reads MEASURED_MS by architecture (sm_90, not sm_9), op and precision
    (float16 and bfloat16 share the "16bit" figures): the fastest usable backend there, the
    next fastest when that one cannot run, and Triton, saying so, where nothing was measured."""
    dev = torch.device("cuda", 0)
    usable = lambda b: None  # noqa: E731
    for arch, ops in Dp.MEASURED_MS.items():
        cap = (int(arch[3:-1]), int(arch[-1]))
        monkeypatch.setattr(Dp, "capability", lambda device: cap)
        for op, precs in ops.items():
            for prec, figures in precs.items():
                best = min(figures, key=figures.get)
                rest = {b: ms for b, ms in figures.items() if b != best}
                for dtype in {"16bit": (torch.float16, torch.bfloat16), "fp32": (torch.float32,)}[prec]:
                    choice, why = Dp.auto_gpu_choice(dev, dtype, usable, op)
                    assert choice == best and f"measured on {arch} ({prec})" in why, (op, dtype, why)
                    choice, _ = Dp.auto_gpu_choice(dev, dtype, lambda b: "no" if b == best else None, op)
                    assert choice == min(rest, key=rest.get), (op, dtype)
    monkeypatch.setattr(Dp, "capability", lambda device: (12, 7))
    choice, why = Dp.auto_gpu_choice(dev, torch.bfloat16, usable)
    assert choice == "triton" and "no measured figures for sm_127" in why


def test_shared_memory_is_the_opt_in_limit(monkeypatch):
    """The kernels may use a block's opt-in shared memory (227 KB on an H100), not the 48 KB
    default that torch also reports."""
    import types
    props = types.SimpleNamespace(shared_memory_per_block=49152, shared_memory_per_block_optin=232448)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert Dp.shared_memory_per_block(torch.device("cuda", 0)) == 232448


def test_a_broken_import_is_a_reason_not_a_crash(monkeypatch):
    """A Triton install that raises something other than ImportError on import (a driver
    mismatch, say) makes the backend unusable with that error as the reason."""
    monkeypatch.setattr(Dp, "_IMPORT_ERRORS", {})

    def broken(name):
        raise RuntimeError("driver too old")
    monkeypatch.setattr(Dp.importlib, "import_module", broken)
    why = Dp.why_not("triton", torch.device("cpu"), torch.float32)
    assert why == "triton cannot be imported (RuntimeError: driver too old)"
    with pytest.raises(fastcl.BackendUnavailable, match="driver too old"):
        Dp.resolve("triton", torch.device("cpu"), torch.float32)


def test_available_backends_reports_reasons():
    av = fastcl.available_backends("cpu")
    assert av["torch"] is None and av["reference"] is None
    assert "fastcl._C" in av["cuda"] or "need CUDA tensors" in av["cuda"]


def test_float64_temperature_is_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    ref = fastcl.info_nce_reference(a, b, temperature=0.07)
    assert abs(float(FCL.info_nce(a, b, temperature=0.07, backend="torch") - ref)) < 1e-13


def test_reference_takes_numpy_temperatures_at_their_value():
    """1 / np.float16(0.07) stayed a float16 in the reference: 2e-4 off the torch backend."""
    np = pytest.importorskip("numpy")
    qd, kd = q.double(), k.double()
    t = np.float16(0.07)
    ref = FCL.info_nce(qd, kd, temperature=t, backend="reference")
    assert torch.allclose(ref, FCL.info_nce(qd, kd, temperature=t, backend="torch"), rtol=1e-12, atol=0)


def test_reference_accepts_int32_labels():
    lab = torch.tensor([1, 0, 3, 2], dtype=torch.int32)
    assert torch.allclose(FCL.info_nce(q, k, labels=lab, backend="reference"),
                          FCL.info_nce(q, k, labels=lab, backend="torch"))


def test_triton_refuses_shapes_beyond_int32_offsets():
    from fastcl.kernels.info_nce import check_int32_offsets
    with pytest.raises(ValueError, match="int32"):
        check_int32_offsets(torch.empty(2**20, 2**11, device="meta"))
    check_int32_offsets(torch.empty(2**19, 2**11, device="meta"))  # 2^30 elements: fine


def test_symmetric_term_refuses_exclusions():
    from fastcl.info_nce import row_terms
    with pytest.raises(ValueError, match="column"):
        row_terms(q, k, torch.tensor(1.0), "torch", symmetric=True, exclude_diag=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_raw_op_checks_what_the_kernels_would_misread(backend):
    """torch.ops.fastcl.info_nce_rows, called directly: a D mismatch made the Triton kernels
    read past v's rows (numbers here, out-of-bounds reads on a GPU)."""
    dev = DEVICE if backend == "triton" else "cpu"  # Triton's kernels take CUDA tensors on a GPU machine
    op, s = torch.ops.fastcl.info_nce_rows, torch.tensor(2.0, device=dev)
    u, v = torch.randn(5, 3, device=dev), torch.randn(7, 3, device=dev)
    with pytest.raises(ValueError, match="one D"):
        op(u, torch.randn(7, 2, device=dev), s, None, False, None, None, False, False, backend)
    with pytest.raises(ValueError, match="one dtype"):
        op(u, v.half(), s, None, False, None, None, False, False, backend)
    with pytest.raises(ValueError, match="int64"):
        op(u, v, s, torch.arange(5, dtype=torch.int32, device=dev), False, None, None, False, False, backend)
    with pytest.raises(ValueError, match="B == N"):
        op(u, v, s, None, True, None, None, False, False, backend)
    with pytest.raises(ValueError, match="one element"):
        op(u, v, torch.tensor([2.0, 3.0], device=dev), None, False, None, None, False, False, backend)
    with pytest.raises(ValueError, match="both row_cls and col_cls"):
        op(u, v, s, None, False, torch.zeros(5, dtype=torch.long, device=dev), None, False, False, backend)
    # Label smoothing's targets spread over every column: not with exclusions or class ids.
    def eps(e):
        return torch.tensor(e, dtype=torch.float64)
    for excl_diag, excl_pos in ((True, False), (False, True)):
        with pytest.raises(ValueError, match="label_smoothing .*only without exclusions"):
            op(u, v, s, None, False, None, None, excl_diag, excl_pos, backend, eps(0.1))
    cls5, cls7 = torch.zeros(5, dtype=torch.long, device=dev), torch.zeros(7, dtype=torch.long, device=dev)
    with pytest.raises(ValueError, match="label_smoothing .*only without exclusions or class ids"):
        op(u, v, s, None, False, cls5, cls7, False, False, backend, eps(0.1))
    for e in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"label_smoothing in \[0, 1\)"):
            op(u, v, s, None, False, None, None, False, False, backend, eps(e))
    with pytest.raises(ValueError, match="smoothing must be a 1-element float tensor on the CPU"):
        op(u, v, s, None, False, None, None, False, False, backend, torch.tensor([0.1, 0.2]))
    row, col, rs, cs = op(u, v, s, None, False, None, None, False, False, backend)
    with pytest.raises(ValueError, match="as the forward gave them"):
        torch.ops.fastcl.info_nce_rows_backward(u, v, s, None, rs[:, :4], cs, torch.ones(5, device=dev),
                                                torch.ones(0, device=dev), False, None, None, False, False,
                                                backend)


@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_outputs_match_the_real_ones(symmetric):
    """The op's fake (meta) outputs: the shapes and dtypes that a real 16-bit call returns
    (statistics in fp32, not the input's dtype), or torch.compile plans wrong buffers."""
    op = torch.ops.fastcl.info_nce_rows
    u, v = torch.randn(5, 3, dtype=torch.float16), torch.randn(5, 3, dtype=torch.float16)
    real = op(u, v, torch.tensor(2.0), None, symmetric, None, None, False, False, "torch")
    fake = op(u.to("meta"), v.to("meta"), torch.tensor(2.0, device="meta"), None, symmetric, None, None,
              False, False, "torch")
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    assert real[2].dtype == torch.float32


def test_inputs_reach_the_op_in_their_own_dtype():
    """Normalising must hand the kernels 16-bit rows for 16-bit inputs (computed in fp32, cast
    back): otherwise every 16-bit kernel test would quietly run the fp32 kernels. And a float64
    logit_scale must not lift fp32 inputs' loss to float64."""
    from fastcl.info_nce import prepare
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        u, s = prepare(torch.tensor(2.0), True, q.to(dtype))
        assert u.dtype == dtype and s.dtype == torch.float32
    seen = []
    real = torch.ops.fastcl.info_nce_rows.default

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is real:
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))
    with Spy():
        FCL.info_nce(q.half(), k.half(), backend="torch")
    assert seen == [torch.float16]
    ls = torch.tensor(2.0, dtype=torch.float64)
    for smoothing in (0.0, 0.1):
        assert FCL.info_nce(q, k, logit_scale=ls, label_smoothing=smoothing).dtype == torch.float32


def test_raw_whitening_op_checks_its_input():
    """torch.ops.fastcl.newton_schulz_kernel, called directly: what the kernels cannot take is
    refused by name (the group_whiten dispatch never passes it)."""
    op, S = torch.ops.fastcl.newton_schulz_kernel, torch.eye(4).repeat(2, 1, 1)
    for bad in (S[0], S.double(), S[:, :3], torch.eye(129)[None]):
        with pytest.raises(ValueError, match=r"float32 \[G, g, g\] with g <= 64"):
            op(bad, 3, "triton")
    with pytest.raises(ValueError, match="no kernel for backend 'torch'"):
        op(S, 3, "torch")


def test_meta_tensors_give_shapes_with_labels():
    # Meta tensors carry no values: the label range cannot be checked, the shapes still can.
    qm, km = q.to("meta"), torch.randn(6, 8, device="meta")
    out = FCL.info_nce(qm, km, labels=torch.arange(4, device="meta"), reduction="none", backend="torch")
    assert out.device.type == "meta" and out.shape == (4,)
    with pytest.raises(ValueError, match="shape"):
        FCL.info_nce(qm, km, labels=torch.arange(3, device="meta"), backend="torch")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_gpu_backends_say_why_without_cuda():
    why = fastcl.available_backends("cuda")
    assert "no CUDA" in why["torch"] and "no CUDA" in why["reference"]  # both were None ("usable")
    assert fastcl.available_backends("cpu")["torch"] is None
    assert why["triton"] is not None
    if importlib.util.find_spec("triton") is not None:  # else: triton's import error
        assert "no CUDA" in why["triton"]
    assert why["cuda"] is not None


def test_column_term_needs_the_diagonal_positive():
    """The symmetric (column) term pairs row i with column i; the kernels rely on it."""
    from fastcl.info_nce import row_terms
    s = torch.tensor(5.0)
    with pytest.raises(ValueError, match="without labels"):
        row_terms(q, k, s, "torch", labels=torch.arange(4).flip(0), symmetric=True)
    pytest.importorskip("triton")
    from fastcl.kernels import info_nce as K
    g = torch.ones(4)
    with pytest.raises(ValueError, match="positive of row i is column i"):
        K.lse_backward(q, k, s, torch.zeros(4, 4), torch.zeros(2, 4), g, g, torch.arange(4), True)


@pytest.mark.parametrize("loss", [
    lambda a, b, ls: FCL.info_nce(a, b, logit_scale=ls, symmetric=True, backend="torch"),
    lambda a, b, ls: FCL.nt_xent(a, b, temperature=0.2, backend="torch"),
    lambda a, b, ls: FCL.supcon(torch.stack([a, b], 1), torch.tensor([0, 1, 0, 1]), backend="torch"),
])
def test_forward_mode_ad_is_refused_not_zero(loss):
    """The custom op has no jvp rule; torch would run it as if no input had a tangent and
    return a zero tangent. Every way in (jvp, jacfwd, forward_ad, a tangent on the scale only)
    must raise instead."""
    import torch.autograd.forward_ad as fwAD
    a, b, ls = q.double(), k.double(), torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(lambda a: loss(a, b, ls), (a,), (torch.randn_like(a),))
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jacfwd(lambda b: loss(a, b, ls))(b)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        loss(fwAD.make_dual(a, torch.ones_like(a)), b, ls)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_says_so(backend):
    """A gradient taken with create_graph=True is differentiable; differentiating it again used
    to raise torch's "no autograd formula was registered ... register_autograd"."""
    dev = DEVICE if backend == "triton" else "cpu"
    qq, kk = q.to(dev).clone().requires_grad_(), k.to(dev).clone().requires_grad_()
    g, = torch.autograd.grad(FCL.info_nce(qq, kk, backend=backend), qq, create_graph=True)
    with pytest.raises(NotImplementedError, match="no double backward.*backend='reference'"):
        torch.autograd.grad(g.sum(), kk)


def test_forward_mode_ad_on_the_scale_alone_is_refused():
    import torch.autograd.forward_ad as fwAD
    ls = torch.tensor(2.0, dtype=torch.float64)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        FCL.info_nce(q.double(), k.double(), logit_scale=fwAD.make_dual(ls, torch.ones_like(ls)),
                     backend="torch")


def test_forward_mode_ad_through_the_reference():
    """The escape hatch the error names gives the directional derivative backward gives."""
    a, t = q.double().requires_grad_(), torch.randn_like(q.double())
    _, tangent = torch.func.jvp(lambda x: FCL.info_nce(x, k.double(), backend="reference"),
                                (a.detach(),), (t,))
    FCL.info_nce(a, k.double(), backend="torch").backward()
    torch.testing.assert_close(tangent, (a.grad * t).sum())


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "vmap_of_grad", "grad_of_vmap"])
def test_torch_func_reverse_mode_names_fastcl_and_the_way_out(transform):
    """torch.func's reverse mode cannot run a custom op's autograd; torch's own message named
    neither fastcl nor backend='reference'."""
    b = k.double()
    f = lambda a: FCL.info_nce(a, b, symmetric=True, backend="torch")  # noqa: E731
    run = {"grad": lambda: torch.func.grad(f)(q.double()),
           "vjp": lambda: torch.func.vjp(f, q.double()),
           "jacrev": lambda: torch.func.jacrev(f)(q.double()),
           "vmap_of_grad": lambda: torch.func.vmap(torch.func.grad(f))(q.double()[None]),
           "grad_of_vmap": lambda: torch.func.grad(lambda a: torch.func.vmap(f)(a[None]).sum())(q.double())}[transform]
    with pytest.raises(NotImplementedError, match="torch.func.grad, vjp or jacrev.*backend='reference'"):
        run()


def test_torch_func_through_the_reference_and_vmap_of_the_forward():
    """The escape hatch the errors name gives backward's gradient; vmap of the forward alone
    (torch's per-sample fallback) is not refused and gives each sample's loss."""
    a, b = q.double(), k.double()
    g = torch.func.grad(lambda x: FCL.info_nce(x, b, backend="reference"))(a)
    a_ = a.clone().requires_grad_()
    FCL.info_nce(a_, b, backend="torch").backward()
    torch.testing.assert_close(g, a_.grad)
    batch = torch.stack([a, a.flip(0)])
    got = torch.func.vmap(lambda x: FCL.info_nce(x, b, backend="torch"))(batch)
    torch.testing.assert_close(got, torch.stack([FCL.info_nce(x, b, backend="reference") for x in batch]))
    # Per-sample labels: their range check took .item() of a batched tensor (torch's vmap error)
    labels = torch.stack([torch.arange(q.shape[0]).flip(0), torch.arange(q.shape[0])])
    for backend in ("torch", "reference"):
        got = torch.func.vmap(lambda x, y: FCL.info_nce(x, b, labels=y, backend=backend))(batch, labels)
        torch.testing.assert_close(got, torch.stack([FCL.info_nce(x, b, labels=y, backend="reference")
                                                     for x, y in zip(batch, labels)]))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\) \(the rows of k\), got values in \[1, 4\]"):
            torch.func.vmap(lambda x, y: FCL.info_nce(x, b, labels=y, backend=backend))(batch, labels + 1)
    # A loss of tensors that the transform does not differentiate (a metric inside grad) runs,
    # where torch runs it: torch 2.4.1's functorch refused any custom op's autograd under grad.
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 13):
        return
    loss = FCL.info_nce(a, b, backend="torch")
    w = torch.tensor(3.0, dtype=torch.float64)
    torch.testing.assert_close(torch.func.grad(lambda w: w * FCL.info_nce(a, b, backend="torch"))(w), loss)
    val, aux = torch.func.grad(lambda x: ((x ** 2).sum(), FCL.info_nce(a, b, backend="torch")), has_aux=True)(w)
    torch.testing.assert_close(aux, loss)


@pytest.mark.parametrize("transform", ["grad", "jvp", "vmap"])
def test_torch_func_on_whitening_names_fastcl_and_the_way_out(transform):
    x = torch.randn(16, 8, dtype=torch.float64)
    f = lambda x: FCL.group_whiten(x, 2, backend="torch")  # noqa: E731
    run = {"grad": lambda: torch.func.grad(lambda x: f(x).pow(3).sum())(x),
           "jvp": lambda: torch.func.jvp(f, (x,), (torch.randn_like(x),)),
           "vmap": lambda: torch.func.vmap(f)(x[None])}[transform]
    with pytest.raises(NotImplementedError, match="group_whiten.*torch.func.*backend='reference'"):
        run()
    x_ = x.clone().requires_grad_()
    f(x_).pow(3).sum().backward()
    g = torch.func.grad(lambda x: FCL.group_whiten(x, 2, backend="reference").pow(3).sum())(x)
    torch.testing.assert_close(g, x_.grad)


SHAPE_ONLY_CASES = {
    "info_nce_labels": lambda: FCL.info_nce(torch.randn(4, 8), torch.randn(6, 8),
                                            labels=torch.tensor([0, 1, 2, 5]), reduction="none"),
    "clip": lambda: FCL.info_nce(torch.randn(4, 8), torch.randn(4, 8), symmetric=True,
                                 logit_scale=torch.tensor(2.0), label_smoothing=0.1),
    "supcon": lambda: FCL.supcon(torch.randn(4, 2, 8), torch.tensor([0, 1, 0, 1])),
    "dclw": lambda: FCL.dcl(torch.randn(4, 8), torch.randn(4, 8), weight="vmf"),
    "mnrl": lambda: FCL.multiple_negatives_ranking(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)),
    "mnrl_variant": lambda: FCL.multiple_negatives_ranking(
        torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8), reduction="none",
        directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="hard_negatives", hardness_strength=2.0),
    "mnrl_variant_reference": lambda: FCL.multiple_negatives_ranking(
        torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8), directions=("query_to_doc", "doc_to_doc"),
        hardness_mode="all_negatives", hardness_strength=2.0, backend="reference"),
    "whiten_eps0": lambda: FCL.group_whiten(torch.randn(32, 8), 2, eps=0.0),
    "whiten_ns": lambda: FCL.group_whiten(torch.randn(32, 8), 2, method="newton_schulz"),
    "shuffled": lambda: FCL.shuffled_group_whiten(torch.randn(32, 8), 2,
                                                  generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("mode", ["meta", "fake"])
@pytest.mark.parametrize("name", sorted(SHAPE_ONLY_CASES))
def test_shape_only_tensors_trace_every_op(name, mode):
    """Meta tensors and FakeTensorMode (what export and shape propagation use) have no values:
    the value checks (label range, permutation, singular covariance) are skipped, the output
    shapes still come out."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    torch.manual_seed(0)
    expected = SHAPE_ONLY_CASES[name]().shape
    with (torch.device("meta") if mode == "meta" else FakeTensorMode()):
        out = SHAPE_ONLY_CASES[name]()
    assert out.shape == expected


def test_source_checkout_exposes_only_kernels(tmp_path):
    """From a plain checkout on sys.path (no install), kernels/ is fastcl.kernels, and no other
    top-level folder or file becomes a fastcl submodule (`import fastcl.setup` ran setup.py)."""
    code = ("import fastcl, fastcl.kernels, pkgutil, os\n"
            "assert os.path.samefile(os.path.dirname(fastcl.kernels.__file__), os.path.join(%r, 'kernels'))\n"
            "names = {m.name for m in pkgutil.iter_modules(fastcl.__path__)}\n"
            "assert not names & {'setup', 'benchmarks', 'tests', 'kernels', 'fastcl'}, names\n"
            "from fastcl.kernels import info_nce\n"
            "try:\n    import fastcl.setup\nexcept ImportError:\n    print('ok')\n" % str(ROOT))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
