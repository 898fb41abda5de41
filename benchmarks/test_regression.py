"""pytest-benchmark entry points for CPU-side regression tracking of the torch backend.

    pytest benchmarks/test_regression.py --benchmark-autosave      # record
    pytest benchmarks/test_regression.py --benchmark-compare       # compare with the last record
"""
import pytest
import torch

import fastcl.functional as FCL

pytest.importorskip("pytest_benchmark")

B, D = 512, 64


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, D, generator=g)
    return a.requires_grad_(), (a.detach() + 0.5 * torch.randn(B, D, generator=g)).requires_grad_()


CASES = {
    "clip": lambda a, b: FCL.info_nce(a, b, symmetric=True, backend="torch"),
    "nt_xent": lambda a, b: FCL.nt_xent(a, b, backend="torch"),
    "dcl": lambda a, b: FCL.dcl(a, b, weight="vmf", backend="torch"),
    "supcon": lambda a, b: FCL.supcon(a, torch.arange(B) % 37, backend="torch"),
    "group_whiten_zca": lambda a, b: FCL.group_whiten(a, 4, backend="torch").square().mean(),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_backend_fwd_bwd(benchmark, case):
    a, b = _inputs()

    def step():
        a.grad = b.grad = None
        CASES[case](a, b).backward()

    benchmark(step)
    assert a.grad is not None and torch.isfinite(a.grad).all()
