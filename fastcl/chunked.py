"""Pure-torch backend of the log-sum-exp core: the Triton kernels' algorithm on row chunks.

Any device, any float dtype (16-bit inputs are computed in float32, float64 stays float64).
Peak extra memory is a few [chunk, N] buffers (chunk * N <= CHUNK_ELEMENTS) plus O((B+N)*D),
never B x N.
"""
import torch

# Elements of one [chunk, N] score block; ~16 MB in float32. A few such blocks live at once.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(B: int, N: int):
    step = max(1, min(B, CHUNK_ELEMENTS // max(N, 1)))
    for i0 in range(0, B, step):
        yield i0, min(B, i0 + step)


def lse_forward(u, v, scale, symmetric: bool):
    cd = compute_dtype(u.dtype)
    U, V, s = u.to(cd), v.to(cd), scale.to(cd)
    B, N = U.shape[0], V.shape[0]
    row = U.new_empty(B)
    col = U.new_full((N,), float("-inf")) if symmetric else U.new_empty(0)
    for i0, i1 in _chunks(B, N):
        S = (U[i0:i1] @ V.T).mul_(s)
        row[i0:i1] = torch.logsumexp(S, dim=1)
        if symmetric:
            col = torch.logaddexp(col, torch.logsumexp(S, dim=0))
    return row, col


def lse_backward(u, v, scale, row, col, g_row, g_col, symmetric: bool):
    cd = compute_dtype(u.dtype)
    U, V, s = u.to(cd), v.to(cd), scale.to(cd)
    B, N = U.shape[0], V.shape[0]
    dU = torch.empty_like(U)
    dV = torch.zeros_like(V)
    g_row, row = g_row.to(cd), row.to(cd)
    if symmetric:
        g_col, col = g_col.to(cd), col.to(cd)
    for i0, i1 in _chunks(B, N):
        S = (U[i0:i1] @ V.T).mul_(s)
        G = torch.exp(S - row[i0:i1, None]).mul_(g_row[i0:i1, None])
        if symmetric:
            G += torch.exp(S.sub_(col)).mul_(g_col)
        G.mul_(s)
        dU[i0:i1] = G @ V
        dV.addmm_(G.T, U[i0:i1])
    return dU, dV
