"""Triton kernels for the fused log-sum-exp core of InfoNCE.

The op computes, for S = s * U @ V^T (U: [B, D], V: [N, D]) without ever storing S:
  row_lse[i] = log sum_j exp(S_ij)                 (always)
  col_lse[j] = log sum_i exp(S_ij)                 (symmetric / CLIP only)
and the backward of the per-row losses row_lse_i - S_{i,y_i} (and col_lse_j - S_jj), given
upstream gradients gr and gc:
  G_ij = gr_i * (exp(S_ij - row_lse_i) - [j == y_i]) + gc_j * (exp(S_ij - col_lse_j) - [i == j])
  dU = s * G @ V,  dV = s * G^T @ U,  dL/ds = sum_ij G_ij <u_i, v_j>
The one-hot is subtracted inside the tile, element by element, as a naive cross-entropy
does: subtracting s*v_{y_i} from dU afterwards would cancel catastrophically in fp32.
The row statistics are kept as (max, log-sum) rather than one log-sum-exp, and the positive
logit is read from the same tile, so loss = (max - pos) + log-sum is exact when the positive
is the maximum. Normalisation and reductions are done by the caller in torch.

Forward: one pass over the tiles. Programs are persistent over row blocks: each one keeps its
rows' online max/sum in registers and merges its column statistics into its own row of a
[P, N] buffer (no atomics, memory linear in N); the caller merges the P partials.
Backward: one kernel, launched for dU (over row blocks) and for dV (over column blocks); each
program keeps its [BM, BD] gradient accumulator in registers, so there are no atomics and no
read-modify-write of gradients in global memory.
Split (FASTCL_TRITON_SPLIT, off by default): both kernels may also divide the column blocks among
programs, for batches with few row blocks; partials are merged in torch (see _splits).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
LOG_UNIT = LN2  # the statistics (max, log-sum) are in log2 units: multiply by LN2 for natural logs
# Finite stand-in for -inf (running maxima, masked lanes): keeps (x - max) free of inf - inf = NaN.
# fp32's lowest, below every finite logit: -1e30 once was, and logits under it (scale > 1e30,
# or features of norm ~1e15) left it the row max, so each exp2 underflowed and the loss was
# -inf. The kernels spell it out: jit code takes literals, not module floats.
NEG = -3.4028234663852886e38


@triton.jit
def _score_tile(U, V, rows, cols, rmask, cmask, D, s_ud, s_ub, s_vd, s_vn,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """acc[BM, BN] = U[rows] @ V[cols]^T in fp32, looping over D in chunks of BK."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < D
        a = tl.load(U + rows[:, None] * s_ub + ks[None, :] * s_ud,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(V + cols[:, None] * s_vn + ks[None, :] * s_vd,
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _label_and_class(LABELS, ROW_CLS, idx, mask, HAS_LABELS: tl.constexpr, MULTI_POS: tl.constexpr):
    """Row idx's positive column (labels, else idx itself) and class id (if multi-positive)."""
    if HAS_LABELS:
        y = tl.load(LABELS + idx, mask=mask, other=-1)
    else:
        y = idx
    if MULTI_POS:
        cls = tl.load(ROW_CLS + idx, mask=mask, other=-1)
    else:
        cls = y
    return y, cls


@triton.jit
def _keep(valid, r_idx, c_idx, is_pos, EXCL_DIAG: tl.constexpr, EXCL_POS: tl.constexpr):
    """Which logits enter the row's log-sum-exp: not self (NT-Xent, SupCon, DCL), not the
    positive (DCL's decoupling)."""
    keep = valid
    if EXCL_DIAG:
        keep = keep & (r_idx != c_idx)
    if EXCL_POS:
        keep = keep & (is_pos == 0)
    return keep


@triton.jit
def lse_fwd_kernel(U, V, SCALE, LABELS, ROW_CLS, COL_CLS, ROW_STATS, COL_M, COL_L,
                   B, N, D, s_ub, s_ud, s_vn, s_vd, s_cp,
                   NUM_PROGS, CB_PER, HAS_COL: tl.constexpr, HAS_LABELS: tl.constexpr,
                   EXCL_DIAG: tl.constexpr, EXCL_POS: tl.constexpr, MULTI_POS: tl.constexpr,
                   SPLIT: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """SPLIT: program (pid, sid) takes column blocks [sid * CB_PER, (sid + 1) * CB_PER) of its
    row blocks (more programs where B has few row blocks) and writes its rows' partial
    statistics (max, linear sum, positive's sum, count) to ROW_STATS[sid] ([splits, 4, B]),
    which merge_row_partials merges. Its columns' partials go to COL_M/COL_L[pid] as without
    SPLIT: no other program of row pid has them."""
    pid = tl.program_id(0)
    # Work in the log2 domain: exp2 is the native instruction.
    s2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    if SPLIT:
        sid = tl.program_id(1)
        cb_lo = sid * CB_PER
        cb_hi = tl.minimum(cb_lo + CB_PER, tl.cdiv(N, BN))
        RS = ROW_STATS + sid * 4 * B
    else:
        cb_lo = 0
        cb_hi = tl.cdiv(N, BN)
        RS = ROW_STATS
    for rb in range(pid, tl.cdiv(B, BM), NUM_PROGS):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B
        y, rcls = _label_and_class(LABELS, ROW_CLS, rows, rmask, HAS_LABELS, MULTI_POS)
        m_i = tl.full((BM,), -3.4028234663852886e38, tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        pos = tl.zeros((BM,), tl.float32)
        cnt = tl.zeros((BM,), tl.float32)
        for cb in range(cb_lo, cb_hi):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < N
            acc = _score_tile(U, V, rows, cols, rmask, cmask, D, s_ud, s_ub, s_vd, s_vn,
                              BM, BN, BK, PREC)
            valid = rmask[:, None] & cmask[None, :]
            z = acc * s2
            is_pos = cols[None, :] == y[:, None]
            # The positive logit from this very tile, so that (max - pos) is exact when the
            # positive is the row maximum, as in a naive log-softmax.
            if MULTI_POS:  # every other column of the same class; class ids compared here
                ccls = tl.load(COL_CLS + cols, mask=cmask, other=-2)
                pm = valid & (ccls[None, :] == rcls[:, None]) & (cols[None, :] != rows[:, None])
                pos += tl.sum(tl.where(pm, z, 0.0), 1)
                cnt += tl.sum(pm.to(tl.float32), 1)
            else:
                pos += tl.sum(tl.where(is_pos & valid, z, 0.0), 1)
            keep = _keep(valid, rows[:, None], cols[None, :], is_pos, EXCL_DIAG, EXCL_POS)
            z = tl.where(keep, z, -3.4028234663852886e38)
            m_new = tl.maximum(m_i, tl.max(z, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.where(keep, tl.exp2(z - m_new[:, None]), 0.0), 1)
            m_i = m_new
            if HAS_COL:
                cm = tl.max(z, 0)
                cl = tl.sum(tl.exp2(z - cm[None, :]), 0)
                cptr = pid * s_cp + cols
                m_old = tl.load(COL_M + cptr, mask=cmask, other=-3.4028234663852886e38)
                l_old = tl.load(COL_L + cptr, mask=cmask, other=0.0)
                m2 = tl.maximum(m_old, cm)
                l2 = l_old * tl.exp2(m_old - m2) + cl * tl.exp2(cm - m2)
                tl.store(COL_M + cptr, m2, mask=cmask)
                tl.store(COL_L + cptr, l2, mask=cmask)
        if SPLIT:  # this split's part: merge_row_partials takes the log and the mean
            tl.store(RS + B + rows, l_i, mask=rmask)
        else:
            if MULTI_POS:  # mean positive logit; rows without positives get 0 (and count 0)
                pos = tl.where(cnt > 0, pos / tl.maximum(cnt, 1.0), 0.0)
            else:
                cnt += 1.0
            tl.store(RS + B + rows, tl.log2(tl.where(rmask, l_i, 1.0)), mask=rmask)
        # ROW_STATS rows: max, log2(sum), positive logit (log2 units), number of positives.
        tl.store(RS + rows, m_i, mask=rmask)
        tl.store(RS + 2 * B + rows, pos, mask=rmask)
        tl.store(RS + 3 * B + rows, cnt, mask=rmask)


@triton.jit
def _row_side(ROW_STATS, GR, LABELS, ROW_CLS, idx, mask, B, HAS_LABELS: tl.constexpr,
              MULTI_POS: tl.constexpr):
    """Per-row-of-S data for the backward: max, log-sum (log2 units), upstream grad, label,
    positive logit, 1/number of positives, class id."""
    m2 = tl.load(ROW_STATS + idx, mask=mask, other=0.0)
    l2 = tl.load(ROW_STATS + B + idx, mask=mask, other=0.0)
    pos = tl.load(ROW_STATS + 2 * B + idx, mask=mask, other=0.0)
    inv_cnt = 1.0 / tl.maximum(tl.load(ROW_STATS + 3 * B + idx, mask=mask, other=1.0), 1.0)
    g = tl.load(GR + idx, mask=mask, other=0.0)
    y, cls = _label_and_class(LABELS, ROW_CLS, idx, mask, HAS_LABELS, MULTI_POS)
    return m2, l2, g, y, pos, inv_cnt, cls


@triton.jit
def _col_side(COL_STATS, GC, ROW_STATS, idx, mask, N, B):
    """Per-column-of-S data (symmetric only; N == B): max, log-sum, upstream grad, S_jj."""
    m2 = tl.load(COL_STATS + idx, mask=mask, other=0.0)
    l2 = tl.load(COL_STATS + N + idx, mask=mask, other=0.0)
    g = tl.load(GC + idx, mask=mask, other=0.0)
    pos = tl.load(ROW_STATS + 2 * B + idx, mask=mask, other=0.0)  # column j's positive is S_jj
    return m2, l2, g, pos


@triton.jit
def grad_kernel(A, Bm, SCALE, AMP, ROW_STATS, COL_STATS, GR, GC, LABELS, ROW_CLS, COL_CLS, DA, DSCALE, CTR,
                MA, MB, D, B, N, s_am, s_ad, s_bm, s_bd, POS_W, UNI_W, CB_PER, s_split,
                TRANSPOSED: tl.constexpr, HAS_COL: tl.constexpr, HAS_LABELS: tl.constexpr, SMOOTH: tl.constexpr,
                EXCL_DIAG: tl.constexpr, EXCL_POS: tl.constexpr, MULTI_POS: tl.constexpr, SPLIT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                ONE_SLAB: tl.constexpr, SAME_CHUNKS: tl.constexpr, FWD_ORIENT: tl.constexpr,
                PREC: tl.constexpr):
    """dA[a] = s * sum_b G[a, b] * Bm[b] for a block of BM rows of A.

    TRANSPOSED=False: A = U (queries), Bm = V, G[a, b] = G_ab     -> dU, d scale's row term
    TRANSPOSED=True:  A = V (keys),    Bm = U, G[a, b] = G_ba     -> dV, d scale's column term
    G uses the row AND the column statistics in the same recompute. The positive (and the
    diagonal) use the forward's stored logit, not the recomputed one, so that P - 1 stays
    exact however the tile shapes round differently from the forward's. With column
    statistics (CLIP: no labels, no exclusions) the positive IS the diagonal, S_ii, which is both
    row i's and column i's stored positive: each launch reads it from its own side, loaded once
    per program, instead of the other side's once per tile (registers: the backward spills).
    DSCALE[pid] gets this program's d scale term (each G term times <u_i, v_j>, summed).
    SMOOTH (label smoothing; no exclusions or class ids): the target is POS_W = 1 - eps on the
    positive (the diagonal for the column term) plus UNI_W = eps / N on every column, and d
    scale centres row i (column j) on CTR[i] (CTR[B + j]), the target's mean of it
    (fastcl.chunked.smoothing_centres), instead of on the positive.
    SPLIT: program (pid, sid) sums over Bm's blocks [sid * CB_PER, (sid + 1) * CB_PER) only, into
    the fp32 partial DA[sid] (s_split elements apart; the launcher adds them up) and d scale's
    DSCALE[sid * programs + pid]: more programs where A has few row blocks.
    """
    pid = tl.program_id(0)
    if SPLIT:  # (the outputs' offsets are taken where they are written: registers are scarce)
        b_lo = tl.program_id(1) * CB_PER * BN
        b_hi = tl.minimum(b_lo + CB_PER * BN, MB)
    else:
        b_lo = 0
        b_hi = MB
    s = tl.load(SCALE).to(tl.float32)
    s2 = s * 1.4426950408889634
    # G goes through the tensor cores in the input dtype. A power of two (exact) lifts it out of
    # fp16's subnormal range, where mean-reduced entries (~s * P_ij / B) would lose their digits.
    amp = tl.load(AMP)
    a_idx = pid * BM + tl.arange(0, BM)
    amask = a_idx < MA
    if TRANSPOSED:
        if HAS_COL:
            cm2, cl2, gc, posc = _col_side(COL_STATS, GC, ROW_STATS, a_idx, amask, N, B)
            CM, CL, GCv, POSC = cm2[:, None], cl2[:, None], gc[:, None], posc[:, None]
            CTR_A = tl.load(CTR + B + a_idx, mask=amask, other=0.0)[:, None] if SMOOTH else POSC
        C_IDX = a_idx[:, None]
        if MULTI_POS:
            CCLS = tl.load(COL_CLS + a_idx, mask=amask, other=-2)[:, None]
    else:
        rm2, rl2, gr, y, posr, icnt, rcls = _row_side(ROW_STATS, GR, LABELS, ROW_CLS, a_idx, amask, B,
                                                      HAS_LABELS, MULTI_POS)
        RM, RL, GRv, Y, POSR = rm2[:, None], rl2[:, None], gr[:, None], y[:, None], posr[:, None]
        ICNT, RCLS = icnt[:, None], rcls[:, None]
        R_IDX = a_idx[:, None]
        # d scale's centre of each row: the positive, or with smoothing the target's mean
        CTR_A = tl.load(CTR + a_idx, mask=amask, other=0.0)[:, None] if SMOOTH else POSR
    # d scale summed per row as each tile is done: a [BM, BN] accumulator would hold 16 more
    # registers per thread across the loop, and at BD = 512 the [BM, BD] gradient accumulator
    # takes half of them already (spills per tile: scripts/triton_resources.py, RESULTS.md).
    dscale = tl.zeros((BM,), tl.float32)
    for d0 in range(0, D, BD):  # one pass when D <= BD; else S is recomputed per D-slab
        ds_ = d0 + tl.arange(0, BD)
        dmask = ds_ < D
        acc_da = tl.zeros((BM, BD), tl.float32)
        if ONE_SLAB and not SAME_CHUNKS:  # A's rows read once; each B tile serves both dots
            at = tl.load(A + a_idx[:, None] * s_am + ds_[None, :] * s_ad,
                         mask=amask[:, None] & dmask[None, :], other=0.0)
        for b0 in range(0, b_hi - b_lo, BN):
            b_idx = b_lo + b0 + tl.arange(0, BN)
            bmask = b_idx < MB
            if TRANSPOSED:
                rm2, rl2, gr, y, posr, icnt, rcls = _row_side(ROW_STATS, GR, LABELS, ROW_CLS, b_idx, bmask,
                                                              B, HAS_LABELS, MULTI_POS)
                RM, RL, GRv, Y, POSR = rm2[None, :], rl2[None, :], gr[None, :], y[None, :], posr[None, :]
                if HAS_COL:  # the positive is the diagonal: row j's positive is column j's
                    POSR = POSC
                ICNT, RCLS = icnt[None, :], rcls[None, :]
                R_IDX = b_idx[None, :]
            else:
                if HAS_COL:
                    cm2, cl2, gc, posc = _col_side(COL_STATS, GC, ROW_STATS, b_idx, bmask, N, B)
                    CM, CL, GCv, POSC = cm2[None, :], cl2[None, :], gc[None, :], posc[None, :]
                C_IDX = b_idx[None, :]
                if MULTI_POS:
                    CCLS = tl.load(COL_CLS + b_idx, mask=bmask, other=-2)[None, :]
            bt = tl.load(Bm + b_idx[:, None] * s_bm + ds_[None, :] * s_bd,
                         mask=bmask[:, None] & dmask[None, :], other=0.0)
            if ONE_SLAB and not SAME_CHUNKS:
                acc = tl.dot(at, tl.trans(bt), input_precision=PREC)
            elif TRANSPOSED and FWD_ORIENT:  # S^T as the forward formed S: U rows by V columns
                acc = tl.trans(_score_tile(Bm, A, b_idx, a_idx, bmask, amask, D, s_bd, s_bm, s_ad, s_am,
                                           BN, BM, BK, PREC))
            else:  # the forward's own chunks of BK: S recomputed as the forward rounded it
                acc = _score_tile(A, Bm, a_idx, b_idx, amask, bmask, D, s_ad, s_am, s_bd, s_bm,
                                  BM, BN, BK, PREC)
            z = acc * s2
            valid = amask[:, None] & bmask[None, :]
            is_pos = C_IDX == Y
            keep = _keep(valid, R_IDX, C_IDX, is_pos, EXCL_DIAG, EXCL_POS)
            if MULTI_POS:
                ind = tl.where((CCLS == RCLS) & (R_IDX != C_IDX), ICNT, 0.0)
                # No single stored positive to reuse. A recompute that rounds S as the forward
                # did (SAME_CHUNKS) needs nothing. The one-dot recompute (16-bit on a GPU) snaps
                # a logit within its rounding (2^-20 relative) of the forward's row max back onto
                # it, so that P - 1/|P(i)| keeps its digits when a positive is the maximum. That
                # snap also erases real gaps that small (near-duplicate positives: 7-15x naive
                # fp32's gradient error), within 16-bit inputs' budget but not fp32's.
                dz = z - RM
                if not SAME_CHUNKS:
                    dz = tl.where(dz > -9.5367431640625e-07 * tl.maximum(tl.abs(RM), 1.0), 0.0, dz)
                p = tl.where(keep, tl.exp2(dz - RL), 0.0)
            else:
                if SMOOTH:
                    ind = tl.where(is_pos, POS_W, 0.0) + UNI_W
                else:
                    ind = is_pos.to(tl.float32)
                p = tl.where(keep, tl.exp2((tl.where(is_pos, POSR, z) - RM) - RL), 0.0)
            g = GRv * (p - ind)
            # d scale = sum G_ij <u_i, v_j>, in log2 units here (/ s2 at the end). Rows of the
            # row term and columns of the column term sum to 0 exactly, so centring on the
            # positive keeps the rounding of <u_i, v_j> out of d scale. The dU launch sums the
            # row term, the dV launch the column term: each has its positive loaded once.
            if not TRANSPOSED:
                ds_tile = g * (z - CTR_A)
            if HAS_COL:
                is_diag = R_IDX == C_IDX
                # On the diagonal, column j's stored positive S_jj is row j's (is_pos == is_diag),
                # and POSR holds it from this launch's own side (dV: POSR = POSC above).
                q = tl.exp2((tl.where(is_diag, POSR, z) - CM) - CL)
                if SMOOTH:
                    gq = GCv * (tl.where(is_diag, q - POS_W, q) - UNI_W)
                else:
                    gq = GCv * tl.where(is_diag, q - 1.0, q)
                g += gq
                if TRANSPOSED:
                    ds_tile = gq * (z - CTR_A)
            g = tl.where(valid, g * (s * amp), 0.0)
            if (not TRANSPOSED) or HAS_COL:
                if d0 == 0:
                    dscale += tl.sum(tl.where(valid, ds_tile, 0.0), 1)
            acc_da = tl.dot(g.to(Bm.dtype.element_ty), bt, acc_da, input_precision=PREC)
        out = DA + tl.program_id(1) * s_split if SPLIT else DA
        tl.store(out + a_idx[:, None] * D + ds_[None, :], acc_da / amp,
                 mask=amask[:, None] & dmask[None, :])
    if (not TRANSPOSED) or HAS_COL:
        at_ = pid + tl.program_id(1) * tl.num_programs(0) if SPLIT else pid
        tl.store(DSCALE + at_, tl.sum(dscale, 0) / s2)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are validated by fastcl; these only pick tile shapes and allocate buffers.
# ----------------------------------------------------------------------------------------------
import os  # noqa: E402

import torch  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from .._common import grad_amp  # noqa: E402
from ..chunked import smoothing_centres, smoothing_weights  # noqa: E402


def interpreting() -> bool:
    """True when these kernels run in Triton's CPU interpreter. triton.jit read
    TRITON_INTERPRET when this module was imported; the variable's value now may differ."""
    return type(lse_fwd_kernel).__name__ == "InterpretedFunction"


FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for fp32 operands (16-bit operands ignore it).

    TF32 only when the user opted in to it for torch's matmuls. Otherwise 3xTF32: each operand
    is split into a TF32 part and a TF32 remainder and three tensor-core products are summed
    (the remainder x remainder one, below fp32 rounding, is dropped). That is as accurate as
    fp32 FMAs here (the float64 tests hold it to the same budget as torch's fp32 matmul) at
    tensor-core speed; plain IEEE FMAs ran at 0.5 TFLOP/s on an H100 (benchmarks/RESULTS.md).
    FASTCL_TRITON_FP32=ieee (or tf32) overrides the choice."""
    if dtype != torch.float32:
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    prec = os.environ.get("FASTCL_TRITON_FP32", "tf32x3")
    if prec not in FP32_PRECISIONS:
        raise ValueError(f"FASTCL_TRITON_FP32={prec!r}: expected one of {', '.join(FP32_PRECISIONS)}")
    return prec


def _env_int(name, default):
    return int(os.environ.get(name, default))


def _config(device: torch.device, backward: bool):
    if interpreting() or device.type != "cuda":
        # Small tiles so that tests with small B and D still cross tile and D-slab boundaries.
        cfg = dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=1)
        return dict(cfg, BD_MAX=64) if backward else cfg
    if backward:
        # FASTCL_BWD_* let the GPU script compare tile shapes in one run.
        return dict(BM=_env_int("FASTCL_BWD_BM", 64), BN=_env_int("FASTCL_BWD_BN", 64),
                    BK=64, BD_MAX=_env_int("FASTCL_BWD_BD", 512),
                    num_warps=_env_int("FASTCL_BWD_WARPS", 8), num_stages=_env_int("FASTCL_BWD_STAGES", 2))
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def backward_config(device: torch.device, dtype: torch.dtype, D: int) -> dict:
    """grad_kernel's launch config for D-wide operands: tiles, warps, stages, the D-slab BD and
    whether one slab covers D (ONE_SLAB)."""
    cfg = _config(device, backward=True)
    # fp32 operands take twice the shared memory of 16-bit ones: halve the D-slab.
    bd_max = cfg.pop("BD_MAX") // (2 if dtype == torch.float32 else 1)
    cfg["BD"] = min(bd_max, max(16, triton.next_power_of_2(D)))
    cfg["ONE_SLAB"] = D <= cfg["BD"]
    # P_ij = exp(S_ij - the forward's log-sum-exp) sums to 1 only if S is recomputed as the
    # forward rounded it; the logit scale multiplies any difference (10x naive fp32's gradient
    # error at scale 100, RESULTS.md). One dot over the slab sums in another order than the
    # forward's BK chunks where the products are split (3xTF32) or the interpreter's numpy
    # matmul blocks them; 16-bit tensor-core dots accumulate k in order either way.
    # FASTCL_BWD_SAME_CHUNKS=0/1 overrides (the GPU script times both).
    same = dtype == torch.float32 or interpreting() or device.type != "cuda"
    cfg["SAME_CHUNKS"] = os.environ.get("FASTCL_BWD_SAME_CHUNKS", "1" if same else "0") == "1"
    # The dV launch recomputes S^T = V U^T. The interpreter's numpy matmul does not always round
    # that as the transpose of U V^T: OpenBLAS's Haswell/Zen sgemm kernels differ in the last
    # bit (its SkylakeX kernels agree), which gave 6x naive's dV error at scale 100 on AMD CPUs.
    # So the interpreter forms U V^T, with the forward's tile shapes (BM == BN there), and
    # transposes it. A GPU's MMA sums each k-step in one fixed order whichever operand is A.
    cfg["FWD_ORIENT"] = interpreting()
    return cfg


# The tile configs are sized for an H100 (227 KB of shared memory per block). A GPU with less
# (A100: 163 KB; sm_86/89 cards: 99 KB) makes Triton raise OutOfResources when the kernel is
# loaded, before anything runs, so a smaller config can simply be tried next. Only the pipeline
# depth and the backward's recompute change down the ladder: tile shapes, and with them the
# grid and the buffers sized from it, stay.
_FITS = {}  # (kernel, device, dtype, launch config) -> the first config of its ladder that loaded


def _ladder(cfg: dict) -> list:
    """cfg, then configs needing less shared memory (the backward's chunked recompute, whose
    operand tiles are BK wide instead of a whole D-slab, where cfg has one dot; fewer stages)."""
    out = [cfg]
    if cfg.get("SAME_CHUNKS") is False:  # only the backward's config has the choice
        out.append(dict(cfg, SAME_CHUNKS=True))
    for stages in range(cfg["num_stages"] - 1, 0, -1):
        out.append(dict(out[-1], num_stages=stages))
    return out


def _launch(kernel, grid, args, kwargs, cfg, device, dtype):
    """kernel[grid](*args, **kwargs, **config) with the first config of cfg's ladder that this GPU
    can load (remembered per kernel, device, dtype and config); the config used is returned."""
    key = (kernel, str(device), dtype, tuple(sorted(kwargs.items())), tuple(sorted(cfg.items())))
    ladder = [_FITS[key]] if key in _FITS else _ladder(cfg)
    for i, c in enumerate(ladder):
        try:
            kernel[grid](*args, **kwargs, **c)
        except OutOfResources:
            if i == len(ladder) - 1:
                raise
            continue
        _FITS[key] = c
        return c


def _flags(symmetric, labels, row_cls, exclude_diag, exclude_pos, dtype) -> dict:
    """The kernels' shared compile-time flags for one call of the op."""
    return dict(HAS_COL=symmetric, HAS_LABELS=labels is not None, EXCL_DIAG=exclude_diag,
                EXCL_POS=exclude_pos, MULTI_POS=row_cls is not None, PREC=_precision(dtype))


def _num_programs(device: torch.device, n_row_blocks: int) -> int:
    if device.type == "cuda":
        cap = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 2  # the interpreter: still exercises several row blocks per program
    return max(1, min(n_row_blocks, cap))


# A split backward's fp32 partial gradients, [splits, rows, D], stay under this many elements
# (128 MiB): splits are for batches with few row blocks, whose partials are small.
SPLIT_ELEMENTS = 1 << 25


def _splits(device: torch.device, programs: int, col_blocks: int, partial: int = 0):
    """(splits, column blocks per split) for a launch of `programs` row programs over
    `col_blocks` column blocks: with split-K over the columns (flash-decoding's), a batch with
    few row blocks still fills the GPU (B = 4096 has 32 forward row blocks for an H100's 132
    SMs). FASTCL_TRITON_SPLIT: "1" (the default until a GPU has timed it), an integer, or
    "auto" (two programs per SM, as the forward's persistent grid). partial: elements of one
    split's partial output (the backward's rows x D), the splits' total kept to SPLIT_ELEMENTS."""
    want = os.environ.get("FASTCL_TRITON_SPLIT", "1")
    if want == "auto":
        n = -(-_num_programs(device, 1 << 30) // max(programs, 1))
    elif want.isdigit() and int(want) >= 1:
        n = int(want)
    else:
        raise ValueError(f"FASTCL_TRITON_SPLIT={want!r}: expected a positive integer or 'auto'")
    if partial:
        n = min(n, SPLIT_ELEMENTS // partial)
    n = max(1, min(n, col_blocks))
    per = -(-col_blocks // n) if col_blocks else 1
    return (-(-col_blocks // per) if col_blocks else 1), per


def _merge_lse(m: torch.Tensor, lsum: torch.Tensor):
    """(max, sum) over dim 0 of partial (max, sum relative to it) pairs, log2 units: the
    online log-sum-exp's merge, for the partials of programs (columns) and of splits (rows)."""
    top = m.amax(dim=0)
    return top, (lsum * torch.exp2(m - top)).sum(dim=0)


def merge_row_partials(part: torch.Tensor, multi_pos: bool) -> torch.Tensor:
    """row_stats [4, B] from a split forward's partials [splits, 4, B] (max, linear sum,
    positive's sum, count; log2 units): the log-sum-exp merge the kernel does across its own
    column blocks, then the mean over the positives as the kernel takes it."""
    # A split whose columns were all masked has max NEG and sum 0; exp2 of NEG - top is 0.
    top, lsum = _merge_lse(part[:, 0], part[:, 1])
    pos, cnt = part[:, 2].sum(dim=0), part[:, 3].sum(dim=0)
    if multi_pos:  # rows without positives get 0 (and count 0)
        pos = torch.where(cnt > 0, pos / cnt.clamp_min(1.0), 0.0)
    else:
        cnt = torch.ones_like(cnt)
    return torch.stack([top, torch.log2(lsum), pos, cnt])


def check_int32_offsets(*tensors):
    """The kernels index with int32: refuse shapes whose element offsets would wrap."""
    for t in tensors:
        if t.shape[0] * max(t.stride(0), 1) + t.shape[1] * max(t.stride(1), 1) >= 2**31:
            raise ValueError(f"a [{t.shape[0]}, {t.shape[1]}] operand exceeds the Triton kernels' int32 "
                             f"offsets (2^31 elements); use backend='torch' or split the batch")


def lse_forward(u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, labels, symmetric: bool,
                row_cls=None, col_cls=None, exclude_diag=False, exclude_pos=False):
    """(row_loss [B], col_loss [N] or [0], row_stats [4, B], col_stats [2, N] or [2, 0]), float32.

    row_loss_i = logsumexp_{j in J_i} S_ij - pos_i, where J_i is every column except i
    (exclude_diag) and y_i (exclude_pos), and pos_i = S_{i,y_i}, or with class ids the mean of
    S_ij over j != i with col_cls[j] == row_cls[i]. col_loss_j = logsumexp_i S_ij - S_jj
    (symmetric, no exclusions). The stats (max, log-sum in log2 units, positive, number of
    positives) are what lse_backward needs.
    """
    check_int32_offsets(u, v)
    B, D = u.shape
    N = v.shape[0]
    cfg = _config(u.device, backward=False)
    n_rb = triton.cdiv(B, cfg["BM"])
    P = _num_programs(u.device, n_rb)
    splits, per = _splits(u.device, P, triton.cdiv(N, cfg["BN"]))
    # Poisoned: a row the kernel fails to write shows up as NaN, not as a plausible number.
    row_stats = torch.full((4, B) if splits == 1 else (splits, 4, B), float("nan"), device=u.device,
                           dtype=torch.float32)
    if symmetric:
        col_m = torch.full((P, N), NEG, device=u.device, dtype=torch.float32)
        col_l = torch.zeros((P, N), device=u.device, dtype=torch.float32)
    else:
        col_m = col_l = row_stats  # unused placeholders
    args = (u, v, scale, row_stats if labels is None else labels,
            row_stats if row_cls is None else row_cls, row_stats if col_cls is None else col_cls,
            row_stats, col_m, col_l, B, N, D,
            u.stride(0), u.stride(1), v.stride(0), v.stride(1), col_m.stride(0) if symmetric else 0, P, per)
    flags = dict(_flags(symmetric, labels, row_cls, exclude_diag, exclude_pos, u.dtype), SPLIT=splits > 1)
    _launch(lse_fwd_kernel, (P, splits), args, flags, cfg, u.device, u.dtype)
    if splits > 1:
        row_stats = merge_row_partials(row_stats, row_cls is not None)
    m, logl, pos = row_stats[:3]
    row_loss = ((m - pos) + logl) * LN2
    if not symmetric:
        return row_loss, row_loss.new_empty(0), row_stats, row_stats.new_empty(2, 0)
    # Merge the P partial column statistics; the positive of column j is S_jj = row j's.
    cm, cl = _merge_lse(col_m, col_l)
    col_stats = torch.stack([cm, torch.log2(cl)])
    col_loss = ((cm - pos) + col_stats[1]) * LN2
    return row_loss, col_loss, row_stats, col_stats


def lse_backward(u, v, scale, row_stats, col_stats, g_row, g_col, labels, symmetric: bool,
                 row_cls=None, col_cls=None, exclude_diag=False, exclude_pos=False, smoothing=0.0):
    """dU [B, D], dV [N, D] (input dtype), d scale [] (float32) of sum_i g_row_i*row_loss_i
    (+ sum_j g_col_j*col_loss_j if symmetric), from lse_forward's stats.

    smoothing: label smoothing's eps (no exclusions or class ids), in G's targets.
    Two launches of one kernel: dU over row blocks, dV over column blocks; each recomputes S
    and uses row and column statistics together. Measured faster than a single pass that
    accumulates dU with atomics (see benchmarks/RESULTS.md).
    """
    B, D = u.shape
    N = v.shape[0]
    if symmetric and (labels is not None or row_cls is not None or exclude_diag or exclude_pos):
        # grad_kernel takes row i's positive to be the diagonal S_ii when there are column terms.
        raise ValueError("symmetric: the positive of row i is column i (no labels, class ids or exclusions)")
    cfg = backward_config(u.device, u.dtype, D)
    n_rb = triton.cdiv(B, cfg["BM"])
    n_cb = triton.cdiv(N, cfg["BM"])
    # dU's programs split over N's blocks, dV's over B's (one split each unless asked: _splits)
    su, per_u = _splits(u.device, n_rb, triton.cdiv(N, cfg["BN"]), B * D)
    sv, per_v = _splits(u.device, n_cb, triton.cdiv(B, cfg["BN"]), N * D)
    # Poisoned outputs: every element must be written by the kernels. A split launch writes
    # fp32 partials [splits, rows, D], added up below.
    du_out, dv_out = (torch.full((n, D) if sp == 1 else (sp, n, D), float("nan"), device=u.device,
                                 dtype=x.dtype if sp == 1 else torch.float32)
                      for sp, n, x in ((su, B, u), (sv, N, v)))
    # One d scale partial per program: dU's programs write the row term, dV's the column term.
    dscale = torch.full((n_rb * su + (n_cb * sv if symmetric else 0),), float("nan"), device=u.device,
                        dtype=torch.float32)
    g_row = g_row.float().contiguous()
    g_col = g_col.float().contiguous() if symmetric else g_row
    lab = g_row if labels is None else labels
    rcls = g_row if row_cls is None else row_cls
    ccls = g_row if col_cls is None else col_cls
    amp = grad_amp(scale, g_row, g_col if symmetric else None)
    pos_w, uni_w = smoothing_weights(smoothing, N)
    flags = dict(_flags(symmetric, labels, row_cls, exclude_diag, exclude_pos, u.dtype), SMOOTH=bool(uni_w))
    ctr = (smoothing_centres(u, v, scale, row_stats[2], labels, symmetric, smoothing, LOG_UNIT).float()
           if uni_w else g_row)  # else a placeholder, never read
    _launch(grad_kernel, (n_rb, su),
            (u, v, scale, amp, row_stats, col_stats, g_row, g_col, lab, rcls, ccls, du_out, dscale, ctr,
             B, N, D, B, N, u.stride(0), u.stride(1), v.stride(0), v.stride(1), pos_w, uni_w, per_u, B * D),
            dict(flags, TRANSPOSED=False, SPLIT=su > 1), cfg, u.device, u.dtype)
    _launch(grad_kernel, (n_cb, sv),
            (v, u, scale, amp, row_stats, col_stats, g_row, g_col, lab, rcls, ccls, dv_out, dscale[n_rb * su:],
             ctr, N, B, D, B, N, v.stride(0), v.stride(1), u.stride(0), u.stride(1), pos_w, uni_w, per_v, N * D),
            dict(flags, TRANSPOSED=True, SPLIT=sv > 1), cfg, u.device, u.dtype)
    du = du_out if su == 1 else du_out.sum(dim=0).to(u.dtype)
    dv = dv_out if sv == 1 else dv_out.sum(dim=0).to(v.dtype)
    return du, dv, dscale.sum()
