"""The CUDA C++ kernels' own source (csrc/info_nce_kernels.cuh, csrc/tile.cuh), compiled with g++
against a CPU emulation of CUDA (csrc/emulate/) and compared with the float64 torch backend:
loss terms and every gradient, over tile-crossing shapes, all dtypes and every flag of the op.

This checks the kernels' logic (indexing, masking, WMMA operand layouts, data flow through
shared memory, the math) where no GPU exists. It cannot show races, alignment faults or speed:
tests/test_cuda_backend.py runs the real extension on a GPU.
"""
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fastcl import chunked
from fastcl._common import grad_amp
from helpers import FLAG_CASES, assert_within_budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LN2 = math.log(2.0)
FLAGS = dict(HAS_COL=1, HAS_LABELS=2, EXCL_DIAG=4, EXCL_POS=8, MULTI_POS=16)
DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _cuda_include():
    for d in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if d and os.path.exists(os.path.join(d, "include", "cuda_fp16.h")):
            return os.path.join(d, "include")
    return None


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    if shutil.which("g++") is None or _cuda_include() is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_fp16.h) to compile the emulation")
    out = str(tmp_path_factory.mktemp("emu") / "run_kernels")
    src = os.path.join(ROOT, "csrc", "emulate", "run_kernels.cpp")
    # -fno-strict-aliasing: the kernels read T arrays as 16-byte pieces, as CUDA code does.
    r = subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", "-Wno-unknown-pragmas", "-fno-strict-aliasing",
                        "-I", _cuda_include(), src, "-o", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _save(d, name, t, dtype=np.float32):
    if t is not None:
        np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype)).tofile(os.path.join(d, name))


def _load(d, name, shape):
    return torch.from_numpy(np.fromfile(os.path.join(d, name), dtype=np.float32).reshape(shape))


def _run(binary, d, mode, dtype, B, N, D, flags, grid, path, smem=None):
    extra = ["wg"] if path == "wgmma" else []
    env = dict(os.environ, **({"FASTCL_EMU_SMEM": str(smem)} if smem else {}))
    r = subprocess.run([binary, mode, DT[dtype], str(B), str(N), str(D), str(flags), str(grid), d] + extra,
                       capture_output=True, text=True, timeout=600, env=env)
    if r.returncode == 4:
        raise MemoryError(f"needs more shared memory per block than {smem} bytes")
    assert r.returncode == 0, r.stderr


def emulated(binary, d, u, v, scale, labels, sym, cls, excl_diag, excl_pos, g_row, g_col, dtype, grid,
             path="wmma", smem=None, smoothing=0.0):
    """What lse_forward_cuda / lse_backward_cuda do around their kernels (csrc/info_nce.cu).
    path: "wmma", or "wgmma", the kernels' Hopper variant (16-bit dtypes). smem: the emulated
    GPU's shared memory per block in bytes (default: as much as any GPU has). smoothing: label
    smoothing's eps, as the backward's targets (the forward's term is fastcl's, in Python)."""
    B, D = u.shape
    N = v.shape[0]
    flags = ((FLAGS["HAS_COL"] if sym else 0) | (FLAGS["HAS_LABELS"] if labels is not None else 0)
             | (FLAGS["EXCL_DIAG"] if excl_diag else 0) | (FLAGS["EXCL_POS"] if excl_pos else 0)
             | (FLAGS["MULTI_POS"] if cls is not None else 0))
    for name, t in (("u.f32", u), ("v.f32", v), ("scale.f32", scale.reshape(1))):
        _save(d, name, t)
    _save(d, "labels.i64", labels, np.int64)
    _save(d, "row_cls.i64", cls, np.int64)
    _save(d, "col_cls.i64", cls, np.int64)
    _run(binary, d, "fwd", dtype, B, N, D, flags, grid, path)
    row_stats = _load(d, "row_stats.out", (4, B))
    m, logl, pos = row_stats[:3]
    row_loss = ((m - pos) + logl) * LN2
    col_loss, col_stats = row_loss.new_empty(0), row_stats.new_empty(2, 0)
    if sym:
        col_m, col_l = _load(d, "col_m.out", (grid, N)), _load(d, "col_l.out", (grid, N))
        cm = col_m.max(0).values
        col_stats = torch.stack([cm, torch.log2((col_l * torch.exp2(col_m - cm)).sum(0))])
        col_loss = ((cm - pos) + col_stats[1]) * LN2
    amp = grad_amp(scale, g_row, g_col if sym else None)  # what fastcl.cuda_backend passes
    for name, t in (("row_stats.f32", row_stats), ("col_stats.f32", col_stats), ("g_row.f32", g_row),
                    ("g_col.f32", g_col), ("amp.f32", amp.reshape(1))):
        _save(d, name, t)
    # The launcher's float(1 - eps), float(eps / N), as fastcl.chunked.smoothing_weights gives them.
    _save(d, "smooth.f32", torch.tensor(chunked.smoothing_weights(smoothing, N), dtype=torch.float64))
    if smoothing:  # and d scale's centres, as fastcl.cuda_backend computes them (log2 units)
        _save(d, "ctr.f32", chunked.smoothing_centres(u, v, scale, pos, labels, sym, smoothing, LN2))
    _run(binary, d, "bwd", dtype, B, N, D, flags, grid, path, smem)
    du, dv = _load(d, "du.out", (B, D)), _load(d, "dv.out", (N, D))
    dscale = _load(d, "dscale.out", (-1,)).sum()
    return row_loss, col_loss, du, dv, dscale


# B=1; B and N across the 64-row tile; D across the 32-wide chunk and each D-slab the launcher
# picks (128; 256; 512 for 16-bit, two 256-slabs for fp32 at D=300). D % 8 != 0 takes the
# element-wise loads; D = 96 and 264 (multiples of 8) the 16-byte ones, with an odd number of
# D-chunks (3, 9: the two chunk buffers swap roles an odd number of times) and, for fp32 at 264,
# a second slab 8 columns wide; D = 520, two slabs for every dtype, the second one read 16 bytes
# at a time on its own.
SHAPES = [(1, 3), (70, 33), (130, 129), (65, 300), (70, 96), (65, 264), (66, 520)]


# The 16-bit kernels' two score-tile variants: WMMA (sm_80+) and wgmma (the sm_90a build on Hopper).
PATHS = [(torch.float32, "wmma"), (torch.float16, "wmma"), (torch.bfloat16, "wmma"),
         (torch.float16, "wgmma"), (torch.bfloat16, "wgmma")]


@pytest.mark.parametrize("dtype,path", PATHS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", list(FLAG_CASES))
@pytest.mark.parametrize("B,D", SHAPES)
def test_emulated_kernels_match_float64(binary, tmp_path, case, dtype, path, B, D):
    _compare_with_float64(binary, tmp_path, FLAG_CASES[case], dtype, path, B, D)


@pytest.mark.parametrize("dtype,path", PATHS[1:3], ids=lambda x: str(x).replace("torch.", ""))
def test_emulated_negative_raw_scale(binary, tmp_path, dtype, path):
    """The raw op takes any scale. A negative one used to make the backward's gradient
    amplification 2^60 (log2 of a negative bound), so G overflowed fp16 to inf."""
    _compare_with_float64(binary, tmp_path, FLAG_CASES["symmetric"], dtype, path, 70, 33, scale=-1 / 0.07)


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_emulated_logits_below_minus_1e30(binary, tmp_path, case):
    """Every logit below -1e30 (log2 units): scale -1e31 on features in one narrow cone. The kernels'
    running maxima started at -1e30 and stayed there; every exp2 underflowed, and the loss was
    -inf (tests/test_info_nce.py holds the Triton kernels and the public API to the same)."""
    _compare_with_float64(binary, tmp_path, FLAG_CASES[case], torch.float32, "wmma", 70, 33, scale=-1e31,
                          cone=True)


@pytest.mark.parametrize("B", [24, 70])
def test_emulated_supcon_near_duplicate_positives(binary, tmp_path, B):
    """SupCon with tight classes (features = class centre + 1e-3 noise, k = q) at tau = 0.05:
    positives within a few fp32 ulps of the row max. The Triton backward's snap onto the row
    max erased those gaps (7-15x naive's gradient error); this holds the CUDA kernel to it."""
    _compare_with_float64(binary, tmp_path, FLAG_CASES["supcon"], torch.float32, "wmma", B, 8,
                          scale=1 / 0.05, tight=True)


@pytest.mark.parametrize("dtype,path", [PATHS[0], PATHS[2], PATHS[3]], ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("case", ["plain", "labels_extra_negatives", "symmetric"])
@pytest.mark.parametrize("B,D", [(1, 3), (70, 33)])
@pytest.mark.parametrize("eps,scale", [(0.9, 1.0), (0.3, 1 / 0.07)])
def test_emulated_label_smoothing_targets(binary, tmp_path, case, dtype, path, B, D, eps, scale):
    """Label smoothing's targets in the backward's G (1 - eps on the positive, eps / N on every
    column), against the torch backend's in float64. eps = 0.9 on near-uniform rows (scale 1)
    is where a smoothing gradient formed outside the tiles lost digits."""
    _compare_with_float64(binary, tmp_path, FLAG_CASES[case], dtype, path, B, D, scale=scale, smoothing=eps)


# Shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): sm_86/89, sm_80, sm_90.
SMEM_99K, SMEM_A100, SMEM_H100 = 101376, 166912, 232448


@pytest.mark.parametrize("dtype,D,smem,slab", [
    (torch.bfloat16, 300, SMEM_99K, 256),   # 127 KB for one 512-wide slab: two 256-wide ones
    (torch.float16, 520, SMEM_99K, 256),    # three slabs, the last 8 wide
    (torch.bfloat16, 300, SMEM_A100, 512),
    (torch.bfloat16, 300, SMEM_H100, 512),
    (torch.float32, 300, SMEM_A100, 256),   # 157 KB
])
def test_emulated_backward_slab_fits_the_gpus_shared_memory(binary, tmp_path, dtype, D, smem, slab):
    """The launcher's D-slab steps down to one that fits the GPU's shared memory per block, so
    the 16-bit backward for D > 256 runs on sm_86/89 cards (99 KB), with the same results."""
    _compare_with_float64(binary, tmp_path, FLAG_CASES["symmetric"], dtype, "wmma", 65, D, smem=smem)
    assert _load(str(tmp_path), "slab.out", (1,)).item() == slab


def test_emulated_fp32_backward_does_not_fit_99kb(binary, tmp_path):
    """No fp32 slab fits 99 KB (125 KB at 128 wide): the launcher raises, as set_smem does."""
    with pytest.raises(MemoryError):
        _compare_with_float64(binary, tmp_path, FLAG_CASES["symmetric"], torch.float32, "wmma", 65, 100,
                              smem=SMEM_99K)


def _compare_with_float64(binary, tmp_path, cfg, dtype, path, B, D, scale=1 / 0.07, tight=False, smem=None,
                          smoothing=0.0, cone=False):
    g = torch.Generator().manual_seed(B * 7 + D)
    N = B + cfg.get("N_extra", 0)
    # Inputs exactly representable in the dtype, so float64 sees what the kernel sees.
    u = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype).double()
    v = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    v[:B] += u.float()  # correlated positives: the loss is not trivially log N
    v = v.to(dtype).double()
    if cone:  # every row of u and v within ~20 degrees of e_0: every logit has the scale's sign
        e0 = torch.nn.functional.one_hot(torch.zeros(B + N, dtype=torch.long), D).double()
        w = torch.nn.functional.normalize(3 * D ** 0.5 * e0 + torch.randn(B + N, D, generator=g, dtype=torch.float64), dim=1)
        u, v = w[:B].to(dtype).double(), w[B:].to(dtype).double()
    labels = torch.randint(0, N, (B,), generator=g) if cfg.get("labels") else None
    if cfg.get("no_positive"):
        labels = torch.full((B,), -1)
    cls = torch.randint(0, 4, (B,), generator=g) if cfg.get("multi") else None
    if tight:  # SupCon's own layout (k = q), each row its class centre plus a little noise
        centers = torch.randn(4, D, generator=g, dtype=torch.float64)
        u = torch.nn.functional.normalize(centers[cls] + 1e-3 * torch.randn(B, D, generator=g,
                                                                            dtype=torch.float64), dim=1)
        u = v = u.to(dtype).double()
    sym = cfg.get("symmetric", False)
    excl_diag, excl_pos = cfg.get("exclude_diag", False), cfg.get("exclude_pos", False)
    scale = torch.tensor(scale, dtype=torch.float64)
    g_row = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    g_col = torch.rand(N, generator=g, dtype=torch.float64) + 0.5 if sym else torch.zeros(0, dtype=torch.float64)
    grid = 2  # persistent blocks: with 3 row blocks, one block handles two

    ours = emulated(binary, str(tmp_path), u.float(), v.float(), scale.float(), labels, sym, cls, excl_diag,
                    excl_pos, g_row.float(), g_col.float(), dtype, grid, path, smem, smoothing)

    def torch_backend(dt):  # the chunked torch backend: float64 is the oracle, dt the comparator
        uu, vv, ss = u.to(dt), v.to(dt), scale.to(torch.float64 if dt == torch.float64 else torch.float32)
        row, col, rs, cs = chunked.lse_forward(uu, vv, ss, labels, sym, cls, cls, excl_diag, excl_pos)
        du, dv, ds = chunked.lse_backward(uu, vv, ss, rs, cs, g_row.to(ss.dtype), g_col.to(ss.dtype), labels,
                                          sym, cls, cls, excl_diag, excl_pos, smoothing=smoothing)
        return row, col, du, dv, ds

    ref, same = torch_backend(torch.float64), torch_backend(dtype)
    fin = torch.isfinite(ref[0])  # a lone SupCon anchor: no positive, its loss is not a number
    assert torch.equal(torch.isfinite(ours[0]), fin), "finite rows differ"
    for name, a, b, r in zip(["row_loss", "col_loss"], ours[:2], same[:2], ref[:2]):
        if name == "row_loss":
            a, b, r = a[fin], b[fin], r[fin]
        assert_within_budget(name, a, b, r, dtype)
    if not fin.all():  # gradients of rows without a positive are not defined
        return
    for name, a, b, r in zip(["du", "dv", "dscale"], ours[2:], same[2:], ref[2:]):
        assert torch.isfinite(a).all(), f"{name}: unwritten (NaN-poisoned) or non-finite entries"
        assert_within_budget(name, a, b, r, dtype)


@pytest.mark.parametrize("G,g,iters", [(1, 1, 3), (3, 7, 20), (2, 64, 20), (1, 128, 5)])
def test_emulated_newton_schulz_matches_float64(binary, tmp_path, G, g, iters):
    """Group whitening's Newton-Schulz kernel against the same iteration in float64."""
    from fastcl.whitening import newton_schulz_matrix
    gen = torch.Generator().manual_seed(g)
    x = torch.randn(G, 4 * g, g, generator=gen, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    S = (x.transpose(1, 2) @ x / x.shape[1] + 1e-3 * torch.eye(g, dtype=torch.float64)).float().double()
    _save(str(tmp_path), "S.f32", S)
    r = subprocess.run([binary, "ns", str(G), str(g), str(iters), str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    W = _load(str(tmp_path), "W.out", (G, g, g))
    ref = newton_schulz_matrix(S, iters)
    same = newton_schulz_matrix(S.float(), iters)  # the same iteration in fp32 torch
    assert torch.isfinite(W).all(), "unwritten (NaN-poisoned) entries"
    assert_within_budget("W", W, same, ref, torch.float32)


# Gaps found by mutation testing (2026-11-25): the stored positive, and each block's own row of
# the column partials (the emulation runs blocks one after another, so a shared row did not show).


def _emu_forward(binary, d, u, v, s, sym, grid):
    """The emulated forward of fp32 u, v (no labels): row_stats [4, B], col_m, col_l [grid, N]."""
    B, D = u.shape
    for name, t in (("u.f32", u), ("v.f32", v), ("scale.f32", torch.tensor([s]))):
        _save(d, name, t)
    flags = FLAGS["HAS_COL"] if sym else 0
    _run(binary, d, "fwd", torch.float32, B, B, D, flags, grid, "wmma")
    return _load(d, "row_stats.out", (4, B)), _load(d, "col_m.out", (grid, B)), _load(d, "col_l.out", (grid, B))


@pytest.mark.parametrize("symmetric", [False, True])
def test_emulated_backward_takes_the_stored_positive(binary, tmp_path, symmetric):
    """test_backward_takes_the_stored_positive (and its symmetric form above) for the CUDA
    kernels: P's positive and Q's diagonal come from the forward's stored logit. The fp32
    emulation recomputes S with the forward's own FMAs, so a kernel that used the recomputed
    logit gave the same numbers; a shift of the stored positive by 0.01 must move dU and dV
    as the formula says. B = 70 crosses the 64-row tiles."""
    d = str(tmp_path)
    B, D, s, shift = 70, 8, 2.0, 0.01
    g = torch.Generator().manual_seed(9)
    u, v = (torch.randn(B, D, generator=g).double() for _ in range(2))
    gr, gc = (torch.rand(B, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    rs, col_m, col_l = _emu_forward(binary, d, u.float(), v.float(), s, symmetric, 2)
    cm = col_m.max(0).values
    cs = torch.stack([cm, torch.log2((col_l * torch.exp2(col_m - cm)).sum(0))]) if symmetric else rs.new_empty(2, 0)
    rs[2] += shift / math.log(2.0)
    amp = grad_amp(torch.tensor(s), gr.float(), gc.float() if symmetric else None)
    for name, t in (("row_stats.f32", rs), ("col_stats.f32", cs), ("g_row.f32", gr), ("g_col.f32", gc),
                    ("amp.f32", amp), ("smooth.f32", torch.tensor([1.0, 0.0]))):
        _save(d, name, t)
    _run(binary, d, "bwd", torch.float32, B, B, D, FLAGS["HAS_COL"] if symmetric else 0, 2, "wmma")
    du, dv = _load(d, "du.out", (B, D)).double(), _load(d, "dv.out", (B, D)).double()
    S = s * u @ v.T
    eye = torch.eye(B, dtype=torch.float64)
    P = torch.softmax(S, 1)
    P.diagonal().mul_(math.exp(shift))
    G = gr[:, None] * (P - eye)
    if symmetric:
        Q = torch.softmax(S, 0)
        Q.diagonal().mul_(math.exp(shift))
        G = G + gc[None, :] * (Q - eye)
    assert torch.allclose(du, s * G @ v, atol=1e-5)
    assert torch.allclose(dv, s * G.T @ u, atol=1e-5)


def test_emulated_column_partials_stay_in_their_blocks_row(binary, tmp_path):
    """As test_triton_column_partials_stay_in_their_programs_row, for the CUDA forward: block p
    merges its rows' column statistics into row p of the [grid, N] partials and nowhere else
    (the emulation runs the blocks one after another, so a shared row, a race on a GPU, gave
    the same merged result). B = 140: three 64-row blocks over a grid of 2."""
    B, D, s, grid, BM = 140, 8, 3.0, 2, 64
    g = torch.Generator().manual_seed(12)
    u, v = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    _, col_m, col_l = _emu_forward(binary, str(tmp_path), u, v, s, True, grid)
    S2 = (s / math.log(2.0)) * (u.double() @ v.double().T)
    for p in range(grid):
        rows = torch.cat([torch.arange(rb * BM, min(B, rb * BM + BM)) for rb in range(p, -(-B // BM), grid)])
        m = S2[rows].amax(0)
        assert torch.allclose(col_m[p].double(), m, rtol=1e-5, atol=1e-5), p
        assert torch.allclose(col_l[p].double(), torch.exp2(S2[rows] - m).sum(0), rtol=1e-4), p
