"""Pure-torch backend of the log-sum-exp core: the Triton kernels' algorithm on row chunks.

Any device, any float dtype (16-bit inputs are computed in float32, float64 stays float64).
Peak extra memory is a few [chunk, N] buffers (chunk * N <= CHUNK_ELEMENTS) plus O((B+N)*D),
never B x N.
"""
import torch

# Statistics (max, log-sum) are natural logarithms; the Triton backend's are log2 (x LN2).
LOG_UNIT = 1.0

# Elements of one [chunk, N] score block; ~16 MB in float32. A few such blocks live at once.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(B: int, N: int):
    step = max(1, min(B, CHUNK_ELEMENTS // max(N, 1)))
    for i0 in range(0, B, step):
        yield i0, min(B, i0 + step)


def _tile_masks(S, i0, i1, labels, row_cls, col_cls, exclude_diag, exclude_pos):
    """keep [C, N]: logits in the log-sum-exp; ind [C, N]: weight of each logit in pos_i."""
    r = torch.arange(i0, i1, device=S.device)
    y = r if labels is None else labels[i0:i1]
    cols = torch.arange(S.shape[1], device=S.device)
    is_pos = cols[None, :] == y[:, None]
    keep = torch.ones_like(is_pos)
    if exclude_diag:
        keep &= cols[None, :] != r[:, None]
    if exclude_pos:
        keep &= ~is_pos
    if row_cls is None:
        return keep, is_pos, None
    same = (col_cls[None, :] == row_cls[i0:i1, None]) & (cols[None, :] != r[:, None])
    cnt = same.sum(dim=1)
    return keep, same.to(S.dtype) / cnt.clamp_min(1)[:, None], cnt


def lse_forward(u, v, scale, labels, symmetric: bool, row_cls=None, col_cls=None,
                exclude_diag=False, exclude_pos=False):
    """Same contract as fastcl.kernels.info_nce.lse_forward; stats in natural-log units."""
    cd = compute_dtype(u.dtype)
    U, V, s = u.to(cd), v.to(cd), scale.to(cd)
    B, N = U.shape[0], V.shape[0]
    row_stats = U.new_empty(4, B)  # max, log-sum relative to the max, positive logit, #positives
    col_m = U.new_full((N,), float("-inf")) if symmetric else None
    col_l = U.new_zeros(N) if symmetric else None
    for i0, i1 in _chunks(B, N):
        S = (U[i0:i1] @ V.T).mul_(s)
        keep, ind, cnt = _tile_masks(S, i0, i1, labels, row_cls, col_cls, exclude_diag, exclude_pos)
        if cnt is None:  # at most one positive per row (none if y is outside this key block)
            row_stats[2, i0:i1] = S.masked_fill(~ind, 0.0).sum(dim=1)
            row_stats[3, i0:i1] = 1.0
        else:
            row_stats[2, i0:i1] = (S * ind).sum(dim=1)
            row_stats[3, i0:i1] = cnt.to(cd)
        S.masked_fill_(~keep, float("-inf"))
        m = S.max(dim=1).values
        row_stats[0, i0:i1] = m
        if symmetric:
            cm = torch.maximum(col_m, S.max(dim=0).values)
            col_l = col_l * torch.exp(col_m - cm) + torch.exp(S - cm).sum(dim=0)
            col_m = cm
        row_stats[1, i0:i1] = torch.log(torch.exp(S.sub_(m[:, None])).sum(dim=1))
    m, logl, pos = row_stats[:3]
    # (max - pos) first: exact when the positive is the maximum, as in a naive log-softmax.
    row_loss = (m - pos) + logl
    if not symmetric:
        return row_loss, row_loss.new_empty(0), row_stats, row_stats.new_empty(2, 0)
    col_stats = torch.stack([col_m, torch.log(col_l)])
    return row_loss, (col_m - pos) + col_stats[1], row_stats, col_stats


def lse_backward(u, v, scale, row_stats, col_stats, g_row, g_col, labels, symmetric: bool,
                 row_cls=None, col_cls=None, exclude_diag=False, exclude_pos=False):
    """Same contract as fastcl.kernels.info_nce.lse_backward."""
    cd = compute_dtype(u.dtype)
    U, V, s = u.to(cd), v.to(cd), scale.to(cd)
    B, N = U.shape[0], V.shape[0]
    dU = torch.empty_like(U)
    dV = torch.zeros_like(V)
    g_row = g_row.to(cd)
    g_col = g_col.to(cd)
    dscale = U.new_zeros(())
    for i0, i1 in _chunks(B, N):
        C = U[i0:i1] @ V.T
        S = C * s
        r = torch.arange(i0, i1, device=U.device)
        keep, ind, cnt = _tile_masks(S, i0, i1, labels, row_cls, col_cls, exclude_diag, exclude_pos)
        if cnt is None:
            # The positive takes the forward's stored logit, so P - 1 is exact even if this
            # recompute rounds differently from the forward's.
            S = torch.where(ind, row_stats[2, i0:i1, None], S)
        P = torch.exp((S - row_stats[0, i0:i1, None]).sub_(row_stats[1, i0:i1, None]))
        P.masked_fill_(~keep, 0.0)
        P -= ind.to(P.dtype)  # the positives, subtracted element-wise (no cancellation later)
        G = P.mul_(g_row[i0:i1, None])
        # dL/ds = sum_ij G_ij <u_i, v_j>. Each row of the row term (column of the column term)
        # sums to 0 exactly, so centring <u_i, v_j> on the positive's value changes nothing
        # exactly but keeps the rounding of those sums out of d scale.
        dscale += (G * (C - row_stats[2, i0:i1, None] / s)).sum()
        if symmetric:
            S[r - i0, r] = row_stats[2, i0:i1]
            Q = torch.exp(S.sub_(col_stats[0]).sub_(col_stats[1]))
            Q[r - i0, r] -= 1.0
            Q.mul_(g_col)
            dscale += (Q * (C - row_stats[2] / s)).sum()
            G += Q
        G.mul_(s)
        dU[i0:i1] = G @ V
        dV.addmm_(G.T, U[i0:i1])
    return dU, dV, dscale
