"""NT-Xent, DCL/DCLW and SupCon across gloo ranks (CPU): every rank's loss and gradients vs one
process on the concatenated batch, with uneven local batches. One spawn per world size runs
every configuration, to keep CI short."""
import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcl
import fastcl.functional as FCL
from fastcl import train as T
from fastcl.distributed import dcl_distributed, nt_xent_distributed, supcon_distributed

SIZES = {1: [5], 2: [5, 3], 3: [4, 1, 6]}  # pairs (samples for SupCon) per rank
D, V = 7, 2


def _per_row(a, b):
    """A DCL weight callable that depends on each pair alone: its local and global values agree."""
    return 1.5 + (a * b).sum(-1)


# name -> (loss, kwargs, grad_mode, dtype, backend)
CONFIGS = {
    "nt_xent": ("nt_xent", {}, "exact", torch.float64, "torch"),
    "nt_xent_sum_ddp": ("nt_xent", dict(reduction="sum"), "ddp", torch.float64, "torch"),
    "nt_xent_none": ("nt_xent", dict(reduction="none", temperature=0.2, normalize=False), "exact",
                     torch.float64, "torch"),
    "nt_xent_triton": ("nt_xent", dict(temperature=0.1), "exact", torch.float32, "triton"),
    "dcl": ("dcl", {}, "exact", torch.float64, "torch"),
    "dcl_split": ("dcl", dict(negatives="split"), "exact", torch.float64, "torch"),
    "dclw": ("dcl", dict(weight="vmf", sigma=0.3), "exact", torch.float64, "torch"),
    # the gradient through the global softmax of the weights
    "dclw_grad": ("dcl", dict(weight="vmf", detach_weight=False, reduction="none"), "exact",
                  torch.float64, "torch"),
    "dclw_ddp": ("dcl", dict(weight="vmf", negatives="split"), "ddp", torch.float64, "torch"),
    "dcl_callable": ("dcl", dict(weight=_per_row, detach_weight=False), "exact", torch.float64, "torch"),
    "dcl_tensor": ("dcl", dict(weight="tensor"), "exact", torch.float64, "torch"),
    "dcl_triton": ("dcl", dict(weight="vmf"), "exact", torch.float32, "triton"),
    "supcon": ("supcon", dict(labels=True), "exact", torch.float64, "torch"),
    "supcon_views": ("supcon", {}, "exact", torch.float64, "torch"),
    "supcon_none_ddp": ("supcon", dict(labels=True, reduction="none"), "ddp", torch.float64, "torch"),
    "supcon_triton": ("supcon", dict(labels=True), "exact", torch.float32, "triton"),
}


def _global_data(world, name):
    """(sizes, Z1, Z2 [N, D] float64, features [N, V, D], labels [N], weights [N])."""
    sizes = SIZES[world]
    n = sum(sizes)
    g = torch.Generator().manual_seed(10 * world + len(name))
    Z1 = torch.randn(n, D, generator=g, dtype=torch.float64)
    Z2 = Z1 + 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64)
    feats = torch.stack([Z1, Z2], dim=1)
    labels = torch.randint(0, 3, (n,), generator=g)
    weights = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    return sizes, Z1.float().double(), Z2.float().double(), feats.float().double(), labels, weights


def _kwargs(kw, weights):
    kw = dict(kw)
    kw.pop("labels", None)
    if kw.get("weight") == "tensor":
        kw["weight"] = weights
    return kw


def _run(loss, kw, inputs, labels, weights, backend, grad_mode=None):
    """(loss, input gradients) of one configuration; distributed when grad_mode is given."""
    kw = dict(_kwargs(kw, weights), backend=backend)
    if grad_mode is not None:
        kw["grad_mode"] = grad_mode
    if loss == "supcon":
        fn = supcon_distributed if grad_mode else FCL.supcon
        out = fn(inputs[0], labels, **kw)
    else:
        fn = {"nt_xent": (nt_xent_distributed, FCL.nt_xent), "dcl": (dcl_distributed, FCL.dcl)}[loss]
        out = fn[0 if grad_mode else 1](*inputs, **kw)
    (out.sum() if out.dim() else out).backward()
    return out.detach(), [x.grad for x in inputs]


def _worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, (loss, kw, mode, dtype, backend) in CONFIGS.items():
        sizes, Z1, Z2, feats, labels, weights = _global_data(world, name)
        sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        if loss == "supcon":
            inputs = [feats[sl].to(dtype).requires_grad_()]
        else:
            inputs = [Z1[sl].to(dtype).requires_grad_(), Z2[sl].to(dtype).requires_grad_()]
        results[name] = _run(loss, kw, inputs, labels[sl] if kw.get("labels") else None, weights[sl],
                             backend, mode)
    # lightly's signatures with gather_distributed=True: DDP's convention
    sizes, Z1, Z2, *_ = _global_data(world, "modules")
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    for name, module in (("NTXentLoss", fastcl.nn.NTXentLoss(0.3, gather_distributed=True)),
                         ("DCLWLoss", fastcl.nn.DCLWLoss(0.2, sigma=0.4, gather_distributed=True))):
        a, b = Z1[sl].clone().requires_grad_(), Z2[sl].clone().requires_grad_()
        out = module(a, b)
        out.backward()
        results[name] = (out.detach(), [a.grad, b.grad])
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()  # every rank is done talking
    # Results are on disk; skip the process-group teardown, whose C++ destructors race with
    # gloo threads at exit and now and then abort ("terminate called without an active exception").
    os._exit(0)


def _rows(sizes, r):
    """Rank r's rows of the single-process reduction="none" output: its anchors of view 1, then
    of view 2 (z1's, z2's; SupCon's features view by view)."""
    n, off, b = sum(sizes), sum(sizes[:r]), sizes[r]
    return torch.cat([torch.arange(off, off + b) + v * n for v in range(V)])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_family_distributed_equals_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, (loss, kw, mode, dtype, backend) in CONFIGS.items():
        sizes, Z1, Z2, feats, labels, weights = _global_data(world, name)
        inputs = ([feats.to(dtype).requires_grad_()] if loss == "supcon"
                  else [Z1.to(dtype).requires_grad_(), Z2.to(dtype).requires_grad_()])
        ref, ref_grads = _run(loss, kw, inputs, labels if kw.get("labels") else None, weights, backend)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        scale = world if mode == "ddp" else 1  # DDP averages: its ranks carry world x the gradient
        for r, res in enumerate(per_rank):
            out, grads = res[name]
            sl = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
            if ref.dim():  # reduction="none": this rank's anchors, scaled like their gradients
                expected = scale * ref[_rows(sizes, r)]
            else:  # the global value on every rank
                expected = ref
            # rtol=0: allclose's default rtol=1e-5 would hide anything below it
            assert torch.allclose(out, expected, rtol=0, atol=tol), (name, r, out, expected)
            for x, g in zip(grads, ref_grads):
                assert torch.allclose(x, scale * g[sl], rtol=0, atol=tol), (name, r, (x - scale * g[sl]).abs().max())
    # the modules: the global value, and gradients scaled for DDP's averaging
    sizes, Z1, Z2, *_ = _global_data(world, "modules")
    for name, module in (("NTXentLoss", fastcl.nn.NTXentLoss(0.3)), ("DCLWLoss", fastcl.nn.DCLWLoss(0.2, sigma=0.4))):
        a, b = Z1.clone().requires_grad_(), Z2.clone().requires_grad_()
        ref = module(a, b)
        ref.backward()
        for r, res in enumerate(per_rank):
            out, grads = res[name]
            sl = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
            assert torch.allclose(out, ref.detach(), rtol=0, atol=1e-12), (name, r)
            for x, g in zip(grads, (a.grad, b.grad)):
                assert torch.allclose(x, world * g[sl], rtol=0, atol=1e-12), (name, r)


def _errors_worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z = torch.randn(4, 3, dtype=torch.float64)
    bad_on_rank1 = [
        (nt_xent_distributed, (z, z[:3] if rank == 1 else z), {}),                       # views differ
        (nt_xent_distributed, (z, z), dict(temperature=-1.0 if rank == 1 else 0.5)),
        (nt_xent_distributed, (z[:0], z[:0]) if rank == 1 else (z, z), {}),              # one rank empty
        (nt_xent_distributed, (z, z), dict(grad_mode="sum")),
        (nt_xent_distributed, (z, z), dict(grad_mode="ddp" if rank == 1 else "exact")),  # ranks disagree
        (nt_xent_distributed, (z.float(), z.float()) if rank == 1 else (z, z), {}),       # dtypes disagree
        (dcl_distributed, (z, z), dict(weight=torch.ones(3 if rank == 1 else 4, dtype=z.dtype))),
        (dcl_distributed, (z, z), dict(negatives="both")),
        (dcl_distributed, (z, z), dict(weight="cosine")),
        (supcon_distributed, (torch.randn(4, 3, dtype=torch.float64),), {}),                # no labels, one view
        (supcon_distributed, (z, torch.arange(3 if rank == 1 else 4)), {}),
    ]
    errors = []
    for fn, args, kw in bad_on_rank1:
        try:
            fn(*args, **kw)
            errors.append("no error")
        except (ValueError, TypeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    # the trainer's WhitenedCSE recipe would whiten with each rank's statistics: refused
    try:
        T.WhitenedCSE(torch.nn.Linear(3, 4), num_groups=2).loss([torch.randn(6, 4)])
        errors.append("no error")
    except NotImplementedError as e:
        errors.append(str(e))
    # a loss over a single pair per rank is fine across ranks: the other ranks' views are its negatives
    one = dcl_distributed(z[rank: rank + 1], z[rank + 1: rank + 2] + 0.1)
    errors.append(bool(torch.isfinite(one)))
    torch.save(errors, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _worker


def test_family_distributed_bad_input(tmp_path):
    mp.spawn(_errors_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = ["same shape", "temperature", "empty batch", "grad_mode must be", "same grad_mode",
                "same dtype", "shape [", "negatives must be", "weight must be", "several views", "labels"]
    for i, what in enumerate(expected):
        # rank 1 names the problem; rank 0 (whose inputs were fine, unless every rank's were bad)
        # is told which rank's were not, instead of blocking in a collective
        assert what in out[1][i], (i, out[1][i])
        assert out[0][i] != "no error", (i, out[0][i])
    assert all("not distributed" in o[-2] for o in out), out
    assert out[0][-1] is True and out[1][-1] is True


def test_family_distributed_needs_a_process_group():
    z = torch.randn(4, 3)
    for fn, args in ((nt_xent_distributed, (z, z)), (dcl_distributed, (z, z)), (supcon_distributed, (z, None))):
        with pytest.raises(RuntimeError, match="initialised torch.distributed"):
            fn(*args)


def _lightly_worker(rank, world, init_file, out_prefix):
    from lightly import loss as ll
    from lightly.loss.dcl_loss import negative_mises_fisher_weights
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(5)
    Z1 = torch.randn(4 * world, D, generator=g, dtype=torch.float64)  # lightly gathers equal batches
    Z2 = Z1 + 0.5 * torch.randn(4 * world, D, generator=g, dtype=torch.float64)
    sl = slice(4 * rank, 4 * rank + 4)
    pairs = [
        ("NTXentLoss", ll.NTXentLoss(0.3, gather_distributed=True), fastcl.nn.NTXentLoss(0.3, gather_distributed=True)),
        ("DCLLoss", ll.DCLLoss(0.2, gather_distributed=True), fastcl.nn.DCLLoss(0.2, gather_distributed=True)),
        # lightly's DCLW weights come from the rank's own views: fastcl's DCLLoss calls a
        # weight_fn there too (its DCLWLoss takes the softmax over the global batch)
        ("DCLLoss_vmf", ll.DCLLoss(0.2, weight_fn=negative_mises_fisher_weights, gather_distributed=True),
         fastcl.nn.DCLLoss(0.2, weight_fn=negative_mises_fisher_weights, gather_distributed=True)),
    ]
    results = {}
    for name, theirs, ours in pairs:
        out = []
        for module in (theirs, ours):
            a, b = Z1[sl].clone().requires_grad_(), Z2[sl].clone().requires_grad_()
            loss = module(a, b)
            loss.backward()
            out.append((loss.detach(), a.grad, b.grad))
        results[name] = out
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _worker


@pytest.mark.skipif(importlib.util.find_spec("lightly") is None, reason="lightly not installed")
def test_gather_distributed_equals_lightly(tmp_path):
    """lightly's modules with gather_distributed=True, 2 gloo ranks: the same gradients on every
    rank (DDP's convention); lightly returns each rank's own mean, fastcl the global one."""
    world = 2
    mp.spawn(_lightly_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in per_rank[0]:
        mean_of_theirs = sum(res[name][0][0] for res in per_rank) / world
        for r, res in enumerate(per_rank):
            (l_theirs, *g_theirs), (l_ours, *g_ours) = res[name]
            assert torch.allclose(l_ours, mean_of_theirs, rtol=0, atol=1e-12), (name, r)
            for x, y in zip(g_ours, g_theirs):
                assert torch.allclose(x, y, rtol=0, atol=1e-12), (name, r, (x - y).abs().max())
