"""Distributed InfoNCE on gloo (CPU): every rank's loss and gradients vs one process on the
concatenated batch. One spawn per world size runs all configurations, to keep CI short."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcl
from fastcl.distributed import info_nce_distributed

# Uneven local batches: queries per rank, and keys per rank for the one-direction loss (at
# least as many as queries: without labels, query i's positive is its rank's key i).
SIZES = {1: ([6], [8]), 2: ([5, 3], [6, 4]), 3: ([4, 1, 6], [5, 3, 6]), 4: ([3, 5, 2, 4], [4, 5, 6, 4])}
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
    # fp32 on nearly solved rows (see SOLVED_FP32), against the error budget of naive fp32 torch
    ("ring_solved", "ring", False, False, True, "exact", "torch"),
    ("ring_clip_solved", "ring", True, False, True, "exact", "torch"),
    ("gather_solved", "all_gather", False, True, True, "exact", "torch"),
    # fp32 at tau = 0.01 (see HOT_FP32), against the same budget
    ("ring_triton_hot", "ring", False, False, False, "exact", "triton"),
    ("ring_clip_triton_hot", "ring", True, False, False, "exact", "triton"),
]
REDUCTION = {"ring_sum": "sum"}
# Keys close to their queries at tau = 0.07: losses ~1e-2, below the logits' rounding in places.
# The ring once merged log-sum-exps and subtracted a positive computed apart from its tile,
# 10x naive fp32's gradient error here (and every digit of rows with losses ~1e-12).
SOLVED_FP32 = {"ring_solved", "ring_clip_solved", "gather_solved"}
# Logits up to 100: the ring once took the kernels' log2 statistics to natural logs and back
# for the backward, rounding the max by ~100 u, and its gradient erred 6x one process's.
HOT_FP32 = {"ring_triton_hot", "ring_clip_triton_hot"}
BUDGET_FP32 = SOLVED_FP32 | HOT_FP32


def _default_labels(bq, bk):
    """The distributed loss's default positives as global rows of k: each rank's key i."""
    return torch.cat([torch.arange(sum(bk[:r]), sum(bk[:r]) + bq[r]) for r in range(len(bq))])


def _global_data(world, symmetric, custom_labels, solved=False, fp32_values=False):
    """(bq, bk, Q, K, labels, ref_labels): labels for the distributed call (None: its default),
    ref_labels the same positives for the single-process reference. fp32_values: Q and K hold
    fp32 numbers (the solved data always does)."""
    bq, bk = SIZES[world]
    if symmetric:
        bk = bq
    g = torch.Generator().manual_seed(world)
    Q = torch.randn(sum(bq), D, generator=g, dtype=torch.float64)
    K = torch.randn(sum(bk), D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, sum(bk), (sum(bq),), generator=g) if custom_labels else None
    y = _default_labels(bq, bk) if labels is None else labels
    if solved:  # each query's positive key is a slightly perturbed copy of it; fp32 values
        K = 0.3 * K
        K[y] += Q
        return bq, bk, Q.float().double(), K.float().double(), labels, y
    if labels is None:
        K[y] += Q  # the positives, near their queries
    else:
        n = min(len(Q), len(K))
        K[:n] += Q[:n]
    if fp32_values:
        Q, K = Q.float().double(), K.float().double()
    return bq, bk, Q, K, labels, y


def _settings(name, learn):
    """(dtype, temperature) of a configuration's run."""
    if name in SOLVED_FP32:
        return torch.float32, 0.07
    if name in HOT_FP32:
        return torch.float32, 0.01
    return torch.float64, None if learn else 0.2


def _worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for name, gather, sym, custom, learn, mode, backend in CONFIGS:
        bq, bk, Q, K, labels, _ = _global_data(world, sym, custom, name in SOLVED_FP32, name in HOT_FP32)
        dtype, temperature = _settings(name, learn)
        dtype = torch.float32 if backend == "triton" else dtype
        oq, ok = sum(bq[:rank]), sum(bk[:rank])
        q = Q[oq: oq + bq[rank]].to(dtype).requires_grad_()
        k = K[ok: ok + bk[rank]].to(dtype).requires_grad_()
        ls = torch.tensor(2.0, dtype=dtype, requires_grad=True)
        loss = info_nce_distributed(
            q, k, temperature=temperature, logit_scale=ls if temperature is None else None,
            labels=None if labels is None else labels[oq: oq + bq[rank]], symmetric=sym,
            gather=gather, grad_mode=mode, backend=backend, reduction=REDUCTION.get(name, "mean"))
        loss.backward()
        results[name] = dict(loss=loss.detach(), dq=q.grad, dk=k.grad, dls=ls.grad)
    # nn.ClipLoss with its own learnable scale, outside any DDP wrapper (see _clip_module_reference)
    bq, _, Q, K, _, _ = _global_data(world, True, False)
    oq = sum(bq[:rank])
    q, k = Q[oq: oq + bq[rank]].clone().requires_grad_(), K[oq: oq + bq[rank]].clone().requires_grad_()
    m = fastcl.nn.ClipLoss(rank=rank, world_size=world, init_temperature=0.5, normalize=True).double()
    loss = m(q, k)
    loss.backward()
    results["clip_module"] = dict(loss=loss.detach(), dq=q.grad, dk=k.grad, dls=m.logit_scale.grad)
    torch.save(results, f"{out_prefix}{rank}.pt")
    dist.barrier()  # every rank is done talking
    # Results are on disk; skip the process-group teardown, whose C++ destructors race with
    # gloo threads at exit and now and then abort ("terminate called without an active exception").
    os._exit(0)


def _clip_module_reference(world):
    bq, _, Q, K, _, _ = _global_data(world, True, False)
    q, k = Q.clone().requires_grad_(), K.clone().requires_grad_()
    m = fastcl.nn.ClipLoss(init_temperature=0.5, normalize=True).double()
    loss = m(q, k)
    loss.backward()
    return bq, dict(loss=loss.detach(), dq=q.grad, dk=k.grad, dls=m.logit_scale.grad)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_equals_single_process(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, gather, sym, custom, learn, mode, backend in CONFIGS:
        bq, bk, Q, K, _, ref_labels = _global_data(world, sym, custom, name in SOLVED_FP32, name in HOT_FP32)
        dtype, temperature = _settings(name, learn)
        ref, naive = ({}, {})
        for dt, out in ((torch.float64, ref), (dtype, naive)):  # naive: same-dtype torch, 1 process
            q, k = Q.to(dt).clone().requires_grad_(), K.to(dt).clone().requires_grad_()
            ls = torch.tensor(2.0, dtype=dt, requires_grad=True)
            loss = fastcl.info_nce_reference(q, k, temperature=temperature,
                                             logit_scale=ls if temperature is None else None,
                                             labels=None if sym else ref_labels, symmetric=sym, reduction=REDUCTION.get(name, "mean"))
            loss.backward()
            out.update(loss=loss.detach(), dq=q.grad, dk=k.grad, dls=ls.grad)
        if name in BUDGET_FP32:
            ours = {key: torch.cat([res[name][key] for res in per_rank]) for key in ("dq", "dk")}
            ours["loss"] = per_rank[0][name]["loss"]
            for key in ("loss", "dq", "dk"):
                # Relative to the true size: these losses and gradients are far below 1, where
                # helpers.rel_err's floor would hide the difference.
                e_ours, e_naive = (float((x.double() - ref[key]).norm() / ref[key].norm())
                                   for x in (ours[key], naive[key]))
                # The mean loss, whose logits' rounding cancels, errs by a few ulps either way
                # (2e-8 to 3e-6 here, naive's luck varying with the BLAS: torch 2.4.1 vs 2.13).
                # A ring that took a row's log-sum-exp and positive apart would err at the
                # logits' rounding, eps * 14 / 1e-2 ~ 1e-4: far above this floor.
                floor = 8 * torch.finfo(torch.float32).eps if key == "loss" else 0.0
                assert e_ours <= 4 * max(e_naive, floor) + 1e-7, (name, key, e_ours, e_naive)
            continue
        tol = 1e-5 if backend == "triton" else 1e-10
        scale = world if mode == "ddp" else 1  # DDP averages: its ranks carry world x the gradient
        dls_sum = 0.0
        for r, res in enumerate(per_rank):
            out = res[name]
            oq, ok = sum(bq[:r]), sum(bk[:r])
            # rtol=0: allclose's default rtol=1e-5 would hide anything below it
            assert torch.allclose(out["loss"].double(), ref["loss"], rtol=0, atol=tol), (name, r)
            assert torch.allclose(out["dq"].double(), scale * ref["dq"][oq: oq + bq[r]], rtol=0, atol=tol), \
                (name, r, "dq")
            assert torch.allclose(out["dk"].double(), scale * ref["dk"][ok: ok + bk[r]], rtol=0, atol=tol), \
                (name, r, "dk")
            if learn:
                dls_sum += float(out["dls"])
                if mode == "exact":  # all-reduced once: every rank holds the full gradient
                    assert abs(float(out["dls"]) - float(ref["dls"])) < tol * 10, (name, r, "dls")
        if learn and mode == "ddp":  # DDP's average of the per-rank gradients is the full one
            assert abs(dls_sum / world - float(ref["dls"])) < tol * 10, (name, "dls")
    # ClipLoss: the features' gradients scaled for the model's DDP; the module's own scale is in
    # no DDP, so every rank must hold its full gradient already (else the ranks' scales drift).
    bq, ref = _clip_module_reference(world)
    for r, res in enumerate(per_rank):
        out, oq = res["clip_module"], sum(bq[:r])
        assert torch.allclose(out["loss"], ref["loss"], rtol=0, atol=1e-12), r
        for key in ("dq", "dk"):
            assert torch.allclose(out[key], world * ref[key][oq: oq + bq[r]], rtol=0, atol=1e-12), (r, key)
        assert abs(float(out["dls"]) - float(ref["dls"])) < 1e-12, (r, float(out["dls"]), float(ref["dls"]))


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
    try:  # logit_scale's dtype by rank: it sizes the backward's exchanges (gloo aborted there)
        ls = torch.tensor(1.0, dtype=torch.float64 if rank == 0 else torch.float32, requires_grad=True)
        info_nce_distributed(torch.randn(4, 3), torch.randn(4, 3), logit_scale=ls, symmetric=True).backward()
        errors.append("no error")
    except ValueError as e:
        errors.append(str(e))
    try:  # a world_size the group does not have (it gave the 2-rank loss)
        fastcl.nn.ClipLoss(rank=rank, world_size=world + 1)(torch.randn(4, 3), torch.randn(4, 3), 10.0)
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
    # The ring under autocast, forward and backward inside it: the same as without. Its lse
    # calls bypass the op's autocast guard (dq was 2e-2 off, or the backward crashed).
    g = torch.Generator().manual_seed(1)
    q0 = torch.randn(8, 6, generator=g)
    k0 = q0 + 0.3 * torch.randn(8, 6, generator=g)
    runs = []
    for amp in (False, True):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = info_nce_distributed(q, k, temperature=0.05, symmetric=True, gather="ring", backend="torch")
            loss.backward()
        runs.append((loss.detach(), q.grad, k.grad))
    errors.append(all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(*runs)))
    torch.save(errors, f"{out_prefix}{rank}.pt")
    dist.barrier()  # every rank is done talking
    # Results are on disk; skip the process-group teardown, whose C++ destructors race with
    # gloo threads at exit and now and then abort ("terminate called without an active exception").
    os._exit(0)


def test_distributed_bad_input(tmp_path):
    with pytest.raises(RuntimeError, match="process group"):
        info_nce_distributed(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match=r"ClipLoss\(world_size=2\) needs an initialised"):
        fastcl.nn.ClipLoss(world_size=2)(torch.randn(4, 3), torch.randn(4, 3), 10.0)
    mp.spawn(_errors_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    for rank in range(2):  # every rank raises, including the one whose own inputs were fine
        errors = torch.load(tmp_path / f"rank{rank}.pt")
        assert "as many keys" in errors[0] and "gather" in errors[1] and "grad_mode" in errors[2]
        assert "[0, 8)" in errors[3]
        assert ("empty batch" if rank == 1 else "rank(s) [1]") in errors[4]
        assert "[0, 8)" in errors[5] and "[0, 8)" in errors[6] and "fewer keys" in errors[7]
        assert "every rank must pass the same logit_scale" in errors[8]
        assert "ClipLoss(world_size=3), but the process group has 2 ranks" in errors[9]
        assert errors[10] is True and errors[11] is True and errors[12] is True


def _grad_enabled(enabled, fn, *args, **kwargs):
    with torch.set_grad_enabled(enabled):
        return fn(*args, **kwargs)


def _mixed_grads(rank, world):
    """Ranks whose inputs differ in which require grad, every rank's loss needing one: the
    loss and the gradients each rank has are one process's. A gathered tensor (or logit_scale)
    that was a constant on some ranks had no backward there: the other ranks waited in theirs.
    One that is a constant on every rank (a frozen key tower, a fixed logit_scale) runs no
    collective in the backward."""
    from helpers import counted_collectives
    g = torch.Generator().manual_seed(7)
    Q, K = (torch.randn(4 * world, 3, generator=g, dtype=torch.float64) for _ in range(2))
    rows, even = slice(4 * rank, 4 * rank + 4), rank % 2 == 0
    ok = []
    for kw, q_grad, k_grad, ls_grad, reduces, p2p in [
        # (arguments, whether q, k and logit_scale require grad on this rank, the backward's
        # all-reduces and the ring's exchanges: world - 1 per pass for the key blocks, and world
        # for the dk accumulators, which go all the way round)
        (dict(), even, not even, False, 1, 0),                              # k's gather
        (dict(symmetric=True), even, not even, False, 2, 0),                # and q's
        (dict(symmetric=True, gather="ring"), even, not even, False, 0, 2 * (2 * world - 1)),
        (dict(labels=torch.arange(4 * world).roll(1)[rows]), True, True, rank < 2, 2, 0),  # logit_scale's sum
        (dict(), True, False, False, 0, 0),                                 # a frozen key tower on every rank
        (dict(gather="ring"), True, False, False, 0, world - 1),            # its dk stays home
    ]:
        kw = dict(kw, logit_scale=torch.tensor(1.5, dtype=torch.float64, requires_grad=ls_grad))
        q, k = Q[rows].clone().requires_grad_(q_grad), K[rows].clone().requires_grad_(k_grad)
        loss = info_nce_distributed(q, k, backend="torch", **kw)
        with counted_collectives() as calls, counted_collectives("batch_isend_irecv") as exchanges:
            loss.backward()
        ref_kw = dict(kw, labels=torch.arange(4 * world).roll(1)) if "labels" in kw else dict(kw)
        ref_kw.pop("gather", None)
        Qr, Kr, ls = Q.clone().requires_grad_(), K.clone().requires_grad_(), kw["logit_scale"].detach().requires_grad_()
        ref = fastcl.info_nce_reference(Qr, Kr, **dict(ref_kw, logit_scale=ls))
        ref.backward()
        good = bool(torch.allclose(loss, ref, rtol=0, atol=1e-12)) and (len(calls), len(exchanges)) == (reduces, p2p)
        for mine, full in ((q, Qr.grad[rows]), (k, Kr.grad[rows]), (kw["logit_scale"], ls.grad)):
            good &= mine.grad is None if not mine.requires_grad else bool(torch.allclose(mine.grad, full, rtol=0,
                                                                                         atol=1e-12))
        ok.append(good if good else (len(calls), len(exchanges)))
    # ClipLoss's own learnable scale (in no DDP), frozen on rank 1 only: it averaged the scale's
    # gradient over the ranks before the loss, and rank 1, without it, left the others waiting.
    m = fastcl.nn.ClipLoss(rank=rank, world_size=world, init_temperature=0.2)
    m.logit_scale.requires_grad_(rank != 1)
    img, txt = Q[rows].clone().requires_grad_(), K[rows].clone().requires_grad_()
    loss = m(img, txt)
    loss.backward()
    one = fastcl.nn.ClipLoss(init_temperature=0.2)
    I, T = Q.clone().requires_grad_(), K.clone().requires_grad_()
    ref = one(I, T)
    ref.backward()
    good = bool(torch.allclose(loss, ref, rtol=0, atol=1e-12))
    # grad_mode="ddp": the features' gradients x world_size (DDP averages them); the scale's, averaged here
    good &= bool(torch.allclose(img.grad, world * I.grad[rows], rtol=0, atol=1e-10))
    good &= bool(torch.allclose(txt.grad, world * T.grad[rows], rtol=0, atol=1e-10))
    good &= (m.logit_scale.grad is None if rank == 1 else
             bool(torch.allclose(m.logit_scale.grad, one.logit_scale.grad, rtol=1e-6, atol=0)))
    ok.append(good)
    return ok


def _agreement_worker(rank, world, init_file, out_prefix):
    """Ranks that disagree on what the collectives exchange, or whose non-data arguments are
    bad: every rank raises, none hangs or aborts. Then the ring inside a subgroup."""
    import datetime
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    out = []
    one = rank == 1
    f16 = torch.float16
    cases = [
        # fp64 on one rank: gloo aborted the process (C++ terminate) on the size mismatch
        lambda: info_nce_distributed(torch.randn(4, 3, dtype=torch.float64 if one else torch.float32),
                                     torch.randn(4, 3, dtype=torch.float64 if one else torch.float32)),
        # fp16 and bf16 have the same size: the loss was silently wrong (bf16 read as fp16)
        lambda: info_nce_distributed(torch.randn(4, 3, dtype=torch.bfloat16 if one else f16),
                                     torch.randn(4, 3, dtype=torch.bfloat16 if one else f16), backend="torch"),
        lambda: info_nce_distributed(torch.randn(4, 4 if one else 3), torch.randn(4, 4 if one else 3)),
        # labels on one rank only: its range check (a collective) ran on that rank alone
        lambda: info_nce_distributed(torch.randn(4, 3), torch.randn(4, 3), labels=None if one else torch.arange(4)),
        # a bad scale on one rank was checked after the shared check: the others hung
        lambda: info_nce_distributed(torch.randn(4, 3), torch.randn(4, 3),
                                     logit_scale=torch.ones(2 if one else 1)),
        lambda: info_nce_distributed(torch.randn(4, 3), torch.randn(4, 3), symmetric="no"),  # was the CLIP loss
        # valid but different: the ranks ran different collectives and hung until the timeout
        lambda: info_nce_distributed(torch.randn(4, 3), torch.randn(4, 3), gather="ring" if one else "all_gather"),
        # invalid on one rank: it raised alone, before the shared check
        lambda: info_nce_distributed(torch.randn(4, 3), torch.randn(4, 3), grad_mode="sum" if one else "exact"),
        # ClipLoss checked its features locally, before the collective check: the others hung
        lambda: fastcl.nn.ClipLoss(rank=rank, world_size=world)(torch.randn(0 if one else 4, 3),
                                                                torch.randn(0 if one else 4, 3), 10.0),
        # a loss that needs a gradient on some ranks only: the forward passed, and the backward
        # of the ranks that ran it waited for the others' all-reduces
        lambda: info_nce_distributed(torch.randn(4, 3, requires_grad=one), torch.randn(4, 3), symmetric=True),
        lambda: _grad_enabled(not one, info_nce_distributed, torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)),
    ]
    for case in cases:
        try:
            case()
            out.append("no error")
        except (ValueError, TypeError) as e:
            out.append(f"{type(e).__name__}: {e}")
    out.append(_mixed_grads(rank, world))
    # The ring inside a subgroup whose ranks are not the global ones: P2POp took the group's
    # ranks as global ranks ("Global rank 0 is not part of group").
    # Three members, so that the ring's next and previous ranks differ, and global labels, so
    # that the loss depends on which block comes from which rank.
    sub = dist.new_group([1, 2, 3])
    if rank in (1, 2, 3):
        g = torch.Generator().manual_seed(5)
        Q, K = (torch.randn(9, 3, generator=g, dtype=torch.float64) for _ in range(2))
        labels = torch.randint(0, 9, (9,), generator=g)
        rows = slice(3 * (rank - 1), 3 * rank)
        for gather in ("ring", "all_gather"):
            for kw in (dict(symmetric=True), dict(labels=labels)):
                loc = dict(kw, labels=labels[rows]) if "labels" in kw else kw
                loss = info_nce_distributed(Q[rows], K[rows], temperature=0.3, gather=gather, group=sub,
                                            backend="torch", **loc)
                out.append(bool(torch.allclose(loss, fastcl.info_nce_reference(Q, K, temperature=0.3, **kw))))
    torch.save(out, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _errors_worker: no process-group teardown


def test_distributed_ranks_must_agree(tmp_path):
    mp.spawn(_agreement_worker, args=(4, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=4, join=True)
    for rank in range(4):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert "TypeError" in out[0] and "same dtype" in out[0], out[0]
        assert "TypeError" in out[1] and "bfloat16" in out[1], out[1]
        assert "same feature dimension D" in out[2], out[2]
        assert "labels" in out[3], out[3]
        assert ("one element" if rank == 1 else "rank(s) [1]") in out[4], out[4]
        assert "symmetric must be True or False" in out[5], out[5]
        assert "same gather; per rank: ['all_gather', 'ring', 'all_gather', 'all_gather']" in out[6], out[6]
        assert ("grad_mode must be" if rank == 1 else "rank(s) [1]") in out[7], out[7]
        assert ("empty batch" if rank == 1 else "rank(s) [1]") in out[8], out[8]
        assert "need a gradient, or none's; per rank: [False, True, False, False]" in out[9], out[9]
        assert "need a gradient, or none's; per rank: [True, False, True, True]" in out[10], out[10]
        assert out[11] == [True] * 7, out[11]
        assert out[12:] == ([True] * 4 if rank else []), out[12:]



def _compile_worker(rank, world, init_file, out_prefix):
    """The distributed losses under torch.compile (graph breaks at the host-side exchanges), with
    inputs that require grad on some ranks only: values and gradients as in eager mode."""
    import datetime
    from fastcl.distributed import multiple_negatives_ranking_distributed
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(rank)
    q, k, h = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    cases = [
        lambda a, b: info_nce_distributed(a, b, temperature=0.1, symmetric=True),
        lambda a, b: info_nce_distributed(a, b, temperature=0.1, gather="ring"),
        lambda a, b: multiple_negatives_ranking_distributed(a, b, h, directions=("query_to_doc", "query_to_query")),
    ]
    out = []
    for fn in cases:
        runs = []
        for f in (fn, torch.compile(fn)):
            a, b = q.clone().requires_grad_(), k.clone().requires_grad_(rank == 0)
            loss = f(a, b)
            loss.backward()
            runs.append([loss.detach(), a.grad] + ([b.grad] if rank == 0 else []))
        out.append(all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(*runs)))
    torch.save(out, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _errors_worker


def test_distributed_losses_compile_with_graph_breaks(tmp_path):
    mp.spawn(_compile_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2, join=True)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == [True] * 3


if os.name != "posix":  # pragma: no cover - gloo over file:// init is tested on Linux
    pytestmark = pytest.mark.skip("distributed tests run on POSIX")
