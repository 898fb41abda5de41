"""Triton kernel for group whitening: the coupled Newton-Schulz iteration, one program per group.

Each program keeps its group's Y, Z, T ([g, g], g <= 64, padded to a power of two) on chip for
all iterations: one launch instead of 3 * iters batched matmul launches.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def newton_schulz_kernel(S, W, g, iters, BG: tl.constexpr):
    pid = tl.program_id(0)
    r = tl.arange(0, BG)
    valid = (r[:, None] < g) & (r[None, :] < g)
    offs = pid * g * g + r[:, None] * g + r[None, :]
    s = tl.load(S + offs, mask=valid, other=0.0)
    c = tl.sqrt(tl.sum(tl.sum(s * s, 1), 0))  # Frobenius norm: eigenvalues of S/c lie in (0, 1]
    # Identity on the valid block only, so the padding stays exactly zero.
    eye = tl.where((r[:, None] == r[None, :]) & valid, 1.0, 0.0)
    y = s / c
    z = eye
    for _ in range(iters):
        t = 1.5 * eye - 0.5 * tl.dot(z, y, input_precision="ieee")
        y = tl.dot(y, t, input_precision="ieee")
        z = tl.dot(t, z, input_precision="ieee")
    tl.store(W + offs, z / tl.sqrt(c), mask=valid)


def newton_schulz_whitening_matrix(S: torch.Tensor, iters: int) -> torch.Tensor:
    """W ~= S^-1/2 for S [G, g, g] float32 SPD, g <= 64 (fastcl.whitening.TRITON_MAX_GROUP)."""
    G, g, _ = S.shape
    S = S.contiguous()
    W = torch.full_like(S, float("nan"))  # poisoned: every element must be written
    BG = max(16, triton.next_power_of_2(g))
    newton_schulz_kernel[(G,)](S, W, g, iters, BG=BG, num_warps=4 if BG <= 64 else 8)
    return W
