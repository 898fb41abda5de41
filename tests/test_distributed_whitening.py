"""Group whitening with the global batch's statistics across gloo ranks (CPU): every rank's
output rows and input gradients vs one process on the concatenated batch, uneven local batches
(an empty rank included); the shuffled views with rank 0's permutations; collective errors."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcl.functional as FCL
from helpers import error_messages
from fastcl.distributed import group_whiten_distributed, shuffled_group_whiten_distributed

SIZES = {1: [9], 2: [7, 4], 3: [5, 0, 6]}  # samples per rank
D, G = 8, 2

# name -> (kwargs, dtype); every method, ddof, perm, detach_stats, eps = 0, a kernel backend
CONFIGS = {
    "zca": (dict(method="zca"), torch.float64),
    "cholesky_ddof": (dict(method="cholesky", ddof=1), torch.float64),
    "ns_perm": (dict(method="newton_schulz", perm=True), torch.float64),
    "zca_detach_eps0": (dict(method="zca", detach_stats=True, eps=0.0), torch.float64),
    "zca_fp32": (dict(method="zca"), torch.float32),
    "ns_triton": (dict(method="newton_schulz", backend="triton", iters=8), torch.float32),
}


def _data(world, name):
    """(x [N, D] float64 with channels of unequal scale, upstream gradient [N, D], perm [D])."""
    g = torch.Generator().manual_seed(10 * world + len(name))
    n = sum(SIZES[world])
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, D, dtype=torch.float64)
    return x, torch.randn(n, D, generator=g, dtype=torch.float64), torch.randperm(D, generator=g)


def _run(name, x, gy, perm, fn):
    kw, dtype = CONFIGS[name]
    kw = dict(kw, perm=perm if kw.get("perm") else None)
    x = x.to(dtype).requires_grad_()
    y, W = fn(x, G, return_matrix=True, **kw)
    (y * gy.to(dtype)).sum().backward()
    return y.detach(), W, x.grad


def _worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    sizes = SIZES[world]
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    results = {}
    for name in CONFIGS:
        x, gy, perm = _data(world, name)
        results[name] = _run(name, x[sl], gy[sl], perm, group_whiten_distributed)
    # shuffled views: each rank's own generator, rank 0's permutations everywhere
    x, gy, _ = _data(world, "shuffled")
    xl = x[sl].clone().requires_grad_()
    views = shuffled_group_whiten_distributed(xl, G, 3, generator=torch.Generator().manual_seed(rank))
    (views * gy[sl]).sum().backward()
    results["shuffled"] = (views.detach(), xl.grad)
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()  # every rank is done talking
    os._exit(0)  # skip the process-group teardown (see tests/test_distributed_family.py)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_group_whiten_distributed_equals_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    sizes = SIZES[world]
    for name, (kw, dtype) in CONFIGS.items():
        x, gy, perm = _data(world, name)
        y, W, gx = _run(name, x, gy, perm, FCL.group_whiten)
        tol = 2e-5 if dtype == torch.float32 else 1e-11
        for r, (y_r, W_r, gx_r) in enumerate(per_rank[r][name] for r in range(world)):
            sl = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
            assert y_r.shape == y[sl].shape and gx_r.shape == gx[sl].shape, name
            # rtol=0: allclose's default would hide anything below 1e-5
            assert torch.allclose(W_r, W, rtol=0, atol=tol), (name, r, (W_r - W).abs().max())
            assert torch.allclose(y_r, y[sl], rtol=0, atol=tol), (name, r, (y_r - y[sl]).abs().max())
            assert torch.allclose(gx_r, gx[sl], rtol=0, atol=tol), (name, r, (gx_r - gx[sl]).abs().max())
    x, gy, _ = _data(world, "shuffled")
    x = x.clone().requires_grad_()
    views = FCL.shuffled_group_whiten(x, G, 3, generator=torch.Generator().manual_seed(0))  # rank 0's
    (views * gy).sum().backward()
    for r in range(world):
        sl = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
        v_r, gx_r = per_rank[r]["shuffled"]
        assert torch.allclose(v_r, views.detach()[:, sl], rtol=0, atol=1e-11), r
        assert torch.allclose(gx_r, x.grad[sl], rtol=0, atol=1e-11), r


def _errors_worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    x = torch.randn(6, D, dtype=torch.float64)
    other = torch.arange(D).flip(0)
    cases = [
        (group_whiten_distributed, (x, 4 if rank == 1 else 2), {}),                    # the ranks differ
        (group_whiten_distributed, (x, G), dict(perm=other if rank == 1 else torch.arange(D))),
        (group_whiten_distributed, (x, G), dict(eps=0.1 if rank == 1 else 1e-5)),
        (group_whiten_distributed, (x, 3), {}),                                         # bad on every rank
        (group_whiten_distributed, (x, G), dict(perm=torch.zeros(D, dtype=torch.long) if rank == 1 else None)),
        (group_whiten_distributed, (x, G), dict(backend="reference")),
        # eps = 0 with 2 samples over the ranks, groups of 4: singular, said on every rank
        (group_whiten_distributed, (x[:1], G), dict(eps=0.0)),
        (shuffled_group_whiten_distributed, (x, G, 2 if rank == 1 else 3), {}),
        (shuffled_group_whiten_distributed, (x, G), dict(perm=other)),
        # the default spelled out on one rank is the same argument
        (group_whiten_distributed, (x, G), dict(method="newton_schulz", iters=None if rank == 1 else 20)),
        # x requiring grad on one rank only: the other would skip the backward's all-reduces
        (group_whiten_distributed, (x.clone().requires_grad_(rank == 1), G), {}),
    ]
    out = error_messages(cases)
    torch.save(out, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)


def test_group_whiten_distributed_bad_input(tmp_path):
    mp.spawn(_errors_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = [("same num_groups", "same num_groups"), ("same perm", "same perm"), ("same eps", "same eps"),
                ("divisor", "divisor"), ("invalid inputs on rank(s) [1]", "permutation"),
                ("'reference' is not usable", "'reference' is not usable"), ("singular", "singular"),
                ("same k and D", "same k and D"), ("draws each view's perm", "draws each view's perm"),
                ("no error", "no error"), ("per rank: [False, True]", "per rank: [False, True]")]
    assert len(out[0]) == len(expected)
    for i, whats in enumerate(expected):
        for r in range(2):
            assert whats[r] in out[r][i], (i, r, out[r][i])


def test_group_whiten_distributed_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        group_whiten_distributed(torch.randn(4, 4), 2)
