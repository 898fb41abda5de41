"""Tests that close gaps found by mutation testing of the kernels (kernels/, csrc/) and of
fastcl/distributed.py: each one fails on a small, plausible bug that the rest of the suite
let through."""
import math
import os

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from fastcl import chunked
from fastcl.info_nce import _impl
from helpers import assert_within_budget

KERNEL_IMPLS = ["torch", "triton", "cuda"]  # conftest skips "cuda" where its extension cannot run


@pytest.mark.parametrize("backend", KERNEL_IMPLS)
def test_symmetric_backward_takes_the_stored_diagonal(backend):
    """test_backward_takes_the_stored_positive for the CLIP loss: with column statistics the
    diagonal S_jj of the column term Q_ij = exp(S_ij - col_lse_j) is the forward's stored
    positive too (the dU and the dV launch alike), not the recomputed logit. Shifting the stored
    positive by 0.01 must move both P's and Q's diagonal by exp(0.01). B = 40 crosses the
    interpreter's 32-row tiles. (A backward that recomputes the diagonal gives the same numbers
    wherever the recompute rounds as the forward did, as in the interpreter, so only this
    shift tells them apart.)"""
    impl = _impl(backend)
    B, D, s, shift = 40, 6, 2.0, 0.01
    g = torch.Generator().manual_seed(8)
    u, v = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    gr, gc = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    U, V, sd = u.float().to(DEVICE), v.float().to(DEVICE), torch.tensor(s, device=DEVICE)
    _, _, rs, cs = impl.lse_forward(U, V, sd, None, True)
    rs = rs.clone()
    rs[2] += shift / impl.LOG_UNIT
    du, dv, _ = impl.lse_backward(U, V, sd, rs, cs, gr.float().to(DEVICE), gc.float().to(DEVICE), None, True)
    S = s * u @ v.T
    P, Q = torch.softmax(S, 1), torch.softmax(S, 0)
    P.diagonal().mul_(math.exp(shift))
    Q.diagonal().mul_(math.exp(shift))
    eye = torch.eye(B, dtype=torch.float64)
    G = gr[:, None] * (P - eye) + gc[None, :] * (Q - eye)
    assert torch.allclose(du.double().cpu(), s * G @ v, atol=1e-5)
    assert torch.allclose(dv.double().cpu(), s * G.T @ u, atol=1e-5)


def _supcon_raw(impl, u, cls, scale, gr):
    """The raw op's SupCon rows (class ids, self excluded; k = q): row loss, dU, dV, d scale."""
    row, _, rs, cs = impl.lse_forward(u, u, scale, None, False, cls, cls, True, False)
    du, dv, ds = impl.lse_backward(u, u, scale, rs, cs, gr, gr, None, False, cls, cls, True, False)
    return row, du, dv, ds


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the 16-bit SupCon tests (test_losses) take this path already, "
                                       "and fp32's 3xTF32 dots there round unlike the interpreter's")
def test_triton_one_dot_recompute_with_class_ids(monkeypatch):
    """The one-dot S recompute (FASTCL_BWD_SAME_CHUNKS=0; 16-bit inputs on a GPU) with class ids:
    SupCon's P there snaps a logit within 2^-20 (relative) of the forward's row max onto it.
    test_triton_one_dot_slab_path covers the path without class ids only, so a snap that
    reached further (1e-2 relative: positives of classes with spread 0.1 at tau = 0.05 are
    that close to the max) went unseen on the CPU. fp32 here: its budget is tight enough to
    see any real gap erased."""
    from fastcl.kernels import info_nce as K
    monkeypatch.setenv("FASTCL_BWD_SAME_CHUNKS", "0")
    B, D = 45, 20  # two row blocks of the interpreter's 32
    g = torch.Generator().manual_seed(3)
    cls = torch.randint(0, 4, (B,), generator=g)
    centres = torch.randn(4, D, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(centres[cls] + 0.1 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    u = u.float().double()
    gr = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    s = torch.tensor(1 / 0.05, dtype=torch.float64)
    ref = _supcon_raw(chunked, u, cls, s, gr)
    same = _supcon_raw(chunked, u.float(), cls, s.float(), gr.float())
    ours = _supcon_raw(K, u.float().to(DEVICE), cls.to(DEVICE), s.float().to(DEVICE), gr.float().to(DEVICE))
    assert K.backward_config(torch.device(DEVICE), torch.float32, D)["SAME_CHUNKS"] is False
    # d scale (6e-6 off here, naive fp32 2e-6: the forward's statistics) gets a looser floor;
    # a snap 1e-2 wide puts it 0.3 off, and dU, dV 30x their own size.
    for name, a, b, r in zip(["row_loss", "du", "dv", "dscale"], ours, same, ref):
        assert_within_budget(name, a, b, r, torch.float32, floor=1e-4 if name == "dscale" else None)


def test_triton_column_partials_stay_in_their_programs_row(monkeypatch):
    """The forward's persistent programs each merge their rows' column statistics into their
    own row of the [P, N] partial buffers (no atomics: only program p writes row p). The
    interpreter runs the programs one after another, so programs that all merged into one
    row (a race on a GPU) gave the same merged result; here each row of the partials must
    hold the statistics of exactly its program's row blocks. Three row blocks (the last one
    partial); in the interpreter two programs share them (program 0 takes blocks 0 and 2)."""
    from fastcl.kernels import info_nce as K
    captured, launch = [], K._launch
    monkeypatch.setattr(K, "_launch", lambda kernel, grid, args, *a: captured.append(args) or launch(kernel, grid, args, *a))
    BM = K._config(torch.device(DEVICE), backward=False)["BM"]
    B, D, s = 2 * BM + 6, 16, 3.0
    g = torch.Generator().manual_seed(11)
    u, v = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    K.lse_forward(u.to(DEVICE), v.to(DEVICE), torch.tensor(s, device=DEVICE), None, True)
    col_m, col_l = (t.cpu().double() for t in captured[0][7:9])
    P = col_m.shape[0]
    assert P >= 2
    S2 = (s / math.log(2)) * (u.double() @ v.double().T)  # log2 units
    for p in range(P):
        rows = torch.cat([torch.arange(rb * BM, min(B, rb * BM + BM)) for rb in range(p, _cdiv(B, BM), P)])
        m = S2[rows].amax(0)
        assert torch.allclose(col_m[p], m, rtol=1e-5, atol=1e-5), p
        assert torch.allclose(col_l[p], torch.exp2(S2[rows] - m).sum(0), rtol=1e-4), p


def _cdiv(a, b):
    return -(-a // b)


# ------------------------------------------------------------------ fastcl.distributed
# SupCon anchors [5, 3] per rank, one view each: class 7 has one member in the whole batch (an
# anchor without a positive), class 1's members are all on rank 0, class 2's on both ranks.
SUPCON_LABELS = [[1, 2, 7, 1, 2], [2, 3, 3]]


def _supcon_lone_anchor_worker(rank, world, init_file, out_prefix):
    import torch.distributed as dist
    from fastcl.distributed import supcon_distributed
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(sum(map(len, SUPCON_LABELS)), 5, generator=g, dtype=torch.float64)
    off = sum(len(lab) for lab in SUPCON_LABELS[:rank])
    out = {}
    for reduction in ("mean", "sum", "none"):
        x = X[off: off + len(SUPCON_LABELS[rank])].clone().requires_grad_()
        loss = supcon_distributed(x, torch.tensor(SUPCON_LABELS[rank]), temperature=0.3, reduction=reduction,
                                  backend="torch")
        loss.sum().backward()
        out[reduction] = (loss.detach(), x.grad)
    torch.save(out, f"{out_prefix}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as tests/test_distributed.py's workers: no process-group teardown


def test_distributed_supcon_anchor_without_a_positive(tmp_path):
    """supcon_distributed with 2-D features (one view) and an anchor whose class has no other
    member on any rank: it counts for nothing (0 in reduction="none", left out of the mean's
    count), as in one process. The family tests pass two views per sample, so every anchor had
    a positive and the distributed reduction's mask of such anchors went untested."""
    import torch.multiprocessing as mp
    import fastcl.functional as FCL
    mp.spawn(_supcon_lone_anchor_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "rank")), nprocs=2,
             join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor(sum(SUPCON_LABELS, []))
    X = torch.randn(len(labels), 5, generator=g, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        x = X.clone().requires_grad_()
        ref = FCL.supcon(x, labels, temperature=0.3, reduction=reduction, backend="torch")
        ref.sum().backward()
        if reduction == "none":
            assert float(ref[2].detach()) == 0.0  # the lone anchor
        off = 0
        for r, lab in enumerate(SUPCON_LABELS):
            rows = slice(off, off + len(lab))
            loss, grad = per_rank[r][reduction]
            expected = ref[rows] if reduction == "none" else ref
            assert torch.allclose(loss, expected.detach(), rtol=0, atol=1e-12), (reduction, r, loss, expected)
            # (every rank's backward of its own part: together the global loss's gradient)
            assert torch.allclose(grad, x.grad[rows], rtol=0, atol=1e-12), (reduction, r)
            off += len(lab)
