"""Tests for behaviours that mutation testing of the Python side (fastcl/*.py) found unchecked:
each of them failed on a small, plausible change to the library that the rest of the suite let
through."""
import math

import pytest
import torch

import fastcl.functional as FCL
from fastcl import reference as R
from fastcl import whitening as Wh
from conftest import DEVICE


@pytest.mark.parametrize("weight", [None, "vmf", "tensor"])
def test_dcl_16_bit_positive_logit_in_fp32(weight):
    """16-bit views are computed in fp32 (chunked.compute_dtype): the O(N*D) positive logit
    s <u_i, u_i'> too, not only the fused log-sum-exp. Formed in fp16 (pair_logit in the inputs'
    dtype), the DCL loss erred ~1e-5 to 1e-3 relative, instead of ~1e-7, on fp16-exact inputs
    that the loss takes as given (normalize=False)."""
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(16, 24, generator=g, dtype=torch.float64).half()
    z2 = (z1.double() + 0.3 * torch.randn(16, 24, generator=g, dtype=torch.float64)).half()
    w = {"vmf": "vmf", "tensor": (torch.rand(16, generator=g, dtype=torch.float64) + 0.5).half(), None: None}[weight]
    for negatives in ("joint", "split"):
        out = FCL.dcl(z1.to(DEVICE), z2.to(DEVICE), temperature=0.1, normalize=False, negatives=negatives,
                      weight=w.to(DEVICE) if isinstance(w, torch.Tensor) else w, backend="torch")
        w64 = R.vmf_weights(z1.double(), z2.double()) if weight == "vmf" else \
            (w.double() if isinstance(w, torch.Tensor) else None)
        want = R.dcl_reference(z1.double(), z2.double(), temperature=0.1, normalize=False, weight=w64,
                               negatives=negatives)
        assert out.dtype == torch.float32
        assert abs(float(out) - float(want)) <= 1e-6 * abs(float(want)), (negatives, float(out), float(want))


def test_backward_op_returns_contiguous_gradients_as_its_fake_says():
    """The backward op's fake returns contiguous du, dv; so must the real op for a transposed
    u or v (the torch backend's dU = empty_like(U) keeps U's strides): opcheck compares them.
    Without the .contiguous(), inductor's stride assert failed under torch.compile."""
    g = torch.Generator().manual_seed(0)
    ut = torch.randn(6, 5, generator=g).to(DEVICE).T
    vt = torch.randn(6, 5, generator=g).to(DEVICE).T
    s = torch.tensor(2.0, device=DEVICE)
    row, col, rs, cs = torch.ops.fastcl.info_nce_rows(ut, vt, s, None, True, None, None, False, False, "torch")
    ones = torch.ones(5, device=DEVICE)
    args = (ut, vt, s, None, rs, cs, ones, ones, True, None, None, False, False, "torch")
    du, dv, _ = torch.ops.fastcl.info_nce_rows_backward(*args)
    assert du.is_contiguous() and dv.is_contiguous()
    torch.library.opcheck(torch.ops.fastcl.info_nce_rows_backward, args)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_supcon_without_any_positive_is_zero_not_nan(backend):
    """The docstring's edge case: if no anchor has a positive (every class id distinct, one
    view) the mean is 0 with zero gradients, not 0 / 0."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
    out = FCL.supcon(x, torch.arange(5, device=DEVICE), temperature=0.1, backend=backend)
    out.backward()
    assert float(out.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zca_floors_the_eigenvalues_at_eps_at_large_feature_scales(dtype):
    """A rank-deficient group (N - 1 < g) at feature scale 1e6: eigh puts the zero eigenvalues
    of its covariance + eps I at eps +- ~1e-4 (rounding of lambda_max ~ 1e12), below eps and
    even negative. Floored at eps (their exact lower bound) W stays the reference's; floored at
    the dtype's tiny only, y came out ~1e145 (fp64) or inf (fp32)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 16, generator=g, dtype=torch.float64) * 1e6).to(dtype)
    y = FCL.group_whiten(x.to(DEVICE), 1, eps=1e-5, method="zca", backend="torch")
    want = Wh.whiten_reference(x.double(), 1, eps=1e-5, method="zca")
    assert torch.isfinite(y).all()
    assert float((y.double().cpu() - want).norm() / want.norm()) < 1e-5


def test_singular_check_tolerance_scales_with_the_group_size():
    """eps = 0 refuses a group whose lambda_min <= g * (the data's machine epsilon) * lambda_max
    (NumPy's matrix_rank tolerance), not just <= machine epsilon * lambda_max: here fp32 data
    with lambda_min / lambda_max = 5e-7, between 1.2e-7 and 16 * 1.2e-7."""
    N, gsize, ratio = 64, 16, 5e-7
    g = torch.Generator().manual_seed(0)
    z = torch.randn(N, gsize, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(z - z.mean(0))  # orthonormal, centred columns
    lam = torch.ones(gsize, dtype=torch.float64)
    lam[-1] = ratio
    x = (math.sqrt(N) * q * lam.sqrt()).float()
    xc = x.double() - x.double().mean(0)
    ev = torch.linalg.eigvalsh(xc.T @ xc / N)
    eps32 = torch.finfo(torch.float32).eps
    assert eps32 < float(ev[0] / ev[-1]) < gsize * eps32  # the construction is inside the band
    with pytest.raises(ValueError, match="singular"):
        FCL.group_whiten(x.to(DEVICE), 1, eps=0.0, method="zca", backend="torch")


def test_n_equal_to_group_size_is_refused_as_singular_up_front():
    """N centred samples span N - 1 dimensions: at N == g, eps = 0 is refused by the sample
    count itself (its message says how to fix it), before any eigendecomposition."""
    with pytest.raises(ValueError, match="centred samples span at most 3 < group size 4"):
        FCL.group_whiten(torch.randn(4, 8, device=DEVICE), 2, eps=0.0)


def test_clip_recipe_logs_the_temperature_the_loss_uses():
    """An optimiser step may push the CLIP recipe's logit scale past its cap; the loss clamps it
    in place before using it, and the logged temperature is that clamped one (1 / max_scale),
    not exp(-parameter)."""
    from fastcl import train as T
    clip = T.CLIP(torch.nn.Linear(6, 5), torch.nn.Linear(6, 5), init_temperature=0.1, max_scale=100.0)
    with torch.no_grad():
        clip.logit_scale.fill_(6.0)  # a step past log(100), before the next loss clamps it
    assert clip.temperature() == pytest.approx(0.01, rel=1e-6)


def test_an_unhashable_backend_is_a_clear_value_error():
    """check_name runs before the dispatcher looks the backend up in its dicts: a list, say,
    is told what the backends are (a bare 'unhashable type' TypeError otherwise)."""
    with pytest.raises(ValueError, match="backend must be one of"):
        FCL.info_nce(torch.randn(4, 3), torch.randn(4, 3), backend=["torch"])


def test_group_whitening_without_running_stats_whitens_with_the_batch_in_eval_too():
    """track_running_stats=False: batch statistics in eval mode as well (as BatchNorm), not the
    never-updated running buffers (zero mean, identity matrix: x came back unchanged)."""
    import fastcl.nn
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE) * 3 + 1
    m = fastcl.nn.GroupWhitening(8, 2, track_running_stats=False).to(DEVICE).eval()
    torch.testing.assert_close(m(x), FCL.group_whiten(x, 2), rtol=1e-5, atol=1e-5)
