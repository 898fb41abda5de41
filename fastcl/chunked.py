"""Pure-torch backend of the log-sum-exp core: the Triton kernels' algorithm on row chunks.

Any device, any float dtype (16-bit inputs are computed in float32, float64 stays float64).
Peak extra memory is a few [chunk, N] buffers (chunk * N <= CHUNK_ELEMENTS) plus O((B+N)*D),
never B x N. A row's positive and its excluded logits are single entries, reached by index
(O(chunk) work), so the [chunk, N] passes are only the ones the maths needs; only class ids
(several positives per row) take a [chunk, N] mask.
"""
import torch

# Statistics (max, log-sum) are natural logarithms; the Triton backend's are log2 (x LN2).
LOG_UNIT = 1.0

# Elements of one [chunk, N] score block; ~16 MB in float32. A few such blocks live at once.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def smoothing_weights(eps: float, n: int):
    """Label smoothing's target weights in G = P - target (every backend alike): the positive's
    1 - eps and every column's eps / n; (1.0, 0.0) without smoothing, which leaves G exact."""
    return (1.0 - eps, eps / n) if eps and n else (1.0, 0.0)


def smoothing_centres(u, v, scale, pos, labels, symmetric: bool, eps: float, unit: float):
    """Where d scale = sum_ij G_ij S_ij centres each row (column) of S with label smoothing, in
    the statistics' units (unit: their natural log, LOG_UNIT): the target's own mean of it,
    (1 - eps) S_iy + eps mean_j S_ij, or with the column term (1 - eps) S_jj + eps mean_i S_ij;
    [B + N] (N = 0 without the column term). A row of G sums to 0, so any centre leaves d scale
    exact; this one makes the target's part vanish too, which centring on the positive alone
    did not: the rounding of P's row sums then met a ~1/(1 - eps) larger remainder (d scale
    7-18x naive fp32's error at eps = 0.9). A row without a positive (a label outside [0, N):
    its G sums to 1 - eps) takes 0, no centring, as pos_i = 0 gives without smoothing."""
    cd = compute_dtype(u.dtype)
    U, V, s = u.to(cd), v.to(cd), scale.to(cd).reshape(())
    B, N = U.shape[0], V.shape[0]
    pos_w = 1.0 - eps
    mean = (U @ (V.sum(0) / max(N, 1))) * (s / unit)
    has = targets(0, B, labels, N, U.device)[1]  # without labels, rows i >= N have no positive
    row = torch.where(has, pos_w * pos.to(cd) + eps * mean, 0.0)
    if not symmetric:
        return row
    col = pos_w * pos.to(cd) + eps * (V @ (U.sum(0) / max(B, 1))) * (s / unit)  # S_jj = row j's positive
    return torch.cat([row, col])


def _chunks(B: int, N: int):
    step = max(1, min(B, CHUNK_ELEMENTS // max(N, 1)))
    for i0 in range(0, B, step):
        yield i0, min(B, i0 + step)


def targets(i0, i1, labels, N, device):
    """Rows i0..i1-1's positive column y_i (labels, else i), clamped into range, and whether it
    is a column of this key block ([C] bool; a distributed block may hold no positive)."""
    y = torch.arange(i0, i1, device=device) if labels is None else labels[i0:i1]
    return y.clamp(0, max(N - 1, 0))[:, None], (y >= 0) & (y < N)


def _put(X, y, has, value):
    """X[i, y_i] = value (a number or a [C] tensor) in the rows that have a positive here."""
    if not isinstance(value, torch.Tensor):
        value = torch.full((), value, dtype=X.dtype, device=X.device)
    X.scatter_(1, y, torch.where(has, value, X.gather(1, y)[:, 0])[:, None])


def _exclude(X, i0, y, has, exclude_diag, exclude_pos, value):
    """Write `value` over the logits that stay out of the log-sum-exp: self (NT-Xent, SupCon,
    DCL) at column i0 + row, the positive (DCL's decoupling) at y_i."""
    if exclude_diag:
        X.diagonal(i0).fill_(value)
    if exclude_pos:
        _put(X, y, has, value)


def _class_weights(i0, i1, row_cls, col_cls, dtype):
    """[C, N] weight of each logit in pos_i (1/|P(i)| on the other columns of row i's class)
    and the counts |P(i)| [C]."""
    same = col_cls[None, :] == row_cls[i0:i1, None]
    same.diagonal(i0).fill_(False)
    cnt = same.sum(dim=1)
    return same.to(dtype).div_(cnt.clamp_min(1)[:, None]), cnt


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
        # (U V^T) s, not (s U) V^T: rounding s * u_i shifts all of row i's logits alike, which
        # measurably biased d scale (1.7e-7 against 1.4e-8 relative error at tau = 0.07).
        S = (U[i0:i1] @ V.T).mul_(s)
        y, has = targets(i0, i1, labels, N, S.device)
        if row_cls is None:  # at most one positive per row (none if y is outside this key block)
            row_stats[2, i0:i1] = torch.where(has, S.gather(1, y)[:, 0], 0.0)
            row_stats[3, i0:i1] = 1.0
        else:
            ind, cnt = _class_weights(i0, i1, row_cls, col_cls, cd)
            row_stats[2, i0:i1] = (S * ind).sum(dim=1)
            row_stats[3, i0:i1] = cnt.to(cd)
        _exclude(S, i0, y, has, exclude_diag, exclude_pos, float("-inf"))
        m = S.amax(dim=1)
        row_stats[0, i0:i1] = m
        if symmetric:
            cm = torch.maximum(col_m, S.amax(dim=0))
            col_l = col_l * torch.exp(col_m - cm) + (S - cm).exp_().sum(dim=0)
            col_m = cm
        row_stats[1, i0:i1] = torch.log(S.sub_(m[:, None]).exp_().sum(dim=1))
    m, logl, pos = row_stats[:3]
    # (max - pos) first: exact when the positive is the maximum, as in a naive log-softmax.
    row_loss = (m - pos) + logl
    if not symmetric:
        return row_loss, row_loss.new_empty(0), row_stats, row_stats.new_empty(2, 0)
    col_stats = torch.stack([col_m, torch.log(col_l)])
    return row_loss, (col_m - pos) + col_stats[1], row_stats, col_stats


def lse_backward(u, v, scale, row_stats, col_stats, g_row, g_col, labels, symmetric: bool,
                 row_cls=None, col_cls=None, exclude_diag=False, exclude_pos=False, smoothing=0.0):
    """Same contract as fastcl.kernels.info_nce.lse_backward."""
    cd = compute_dtype(u.dtype)
    U, V, s = u.to(cd), v.to(cd), scale.to(cd)
    B, N = U.shape[0], V.shape[0]
    dU = torch.empty_like(U)
    dV = torch.zeros_like(V)
    g_row = g_row.to(cd)
    g_col = g_col.to(cd)
    m, logl, pos = row_stats[:3]
    dscale = U.new_zeros(())
    pos_w, uni_w = smoothing_weights(smoothing, N)
    # d scale's centres: the positive (exact 0 for rows without one), or smoothing's target mean.
    ctr_row, ctr_col = pos, pos
    if uni_w:
        ctr = smoothing_centres(U, V, s, pos, labels, symmetric, smoothing, LOG_UNIT)
        ctr_row, ctr_col = ctr[:B], ctr[B:]
    for i0, i1 in _chunks(B, N):
        S = (U[i0:i1] @ V.T).mul_(s)
        y, has = targets(i0, i1, labels, N, S.device)
        if row_cls is None:
            # The positive takes the forward's stored logit, so P - 1 is exact even if this
            # recompute rounds differently from the forward's.
            _put(S, y, has, pos[i0:i1])
        P = (S - m[i0:i1, None]).sub_(logl[i0:i1, None]).exp_()
        _exclude(P, i0, y, has, exclude_diag, exclude_pos, 0.0)
        if row_cls is None:  # the positives, subtracted element-wise (no cancellation later)
            P.scatter_add_(1, y, has[:, None].to(cd) * -pos_w)
            if uni_w:  # label smoothing's uniform target (no exclusions: every column)
                P.sub_(uni_w)
        else:
            P -= _class_weights(i0, i1, row_cls, col_cls, cd)[0]
        G = P.mul_(g_row[i0:i1, None])
        # dL/ds = sum_ij G_ij S_ij / s. Each row of the row term (column of the column term)
        # sums to 0 exactly, so centring S_ij on the positive's value (with smoothing: the
        # target's mean, smoothing_centres) changes nothing exactly but keeps the rounding of
        # those sums out of d scale.
        T = S - ctr_row[i0:i1, None]
        dscale += (G * T).sum()
        if symmetric:  # N == B, no labels: column j's positive is S_jj, already in place in S
            Q = (S - col_stats[0]).sub_(col_stats[1]).exp_()
            Q.diagonal(i0).sub_(pos_w)
            if uni_w:
                Q.sub_(uni_w)
            Q.mul_(g_col)
            # column j centred on S_jj (or its target mean), in T's buffer
            dscale += (Q * torch.sub(S, ctr_col, out=T)).sum()
            G += Q
        dU[i0:i1] = G @ V
        dV.addmm_(G.T, U[i0:i1])
    return dU.mul_(s), dV.mul_(s), dscale / s
