"""Registers, spills and SASS of fastcl's Triton kernels for a GPU architecture, with no GPU.

Compiles the forward and the gradient kernels the way the launchers in kernels/info_nce.py
would launch them on a CUDA device (their tile configs, FASTCL_BWD_* overrides included;
contiguous, 16-byte aligned operands, D a multiple of 16), with the ptxas that ships inside
Triton, and reads the cubin with the cuobjdump beside it. For each kernel it prints registers,
stack (spill) bytes, shared memory, and the LDL/STL (spill traffic), HGMMA, LDGSTS (cp.async)
and MUFU.EX2 counts, for the whole kernel and for its innermost loop (the forward's D-chunk
loop, the backward's tile loop): spills there cost every iteration, spills elsewhere do not.

    python scripts/triton_resources.py                      # sm_90, bf16, D = 512
    FASTCL_BWD_BN=32 python scripts/triton_resources.py     # a backward tile variant
    python scripts/triton_resources.py --arch 80 --dtype fp16

Static counts only: whether a variant is faster is for the GPU benchmark to say. The Triton
version matters (the GPU image has its own); the header prints it.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastcl.kernels import info_nce as K  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DIV16 = [["tt.divisibility", 16]]
COUNTED = ("LDL", "STL", "HGMMA", "HMMA", "LDGSTS", "MUFU.EX2")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


FLOAT_ARGS = {"POS_W", "UNI_W"}  # grad_kernel's label-smoothing weights


def compile_kernel(fn, ptr_dtypes, aligned_ints, unit_strides, consts, num_warps, num_stages, arch):
    """triton.compile of `fn` specialised like a launch: pointers and `aligned_ints` divisible
    by 16, `unit_strides` equal to 1 (Triton specialises both at launch), `consts` constexprs."""
    sig, attrs, constexprs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], constexprs[(i,)] = "constexpr", consts[name]
        elif name in unit_strides:
            sig[name], constexprs[(i,)] = "constexpr", 1
        elif name in ptr_dtypes:
            sig[name], attrs[(i,)] = "*" + ptr_dtypes[name], DIV16
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in aligned_ints:
                attrs[(i,)] = DIV16
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _sass(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    return res, sass


def _count(lines):
    return {k: sum(1 for t in lines if re.search(r"(?<![\w.])" + re.escape(k) + r"\b", t)) for k in COUNTED}


def resources(compiled) -> dict:
    """regs, stack bytes, shared bytes, instruction counts, and the same counts in the innermost
    loop (the shortest backward branch's range)."""
    res, sass = _sass(compiled.asm["cubin"])
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in ins:
        b = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            loops.append((addr - int(b.group(1), 16), int(b.group(1), 16), addr))
    out = dict(regs=int(m.group(1)), stack=int(m.group(2)), smem=compiled.metadata.shared,
               **_count([t for _, t in ins]))
    if loops:
        _, lo, hi = min(loops)
        out["loop"] = dict(instructions=sum(1 for a, _ in ins if lo <= a <= hi),
                           **_count([t for a, t in ins if lo <= a <= hi]))
    return out


def forward(dtype: str, arch: int, **flags):
    cfg = K._config(torch.device("cuda"), backward=False)
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    consts = dict(HAS_COL=True, HAS_LABELS=False, EXCL_DIAG=False, EXCL_POS=False, MULTI_POS=False,
                  SPLIT=False, PREC=K._precision(TORCH_DTYPES[dtype]), **cfg)
    consts.update(flags)
    ptrs = dict(U=dtype, V=dtype, **{n: "fp32" for n in ("SCALE", "LABELS", "ROW_CLS", "COL_CLS",
                                                         "ROW_STATS", "COL_M", "COL_L")})
    return consts, compile_kernel(K.lse_fwd_kernel, ptrs, {"B", "N", "D", "s_ub", "s_vn", "s_cp"},
                                  {"s_ud", "s_vd"}, consts, warps, stages, arch)


def gradient(dtype: str, arch: int, D: int, **flags):
    cfg = K.backward_config(torch.device("cuda"), TORCH_DTYPES[dtype], D)  # as lse_backward launches
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    consts = dict(TRANSPOSED=False, HAS_COL=True, HAS_LABELS=False, EXCL_DIAG=False, EXCL_POS=False,
                  MULTI_POS=False, SMOOTH=False, SPLIT=False, PREC=K._precision(TORCH_DTYPES[dtype]), **cfg)
    consts.update(flags)
    ptrs = dict(A=dtype, Bm=dtype, DA=dtype, **{n: "fp32" for n in (
        "SCALE", "AMP", "ROW_STATS", "COL_STATS", "GR", "GC", "LABELS", "ROW_CLS", "COL_CLS", "DSCALE", "CTR")})
    return consts, compile_kernel(K.grad_kernel, ptrs, {"MA", "MB", "D", "B", "N", "s_am", "s_bm"},
                                  {"s_ad", "s_bd"}, consts, warps, stages, arch)


VARIANTS = {  # name: (kernel, flags) -- the CLIP loss's kernels and the one-direction ones
    "fwd symmetric": ("fwd", dict(HAS_COL=True)),
    "fwd one-direction": ("fwd", dict(HAS_COL=False)),
    "grad dU symmetric": ("grad", dict(TRANSPOSED=False, HAS_COL=True)),
    "grad dV symmetric": ("grad", dict(TRANSPOSED=True, HAS_COL=True)),
    "grad dU one-direction": ("grad", dict(TRANSPOSED=False, HAS_COL=False)),
    "grad dV one-direction": ("grad", dict(TRANSPOSED=True, HAS_COL=False)),
    "grad dU symmetric smoothed": ("grad", dict(TRANSPOSED=False, HAS_COL=True, SMOOTH=True)),
    "grad dV symmetric smoothed": ("grad", dict(TRANSPOSED=True, HAS_COL=True, SMOOTH=True)),
    # FASTCL_TRITON_SPLIT's split-K launches (column blocks per program, partials merged after)
    "fwd symmetric split": ("fwd", dict(HAS_COL=True, SPLIT=True)),
    "grad dU symmetric split": ("grad", dict(TRANSPOSED=False, HAS_COL=True, SPLIT=True)),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--dim", type=int, default=512, help="D, the embedding size (picks the D-slab)")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.dtype}, D = {args.dim}; "
          f"FASTCL_BWD_* = { {k: v for k, v in os.environ.items() if k.startswith('FASTCL_BWD_')} }")
    rows = []
    for name, (kernel, flags) in VARIANTS.items():
        if args.only and name not in args.only.split(","):
            continue
        if kernel == "fwd":
            consts, c = forward(args.dtype, args.arch, **flags)
        else:
            consts, c = gradient(args.dtype, args.arch, args.dim, **flags)
        r = resources(c)
        loop = r.pop("loop", {})
        tile = "x".join(str(consts[k]) for k in ("BM", "BN") if k in consts)
        print(f"{name:24s} tile {tile:7s} regs {r['regs']:3d}  stack {r['stack']:5d} B  smem {r['smem']:6d} B  "
              f"LDL/STL {r['LDL']}/{r['STL']}  HGMMA {r['HGMMA']}  HMMA {r['HMMA']}  cp.async {r['LDGSTS']} | "
              f"inner loop: {loop.get('instructions', 0)} instr, LDL/STL {loop.get('LDL', 0)}/{loop.get('STL', 0)}",
              flush=True)
        rows.append((name, r, loop))
    return rows


if __name__ == "__main__":
    main()
