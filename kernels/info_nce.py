"""Triton kernels for the fused log-sum-exp core of InfoNCE.

The op computes, for S = s * U @ V^T (U: [B, D], V: [N, D]) without ever storing S:
  row_lse[i] = log sum_j exp(S_ij)                 (always)
  col_lse[j] = log sum_i exp(S_ij)                 (symmetric / CLIP only)
and its backward, given upstream gradients gr = dL/drow_lse and gc = dL/dcol_lse:
  G_ij = gr_i * exp(S_ij - row_lse_i) + gc_j * exp(S_ij - col_lse_j)
  dU = s * G @ V,  dV = s * G^T @ U
Everything O(B*D) (positive logits, normalisation, reductions, d scale) is done by the
caller in torch, identically for every backend.

Forward: one pass over the tiles. Programs are persistent over row blocks: each one keeps its
rows' online max/sum in registers and merges its column statistics into its own row of a
[P, N] buffer (no atomics, memory linear in N); the caller merges the P partials.
Backward: one recompute pass. Each program owns a column block: dV is accumulated in its own
fp32 slice of global memory, dU with relaxed fp32 atomics.
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Finite stand-in for -inf in masked lanes: keeps (x - max) free of inf - inf = NaN.
NEG = -1.0e30


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
def lse_fwd_kernel(U, V, SCALE, ROW_LSE, COL_M, COL_L,
                   B, N, D, s_ub, s_ud, s_vn, s_vd, s_cp,
                   NUM_PROGS, HAS_COL: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    # Work in the log2 domain: exp2 is the native instruction.
    s2 = tl.load(SCALE).to(tl.float32) * 1.4426950408889634
    for rb in range(pid, tl.cdiv(B, BM), NUM_PROGS):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B
        m_i = tl.full((BM,), -1.0e30, tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        for cb in range(0, tl.cdiv(N, BN)):
            cols = cb * BN + tl.arange(0, BN)
            cmask = cols < N
            acc = _score_tile(U, V, rows, cols, rmask, cmask, D, s_ud, s_ub, s_vd, s_vn,
                              BM, BN, BK, PREC)
            z = tl.where(rmask[:, None] & cmask[None, :], acc * s2, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(z, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), 1)
            m_i = m_new
            if HAS_COL:
                cm = tl.max(z, 0)
                cl = tl.sum(tl.exp2(z - cm[None, :]), 0)
                cptr = pid * s_cp + cols
                m_old = tl.load(COL_M + cptr, mask=cmask, other=-1.0e30)
                l_old = tl.load(COL_L + cptr, mask=cmask, other=0.0)
                m2 = tl.maximum(m_old, cm)
                l2 = l_old * tl.exp2(m_old - m2) + cl * tl.exp2(cm - m2)
                tl.store(COL_M + cptr, m2, mask=cmask)
                tl.store(COL_L + cptr, l2, mask=cmask)
        tl.store(ROW_LSE + rows, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)


@triton.jit
def lse_bwd_kernel(U, V, SCALE, ROW_LSE, COL_LSE, GR, GC, DU, DV,
                   B, N, D, s_ub, s_ud, s_vn, s_vd,
                   HAS_COL: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    cb = tl.program_id(0)
    s = tl.load(SCALE).to(tl.float32)
    s2 = s * 1.4426950408889634
    cols = cb * BN + tl.arange(0, BN)
    cmask = cols < N
    if HAS_COL:
        c2 = tl.load(COL_LSE + cols, mask=cmask, other=0.0) * 1.4426950408889634
        gc = tl.load(GC + cols, mask=cmask, other=0.0)
    for rb in range(0, tl.cdiv(B, BM)):
        rows = rb * BM + tl.arange(0, BM)
        rmask = rows < B
        r2 = tl.load(ROW_LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
        gr = tl.load(GR + rows, mask=rmask, other=0.0)
        acc = _score_tile(U, V, rows, cols, rmask, cmask, D, s_ud, s_ub, s_vd, s_vn,
                          BM, BN, BK, PREC)
        z = acc * s2
        g = gr[:, None] * tl.exp2(z - r2[:, None])
        if HAS_COL:
            g += gc[None, :] * tl.exp2(z - c2[None, :])
        g = tl.where(rmask[:, None] & cmask[None, :], g * s, 0.0)
        g = g.to(U.dtype.element_ty)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < D
            u = tl.load(U + rows[:, None] * s_ub + ks[None, :] * s_ud,
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            v = tl.load(V + cols[:, None] * s_vn + ks[None, :] * s_vd,
                        mask=cmask[:, None] & kmask[None, :], other=0.0)
            du = tl.dot(g, v, input_precision=PREC)
            tl.atomic_add(DU + rows[:, None] * D + ks[None, :], du,
                          mask=rmask[:, None] & kmask[None, :], sem="relaxed")
            dv_ptr = DV + cols[:, None] * D + ks[None, :]
            dmask = cmask[:, None] & kmask[None, :]
            dv = tl.dot(tl.trans(g), u, input_precision=PREC)
            tl.store(dv_ptr, tl.load(dv_ptr, mask=dmask, other=0.0) + dv, mask=dmask)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are validated by fastcl; these only pick tile shapes and allocate buffers.
# ----------------------------------------------------------------------------------------------
import os  # noqa: E402

import torch  # noqa: E402


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul setting, so fastcl is exactly as precise as the torch
    # code it replaces: IEEE by default, TF32 only when the user opted in.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _config(device: torch.device, backward: bool):
    if interpreting() or device.type != "cuda":
        # Small tiles so that tests with small B still cross tile boundaries.
        return dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=1)
    if backward:
        return dict(BM=64, BN=128, BK=64, num_warps=8, num_stages=2)
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def _num_programs(device: torch.device, n_row_blocks: int) -> int:
    if device.type == "cuda":
        cap = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 2  # the interpreter: still exercises several row blocks per program
    return max(1, min(n_row_blocks, cap))


def lse_forward(u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, symmetric: bool):
    """row_lse [B] (and col_lse [N] if symmetric, else an empty tensor), float32."""
    B, D = u.shape
    N = v.shape[0]
    cfg = _config(u.device, backward=False)
    n_rb = triton.cdiv(B, cfg["BM"])
    P = _num_programs(u.device, n_rb)
    # Poisoned: a row the kernel fails to write shows up as NaN, not as a plausible number.
    row = torch.full((B,), float("nan"), device=u.device, dtype=torch.float32)
    if symmetric:
        col_m = torch.full((P, N), NEG, device=u.device, dtype=torch.float32)
        col_l = torch.zeros((P, N), device=u.device, dtype=torch.float32)
    else:
        col_m = col_l = row  # unused placeholders
    lse_fwd_kernel[(P,)](
        u, v, scale, row, col_m, col_l, B, N, D,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), col_m.stride(0) if symmetric else 0,
        P, HAS_COL=symmetric, PREC=_precision(u.dtype), **cfg)
    if not symmetric:
        return row, row.new_empty(0)
    col = torch.logsumexp((col_m + torch.log2(col_l)) * LN2, dim=0)
    return row, col


def lse_backward(u, v, scale, row, col, g_row, g_col, symmetric: bool):
    """dU [B, D], dV [N, D] (float32) of sum_i g_row_i*row_lse_i + sum_j g_col_j*col_lse_j."""
    B, D = u.shape
    N = v.shape[0]
    cfg = _config(u.device, backward=True)
    du = torch.zeros((B, D), device=u.device, dtype=torch.float32)  # atomically accumulated
    dv = torch.zeros((N, D), device=u.device, dtype=torch.float32)  # owned per column block
    g_row = g_row.float().contiguous()
    g_col = g_col.float().contiguous() if symmetric else g_row
    col = col if symmetric else row
    lse_bwd_kernel[(triton.cdiv(N, cfg["BN"]),)](
        u, v, scale, row, col, g_row, g_col, du, dv, B, N, D,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1),
        HAS_COL=symmetric, PREC=_precision(u.dtype), **cfg)
    return du, dv
