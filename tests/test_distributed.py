"""Distributed InfoNCE on gloo (CPU): every rank's loss and gradients vs one process on the
concatenated batch. One spawn per world size runs all configurations, to keep CI short."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcl
from fastcl.distributed import info_nce_distributed

# Uneven local batches: queries per rank, and keys per rank for the one-direction loss.
SIZES = {1: ([6], [8]), 2: ([5, 3], [6, 4]), 3: ([4, 1, 6], [2, 7, 3]), 4: ([3, 5, 2, 4], [4, 4, 6, 1])}
D = 7
CONFIGS = [
    # name, gather, symmetric, custom labels, learnable scale, grad_mode, backend
    ("gather", "all_gather", False, False, False, "exact", "torch"),
    ("gather_clip", "all_gather", True, False, True, "exact", "torch"),
    ("gather_labels", "all_gather", False, True, True, "exact", "torch"),
    ("ring", "ring", False, False, False, "exact", "torch"),
    ("ring_clip", "ring", True, False, True, "exact", "torch"),
    ("ring_labels", "ring", False, True, True, "exact", "torch"),
    ("ring_ddp", "ring", True, False, True, "ddp", "torch"),
    ("gather_ddp", "all_gather", False, True, True, "ddp", "torch"),
    ("ring_triton", "ring", True, False, True, "exact", "triton"),
    ("gather_triton", "all_gather", False, True, False, "exact", "triton"),
    ("ring_sum", "ring", True, False, True, "exact", "torch"),  # reduction="sum" (see REDUCTION)
]
REDUCTION = {"ring_sum": "sum"}


def _global_data(world, symmetric, custom_labels):
    bq, bk = SIZES[world]
    if symmetric:
        bk = bq
    g = torch.Generator().manual_seed(world)
    Q = torch.randn(sum(bq), D, generator=g, dtype=torch.float64)
    K = torch.randn(sum(bk), D, generator=g, dtype=torch.float64)
    K[: min(len(Q), len(K))] += Q[: min(len(Q), len(K))]
    labels = torch.randint(0, sum(bk), (sum(bq),), generator=g) if custom_labels else None
    return bq, bk, Q, K, labels


def _worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, gather, sym, custom, learn, mode, backend in CONFIGS:
        bq, bk, Q, K, labels = _global_data(world, sym, custom)
        dtype = torch.float32 if backend == "triton" else torch.float64
        oq, ok = sum(bq[:rank]), sum(bk[:rank])
        q = Q[oq: oq + bq[rank]].to(dtype).requires_grad_()
        k = K[ok: ok + bk[rank]].to(dtype).requires_grad_()
        ls = torch.tensor(2.0, dtype=dtype, requires_grad=True)
        loss = info_nce_distributed(
            q, k, temperature=None if learn else 0.2, logit_scale=ls if learn else None,
            labels=None if labels is None else labels[oq: oq + bq[rank]], symmetric=sym,
            gather=gather, grad_mode=mode, backend=backend, reduction=REDUCTION.get(name, "mean"))
        loss.backward()
        results[name] = dict(loss=loss.detach(), dq=q.grad, dk=k.grad, dls=ls.grad)
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()  # every rank is done talking

    # Results are on disk; skip the process-group teardown, whose C++ destructors race with

    # gloo threads at exit and now and then abort ("terminate called without an active exception").

    os._exit(0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_equals_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, gather, sym, custom, learn, mode, backend in CONFIGS:
        bq, bk, Q, K, labels = _global_data(world, sym, custom)
        q, k = Q.clone().requires_grad_(), K.clone().requires_grad_()
        ls = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        ref = fastcl.info_nce_reference(q, k, temperature=None if learn else 0.2,
                                        logit_scale=ls if learn else None, labels=labels, symmetric=sym,
                                        reduction=REDUCTION.get(name, "mean"))
        ref.backward()
        tol = 1e-5 if backend == "triton" else 1e-10
        scale = world if mode == "ddp" else 1  # DDP averages: its ranks carry world x the gradient
        dls_sum = 0.0
        for r, res in enumerate(per_rank):
            out = res[name]
            oq, ok = sum(bq[:r]), sum(bk[:r])
            assert torch.allclose(out["loss"].double(), ref.detach(), atol=tol), (name, r)
            assert torch.allclose(out["dq"].double(), scale * q.grad[oq: oq + bq[r]], atol=tol), (name, r, "dq")
            assert torch.allclose(out["dk"].double(), scale * k.grad[ok: ok + bk[r]], atol=tol), (name, r, "dk")
            if learn:
                dls_sum += float(out["dls"])
                if mode == "exact":  # all-reduced once: every rank holds the full gradient
                    assert abs(float(out["dls"]) - float(ls.grad)) < tol * 10, (name, r, "dls")
        if learn and mode == "ddp":  # DDP's average of the per-rank gradients is the full one
            assert abs(dls_sum / world - float(ls.grad)) < tol * 10, (name, "dls")


def _errors_worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    errors = []
    bad_on_rank1 = [
        (dict(symmetric=True), 4, 3 + rank, None),                                   # sizes differ
        (dict(gather="tree"), 4, 4, None),
        (dict(grad_mode="sum"), 4, 4, None),
        ({}, 4, 4, torch.tensor([0, 1, 2, 99]) if rank == 1 else torch.arange(4)),  # one rank's labels
        ({}, 0 if rank == 1 else 4, 4, None),                                       # one rank's empty batch
        ({}, 4, 4, torch.tensor([0, 1, 2, 8]) if rank == 1 else torch.arange(4)),   # label == N
        ({}, 4, 4, torch.tensor([0, 1, 2, -1]) if rank == 1 else torch.arange(4)),  # negative label
        ({}, 5, 4, None),                                                           # N < B, no labels
    ]
    for kwargs, n_q, n_k, labels in bad_on_rank1:
        try:
            info_nce_distributed(torch.randn(n_q, 3), torch.randn(n_k, 3), labels=labels, **kwargs)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    # reduction="none" carries the same DDP scaling as the reductions
    q, k = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    per_exact = info_nce_distributed(q, k, reduction="none")
    per_ddp = info_nce_distributed(q, k, reduction="none", grad_mode="ddp")
    errors.append(bool(torch.allclose(per_ddp, world * per_exact)))
    # reduction="none" against one process on the global batch, values and gradients
    g = torch.Generator().manual_seed(0)
    Q, K = torch.randn(4 * world, 3, generator=g, dtype=torch.float64), torch.randn(4 * world, 3, generator=g,
                                                                                    dtype=torch.float64)
    Q.requires_grad_(), K.requires_grad_()
    ref = fastcl.info_nce_reference(Q, K, temperature=0.2, reduction="none")
    ref.sum().backward()
    rows = slice(4 * rank, 4 * rank + 4)
    q, k = Q.detach()[rows].clone().requires_grad_(), K.detach()[rows].clone().requires_grad_()
    per = info_nce_distributed(q, k, temperature=0.2, reduction="none")
    per.sum().backward()
    errors.append(bool(torch.allclose(per, ref[rows]) and torch.allclose(q.grad, Q.grad[rows])
                       and torch.allclose(k.grad, K.grad[rows])))
    torch.save(errors, f"{out_prefix}{rank}.pt")
    dist.barrier()  # every rank is done talking

    # Results are on disk; skip the process-group teardown, whose C++ destructors race with

    # gloo threads at exit and now and then abort ("terminate called without an active exception").

    os._exit(0)


def test_distributed_bad_input(tmp_path):
    with pytest.raises(RuntimeError, match="process group"):
        info_nce_distributed(torch.randn(4, 3), torch.randn(4, 3))
    mp.spawn(_errors_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    for rank in range(2):  # every rank raises, including the one whose own inputs were fine
        errors = torch.load(tmp_path / f"rank{rank}.pt")
        assert "as many keys" in errors[0] and "gather" in errors[1] and "grad_mode" in errors[2]
        assert "[0, 8)" in errors[3]
        assert ("empty batch" if rank == 1 else "rank(s) [1]") in errors[4]
        assert "[0, 8)" in errors[5] and "[0, 8)" in errors[6] and "fewer keys" in errors[7]
        assert errors[8] is True and errors[9] is True


if os.name != "posix":  # pragma: no cover - gloo over file:// init is tested on Linux
    pytestmark = pytest.mark.skip("distributed tests run on POSIX")
