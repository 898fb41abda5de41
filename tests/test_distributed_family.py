"""NT-Xent, DCL/DCLW, SupCon and MNRL across gloo ranks (CPU): every rank's loss and gradients vs one
process on the concatenated batch, with uneven local batches. One spawn per world size runs
every configuration, to keep CI short."""
import datetime
import importlib.util
import inspect
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcl
import fastcl.functional as FCL
from helpers import Embedder, counted_collectives, error_messages
from fastcl.distributed import (dcl_distributed, info_nce_distributed, multiple_negatives_ranking_distributed,
                                nt_xent_distributed, supcon_distributed)

SIZES = {1: [5], 2: [5, 3], 3: [4, 1, 6]}  # pairs (samples for SupCon) per rank
POOL = {1: [3], 2: [2, 0], 3: [1, 4, 0]}  # MNRL's shared negatives per rank (0: None there)
D, V, M = 7, 2, 2  # M: MNRL's hard negatives per anchor
ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


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
    "mnrl": ("mnrl", {}, "exact", torch.float64, "torch"),
    "mnrl_hard_none_ddp": ("mnrl", dict(negatives="hard", reduction="none", scale=5.0), "ddp",
                           torch.float64, "torch"),
    "mnrl_pool_sum": ("mnrl", dict(negatives="pool", reduction="sum"), "exact", torch.float64, "torch"),
    "mnrl_triton": ("mnrl", dict(negatives="hard"), "exact", torch.float32, "triton"),
    # the variants (sentence-transformers' directions, partition_mode, hardness): every rank's
    # queries gathered too, the diagonals left out of the blocks kept at the rank's own rows
    "mnrl_all_directions": ("mnrl", dict(directions=ALL_DIRECTIONS), "exact", torch.float64, "torch"),
    "mnrl_hard_variant": ("mnrl", dict(negatives="hard", directions=("query_to_doc", "query_to_query", "doc_to_doc"),
                                       hardness_mode="in_batch_negatives", hardness_strength=2.0),
                          "exact", torch.float64, "torch"),
    "mnrl_hard_own_penalty_sum": ("mnrl", dict(negatives="hard", directions=ALL_DIRECTIONS,
                                               hardness_mode="hard_negatives", hardness_strength=1.5,
                                               reduction="sum"), "exact", torch.float64, "torch"),
    "mnrl_pool_symmetric_ddp": ("mnrl", dict(negatives="pool", directions=("query_to_doc", "doc_to_query"),
                                             partition_mode="per_direction", hardness_mode="all_negatives",
                                             hardness_strength=1.0, reduction="none", scale=5.0),
                                "ddp", torch.float64, "torch"),
    "mnrl_variant_triton": ("mnrl", dict(negatives="pool", directions=("query_to_doc", "doc_to_doc"),
                                         hardness_mode="in_batch_negatives", hardness_strength=3.0),
                            "exact", torch.float32, "triton"),
}


def _global_data(world, name):
    """(sizes, Z1, Z2 [N, D] float64, features [N, V, D], labels [N], weights [N], hard
    negatives [N, M, D], pool [sum(POOL), D])."""
    sizes = SIZES[world]
    n = sum(sizes)
    g = torch.Generator().manual_seed(10 * world + len(name))
    Z1 = torch.randn(n, D, generator=g, dtype=torch.float64)
    Z2 = Z1 + 0.5 * torch.randn(n, D, generator=g, dtype=torch.float64)
    feats = torch.stack([Z1, Z2], dim=1)
    labels = torch.randint(0, 3, (n,), generator=g)
    weights = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    hard = torch.randn(n, M, D, generator=g, dtype=torch.float64).float().double()
    pool = torch.randn(sum(POOL[world]), D, generator=g, dtype=torch.float64).float().double()
    return sizes, Z1.float().double(), Z2.float().double(), feats.float().double(), labels, weights, hard, pool


def _negatives(kind, world, rank, hard, pool, dtype):
    """This rank's MNRL negatives (rank None: all of them, for one process)."""
    if kind == "hard":
        sl = slice(sum(SIZES[world][:rank]), sum(SIZES[world][: rank + 1])) if rank is not None else slice(None)
        return hard[sl].to(dtype)
    if kind == "pool":
        p = POOL[world]
        if rank is None:
            return pool.to(dtype)
        return pool[sum(p[:rank]): sum(p[: rank + 1])].to(dtype) if p[rank] else None
    return None


def _kwargs(kw, weights):
    kw = dict(kw)
    kw.pop("labels", None)
    if kw.get("weight") == "tensor":
        kw["weight"] = weights
    return kw


def _run(loss, kw, inputs, labels, weights, backend, grad_mode=None):
    """(loss, input gradients) of one configuration; distributed when grad_mode is given.
    MNRL's inputs: anchor, positive and, if any, its negatives."""
    kw = dict(_kwargs(kw, weights), backend=backend)
    if grad_mode is not None:
        kw["grad_mode"] = grad_mode
    if loss == "supcon":
        fn = supcon_distributed if grad_mode else FCL.supcon
        out = fn(inputs[0], labels, **kw)
    elif loss == "mnrl":
        kw.pop("negatives", None)
        fn = multiple_negatives_ranking_distributed if grad_mode else FCL.multiple_negatives_ranking
        out = fn(*inputs, **kw)
    else:
        fn = {"nt_xent": (nt_xent_distributed, FCL.nt_xent), "dcl": (dcl_distributed, FCL.dcl)}[loss]
        out = fn[0 if grad_mode else 1](*inputs, **kw)
    (out.sum() if out.dim() else out).backward()
    return out.detach(), [x.grad for x in inputs]


def _inputs(name, world, rank):
    """A configuration's leaf tensors: rank's (rank None: the whole batch, for one process)."""
    loss, kw, _, dtype, _ = CONFIGS[name]
    sizes, Z1, Z2, feats, labels, weights, hard, pool = _global_data(world, name)
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1])) if rank is not None else slice(None)
    if loss == "supcon":
        return [feats[sl].to(dtype).requires_grad_()]
    out = [Z1[sl].to(dtype).requires_grad_(), Z2[sl].to(dtype).requires_grad_()]
    if loss == "mnrl":
        neg = _negatives(kw.get("negatives"), world, rank, hard, pool, dtype)
        if neg is not None:
            out.append(neg.requires_grad_())
    return out


def _modules(gather):
    """(name, module, inputs kind) of the modules with a distributed flag."""
    return (("NTXentLoss", fastcl.nn.NTXentLoss(0.3, gather_distributed=gather), "pairs"),
            ("DCLWLoss", fastcl.nn.DCLWLoss(0.2, sigma=0.4, gather_distributed=gather), "pairs"),
            ("SupConLoss", fastcl.nn.SupConLoss(0.2, gather_distributed=gather), "supcon"),
            ("MultipleNegativesRankingLoss",
             fastcl.nn.MultipleNegativesRankingLoss(7.0, gather_across_devices=gather), "mnrl"),
            ("MultipleNegativesRankingLoss_variant",
             fastcl.nn.MultipleNegativesRankingLoss(7.0, gather_across_devices=gather, directions=ALL_DIRECTIONS,
                                                    hardness_mode="all_negatives", hardness_strength=1.0), "mnrl"))


def _module_run(module, kind, world, rank):
    sizes, Z1, Z2, feats, labels, weights, hard, pool = _global_data(world, "modules")
    sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1])) if rank is not None else slice(None)
    if kind == "supcon":
        x = [feats[sl].clone().requires_grad_()]
        out = module(x[0], labels[sl])
    else:
        x = [Z1[sl].clone().requires_grad_(), Z2[sl].clone().requires_grad_()]
        if kind == "mnrl":  # forward(anchor, positive, *negatives): two [b, D] hard negatives
            x += [h.clone().requires_grad_() for h in hard[sl].unbind(1)]
        out = module(*x)
    out.backward()
    return out.detach(), [t.grad for t in x]


def _worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, (loss, kw, mode, dtype, backend) in CONFIGS.items():
        sizes, *_, labels, weights, _, _ = _global_data(world, name)
        sl = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        results[name] = _run(loss, kw, _inputs(name, world, rank),
                             labels[sl] if kw.get("labels") else None, weights[sl], backend, mode)
    # the modules' distributed flags (lightly's gather_distributed, sentence-transformers'
    # gather_across_devices): DDP's convention
    for name, module, kind in _modules(True):
        results[name] = _module_run(module, kind, world, rank)
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()  # every rank is done talking
    # Results are on disk; skip the process-group teardown, whose C++ destructors race with
    # gloo threads at exit and now and then abort ("terminate called without an active exception").
    os._exit(0)


def _rows(loss, sizes, r):
    """Rank r's rows of the single-process reduction="none" output: its anchors of view 1, then
    of view 2 (z1's, z2's; SupCon's features view by view); MNRL's anchors."""
    n, off, b = sum(sizes), sum(sizes[:r]), sizes[r]
    return torch.cat([torch.arange(off, off + b) + v * n for v in range(1 if loss == "mnrl" else V)])


def _grad_rows(name, world, r, i):
    """Rank r's rows of one process's gradient of input i (a pool's own rows; None: no input)."""
    sizes = SIZES[world]
    if i == 2 and CONFIGS.get(name, ("",))[0] == "mnrl" and CONFIGS[name][1].get("negatives") == "pool":
        p = POOL[world]
        return slice(sum(p[:r]), sum(p[: r + 1])) if p[r] else None
    return slice(sum(sizes[:r]), sum(sizes[: r + 1]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_family_distributed_equals_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, (loss, kw, mode, dtype, backend) in CONFIGS.items():
        sizes, *_, labels, weights, _, _ = _global_data(world, name)
        ref, ref_grads = _run(loss, kw, _inputs(name, world, None), labels if kw.get("labels") else None,
                              weights, backend)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        scale = world if mode == "ddp" else 1  # DDP averages: its ranks carry world x the gradient
        for r, res in enumerate(per_rank):
            out, grads = res[name]
            if ref.dim():  # reduction="none": this rank's anchors, scaled like their gradients
                expected = scale * ref[_rows(loss, sizes, r)]
            else:  # the global value on every rank
                expected = ref
            # rtol=0: allclose's default rtol=1e-5 would hide anything below it
            assert torch.allclose(out, expected, rtol=0, atol=tol), (name, r, out, expected)
            rows = [_grad_rows(name, world, r, i) for i in range(len(ref_grads))]
            assert len(grads) == sum(x is not None for x in rows), (name, r)
            for x, g in zip(grads, [g[sl] for g, sl in zip(ref_grads, rows) if sl is not None]):
                assert torch.allclose(x, scale * g, rtol=0, atol=tol), (name, r, (x - scale * g).abs().max())
    # the modules: the global value, and gradients scaled for DDP's averaging
    for name, module, kind in _modules(False):
        ref, ref_grads = _module_run(module, kind, world, None)
        for r, res in enumerate(per_rank):
            out, grads = res[name]
            sl = _grad_rows(name, world, r, 0)
            assert torch.allclose(out, ref, rtol=0, atol=1e-12), (name, r)
            assert len(grads) == len(ref_grads)
            for x, g in zip(grads, ref_grads):
                assert torch.allclose(x, world * g[sl], rtol=0, atol=1e-12), (name, r)


def _raises_on_rank1(rank):
    def weight(a, b):  # e.g. a weight fn written for a fixed batch, on an uneven last batch
        if rank == 1:
            raise RuntimeError("weight fn failed")
        return torch.ones(a.shape[0], dtype=a.dtype)
    return weight


def _errors_worker(rank, world, init_file, out_prefix):
    # a short timeout: a rank left waiting in a collective fails the test instead of hanging CI
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
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
        (multiple_negatives_ranking_distributed, (z, z[:3] if rank == 1 else z), {}),
        (multiple_negatives_ranking_distributed, (z, z), dict(scale=0.0 if rank == 1 else 20.0)),
        (multiple_negatives_ranking_distributed, (z, z, torch.randn(3 if rank == 1 else 4, 2, 3, dtype=z.dtype)), {}),
        # arguments the ranks must pass alike: a different reduction aborted gloo, a different
        # temperature returned a mix of two losses, a different weight kind ran other collectives
        (nt_xent_distributed, (z, z), dict(reduction="sum" if rank == 1 else "mean")),
        (supcon_distributed, (z, torch.arange(4)), dict(temperature=0.2 if rank == 1 else 0.1)),
        (dcl_distributed, (z, z), dict(weight="vmf" if rank == 1 else None)),
        (multiple_negatives_ranking_distributed, (z, z), dict(scale=10 if rank == 1 else 20)),
        (multiple_negatives_ranking_distributed, (z, z),
         dict(directions=("query_to_doc", "doc_to_query") if rank == 1 else ("query_to_doc", "query_to_query"))),
        (multiple_negatives_ranking_distributed, (z, z),
         dict(hardness_mode="all_negatives", hardness_strength=2.0 if rank == 1 else 1.0)),
        # the variants gather block by block: hard negatives on one rank, a pool on the other
        (multiple_negatives_ranking_distributed,
         (z, z, torch.randn(4, 2, 3, dtype=z.dtype) if rank == 1 else torch.randn(5, 3, dtype=z.dtype)),
         dict(directions=ALL_DIRECTIONS)),
        (multiple_negatives_ranking_distributed, (z, z, torch.randn(4, 1 + rank, 3, dtype=z.dtype)),
         dict(directions=ALL_DIRECTIONS)),
        (multiple_negatives_ranking_distributed, (z, z),
         dict(directions=ALL_DIRECTIONS, partition_mode="per_direction") if rank == 1 else {}),
        (multiple_negatives_ranking_distributed, (z, z),
         dict(directions=ALL_DIRECTIONS, backend="reference" if rank == 1 else "torch")),
        # errors after the argument checks, on one rank: its backend, a weight fn's own
        (nt_xent_distributed, (z, z), dict(backend="reference" if rank == 1 else "torch")),
        (dcl_distributed, (z, z), dict(weight=_raises_on_rank1(rank))),
        (dcl_distributed, (z, z), dict(weight=lambda a, b: torch.ones(3 if rank == 1 else 4, dtype=a.dtype))),
        (info_nce_distributed, (z, z), dict(temperature=0.1, backend="reference" if rank == 1 else "torch")),
        (info_nce_distributed, (z, z), dict(temperature=0.1, symmetric=rank == 1)),
        # a loss that needs a gradient on one rank only: the other would not run the backward's
        # collectives (it hung there)
        (nt_xent_distributed, (z.clone().requires_grad_(rank == 1), z), {}),
        (dcl_distributed, (z, z), dict(weight=torch.ones(4, dtype=z.dtype, requires_grad=rank == 1),
                                       detach_weight=False)),
        (supcon_distributed, (z.clone().requires_grad_(rank == 1), torch.arange(4)), {}),
        (multiple_negatives_ranking_distributed, (z, z, torch.randn(4, 2, 3, dtype=z.dtype, requires_grad=rank == 1)),
         dict(directions=ALL_DIRECTIONS)),
        # after the collective checks, the same verdict on every rank
        (multiple_negatives_ranking_distributed, (z, z),
         dict(directions=ALL_DIRECTIONS, hardness_mode="all_negatives", hardness_strength=1e308)),
        # the plain loss's scale in MNRL's terms (its InfoNCE pass named a temperature)
        (multiple_negatives_ranking_distributed, (z, z), dict(scale=1e-320)),
    ]
    errors = error_messages(bad_on_rank1)
    # a loss over a single pair per rank is fine across ranks: the other ranks' views are its negatives
    one = dcl_distributed(z[rank: rank + 1], z[rank + 1: rank + 2] + 0.1)
    errors.append(bool(torch.isfinite(one)))
    # int32 labels on one rank, int64 on the other (gloo aborted on the mixed gather): the loss
    # of int64 labels everywhere; 1 and 1.0, the same temperature
    labels = torch.tensor([0, 1, 0, 2])
    mixed = supcon_distributed(z, labels.int() if rank == 1 else labels, temperature=1 if rank == 1 else 1.0)
    errors.append(bool(torch.equal(mixed, supcon_distributed(z, labels, temperature=1.0))))
    # the same MNRL variant spelt two ways (a list in another order; a mode without strength is
    # no penalty, warned): the ranks agree, and the loss is the variant's
    spelt = dict(directions=["doc_to_query", "query_to_doc"]) if rank == 1 else \
        dict(directions=("query_to_doc", "doc_to_query"), hardness_mode="all_negatives")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors.append(bool(torch.equal(multiple_negatives_ranking_distributed(z, z + 0.1, **spelt),
                                       multiple_negatives_ranking_distributed(
                                           z, z + 0.1, directions=("query_to_doc", "doc_to_query")))))
        # one direction: per_direction and joint are the same loss
        errors[-1] &= bool(torch.equal(multiple_negatives_ranking_distributed(
            z, z + 0.1, partition_mode="per_direction" if rank == 1 else "joint"),
            multiple_negatives_ranking_distributed(z, z + 0.1)))
    errors.append(_mixed_grads(rank, world))
    torch.save(errors, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _worker


def _mixed_grads(rank, world):
    """Ranks whose inputs differ in which require grad, each rank's loss needing one: the
    loss and the gradients each rank has are one process's on the concatenated batch. A
    gathered block that was a constant on one rank (frozen anchors, cached negatives, views
    whose only trainable input is a DCL weight) had no backward there: the other rank waited.
    A block that is a constant on every rank runs no all-reduce in the backward."""
    g = torch.Generator().manual_seed(3)
    b = 4
    A, P = (torch.randn(world * b, 3, generator=g, dtype=torch.float64) for _ in range(2))
    H = torch.randn(world * b, 2, 3, generator=g, dtype=torch.float64)
    W = torch.rand(world * b, generator=g, dtype=torch.float64) + 0.5
    pool = torch.randn(3, 3, generator=g, dtype=torch.float64)  # rank 1's; none on rank 0
    rows, first = slice(b * rank, b * rank + b), rank == 0
    q2q = dict(directions=("query_to_doc", "query_to_query"))
    hardness = dict(directions=ALL_DIRECTIONS, hardness_mode="all_negatives", hardness_strength=2.0)
    mnrl_d, mnrl_1 = multiple_negatives_ranking_distributed, FCL.multiple_negatives_ranking
    mine_pool = (A[rows], P[rows]) + (() if first else (pool,))

    def dcl_d(z1, z2, w=None, **kw):
        return dcl_distributed(z1, z2, weight=w, **kw)

    def dcl_1(z1, z2, w=None, **kw):
        return FCL.dcl(z1, z2, weight=w, **kw)
    cases = [  # (distributed loss, its one-process loss, options, global inputs, this rank's inputs,
        #          which of them require grad here, the backward's all-reduces)
        (mnrl_d, mnrl_1, hardness, (A, P, H), (A[rows], P[rows], H[rows]), (first, not first, not first), 4),
        (mnrl_d, mnrl_1, q2q, (A, P, pool), mine_pool, (not first, first, True), 3),
        # cached negatives, constants on every rank: the positives' and the anchors' gathers only
        (mnrl_d, mnrl_1, q2q, (A, P, H), (A[rows], P[rows], H[rows]), (True, True, False), 2),
        # rank 0 without a pool, its anchors trainable; rank 1's anchors frozen, its pool a constant
        (mnrl_d, mnrl_1, q2q, (A, P, pool), mine_pool, (first, True, False), 2),
        (dcl_d, dcl_1, dict(detach_weight=False), (A, P, W), (A[rows], P[rows], W[rows]),
         (not first, not first, first), 1),
        # split negatives gather each view on its own: z2, a constant on every rank, without a backward
        (dcl_d, dcl_1, dict(negatives="split"), (A, P), (A[rows], P[rows]), (True, False), 1),
    ]
    ok = []
    for dist_fn, one_fn, kw, full, mine, needs, reduces in cases:
        mine = [x.clone().requires_grad_(n) for x, n in zip(mine, needs)]
        loss = dist_fn(*mine, **kw)
        with counted_collectives() as calls:
            loss.backward()
        full = [x.clone().requires_grad_() for x in full]
        ref = one_fn(*full, **kw)
        ref.backward()
        good = bool(torch.allclose(loss, ref, rtol=0, atol=1e-12)) and len(calls) == reduces
        for x, X in zip(mine, full):
            want = X.grad if X.shape[0] != world * b else X.grad[rows]  # the pool: rank 1's own
            good &= x.grad is None if not x.requires_grad else bool(torch.allclose(x.grad, want, rtol=0, atol=1e-12))
        ok.append(good if good else (good, len(calls)))
    # a weight that requires grad on rank 0 only but is detached (the default): no loss needs a
    # gradient, and none is said to (it was counted as one)
    w = W[rows].clone().requires_grad_(first)
    ok.append(not dcl_distributed(A[rows], P[rows], weight=w).requires_grad)
    return ok


def test_family_distributed_bad_input(tmp_path):
    mp.spawn(_errors_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = ["same shape", "temperature", "empty batch", "grad_mode must be", "same grad_mode",
                "same dtype", "shape [", "negatives must be", "weight must be", "several views", "labels",
                "same shape", "scale", "must have B=4", "same reduction", "same temperature", "same weight",
                "same scale", "same directions", "same hardness_strength", "same kind of negatives",
                "same kind of negatives", "per_direction", "'reference' is not usable",
                "'reference' is not usable", "weight fn failed", "got (3,)",
                "'reference' is not usable", "same symmetric"] + ["per rank: [False, True]"] * 4 + ["scale + hardness_strength",
                                                                    "scale must be at least"]
    for i, what in enumerate(expected):
        # rank 1 names the problem; rank 0 (whose inputs were fine, unless every rank's were bad)
        # is told which rank's were not, instead of blocking in a collective
        assert what in out[1][i], (i, out[1][i])
        assert out[0][i] != "no error", (i, out[0][i])
    assert len(out[1]) == len(expected) + 4, out[1]
    assert all(o[-4:-1] == [True] * 3 and o[-1] == [True] * 7 for o in out), out


def test_family_distributed_needs_a_process_group():
    z = torch.randn(4, 3)
    for fn, args in ((nt_xent_distributed, (z, z)), (dcl_distributed, (z, z)), (supcon_distributed, (z, None)),
                     (multiple_negatives_ranking_distributed, (z, z))):
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
            out.append((loss.detach(), [a.grad, b.grad]))
        results[name] = out
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _worker


@pytest.mark.skipif(importlib.util.find_spec("lightly") is None, reason="lightly not installed")
def test_gather_distributed_equals_lightly(tmp_path):
    """lightly's modules with gather_distributed=True, 2 gloo ranks: the same gradients on every
    rank (DDP's convention); lightly returns each rank's own mean, fastcl the global one."""
    _check_against_peer(_lightly_worker, tmp_path)


def _check_against_peer(worker, tmp_path, world=2):
    """Each case's (peer's, fastcl's) (loss, input gradients) per rank: the same gradients, and
    fastcl's value the mean of the peer's per-rank values (the global loss, for equal batches)."""
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in per_rank[0]:
        mean_of_theirs = sum(res[case][0][0] for res in per_rank) / world
        for r, res in enumerate(per_rank):
            (l_theirs, g_theirs), (l_ours, g_ours) = res[case]
            assert torch.allclose(l_ours, mean_of_theirs, rtol=0, atol=1e-12), (case, r)
            assert len(g_ours) == len(g_theirs)
            for x, y in zip(g_ours, g_theirs):
                assert torch.allclose(x, y, rtol=0, atol=1e-12), (case, r, (x - y).abs().max())


def _st_worker(rank, world, init_file, out_prefix):
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # releases before the module move
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    from fastcl.integrations import MultipleNegativesRankingLoss as FusedMNRL

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(6)
    cols = [torch.randn(4 * world, D, generator=g, dtype=torch.float64) for _ in range(3)]  # equal batches
    sl = slice(4 * rank, 4 * rank + 4)
    # (anchor, positive) pairs and triplets, plain and with the variants (in the releases that have them)
    cases = {"pairs": (2, {}), "triplets": (3, {})}
    if "directions" in inspect.signature(MultipleNegativesRankingLoss).parameters:
        cases["triplets_variant"] = (3, dict(directions=ALL_DIRECTIONS, hardness_mode="hard_negatives",
                                             hardness_strength=2.0))
        cases["pairs_symmetric"] = (2, dict(directions=("query_to_doc", "doc_to_query"),
                                            partition_mode="per_direction", hardness_mode="in_batch_negatives",
                                            hardness_strength=1.0))
    results = {}
    for case, (ncols, kw) in cases.items():
        out = []
        for cls in (MultipleNegativesRankingLoss, FusedMNRL):
            x = [c[sl].clone().requires_grad_() for c in cols[:ncols]]
            loss = cls(Embedder(), scale=10.0, gather_across_devices=True, **kw)([{"x": t} for t in x], None)
            loss.backward()
            out.append((loss.detach(), [t.grad for t in x]))
        results[case] = out
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _worker


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers not installed")
def test_gather_across_devices_equals_sentence_transformers(tmp_path):
    """sentence-transformers' MNRL with gather_across_devices=True, 2 gloo ranks: the same
    gradients on every rank; it returns each rank's own mean, fastcl the global one."""
    _check_against_peer(_st_worker, tmp_path)
