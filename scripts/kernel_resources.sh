#!/usr/bin/env bash
# Compiler facts about the CUDA kernels, no GPU needed: registers, spills and stack per kernel
# (ptxas -v), and the instructions that matter for speed in their SASS (16-byte global loads
# LDG.E.128, tensor-core HMMA / Hopper's HGMMA, shared-memory LDS/LDSM, local-memory LDL/STL).
# ARCH=80 for sm_80, 90 for plain sm_90 (WMMA only); default 90a (the wgmma kernels too).
# Needs nvcc (CUDA_HOME or /usr/local/cuda) and a cuobjdump (the toolkit's, or Triton's copy).
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=${ARCH:-90a}
CUDA=${CUDA_HOME:-/usr/local/cuda}
NVCC=$CUDA/bin/nvcc
OBJDUMP=$(command -v cuobjdump || ls "$CUDA/bin/cuobjdump" .venv*/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1 || true)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# Every instantiation the launchers use (fp16 compiles like bf16).
cat > "$TMP/k.cu" <<'CU'
#include "info_nce_kernels.cuh"
#include "whitening_kernels.cuh"
namespace fastcl {
#define FWD(T) template __global__ void lse_fwd_kernel<T>(const T*, const T*, const float*, const int64_t*, \
    const int64_t*, const int64_t*, float*, float*, float*, int64_t, int64_t, int64_t, int);
#define BWD(T, BD) template __global__ void grad_kernel<T, BD>(const T*, const T*, const float*, const float*, \
    const float*, const float*, const float*, const float*, const int64_t*, const int64_t*, const int64_t*, T*, \
    float*, int64_t, int64_t, int64_t, int64_t, int64_t, int, float, float, const float*);
#define FWD_WG(T) template __global__ void lse_fwd_kernel<T, true>(const T*, const T*, const float*, const int64_t*, \
    const int64_t*, const int64_t*, float*, float*, float*, int64_t, int64_t, int64_t, int);
#define BWD_WG(T, BD) template __global__ void grad_kernel<T, BD, true>(const T*, const T*, const float*, \
    const float*, const float*, const float*, const float*, const float*, const int64_t*, const int64_t*, \
    const int64_t*, T*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int, float, float, const float*);
FWD(__nv_bfloat16) FWD(float)
BWD(__nv_bfloat16, 128) BWD(__nv_bfloat16, 256) BWD(__nv_bfloat16, 512) BWD(float, 128) BWD(float, 256)
FWD_WG(__nv_bfloat16) BWD_WG(__nv_bfloat16, 128) BWD_WG(__nv_bfloat16, 256) BWD_WG(__nv_bfloat16, 512)
}
CU
"$NVCC" -O3 -std=c++17 -gencode=arch=compute_$ARCH,code=sm_$ARCH --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ \
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
  -I csrc -Xptxas -v -c "$TMP/k.cu" -o "$TMP/k.o" 2> "$TMP/ptxas.txt"
OBJDUMP="$OBJDUMP" python3 - "$TMP" "$ARCH" <<'PY'
import collections, os, re, subprocess, sys
tmp, arch = sys.argv[1], sys.argv[2]

def name(mangled):  # _ZN6fastcl11grad_kernelI13__nv_bfloat16Li512EEEv... -> grad_kernel<bf16, 512>
    m = re.match(r"_ZN6fastcl(\d+)", mangled)
    if not m:
        return mangled
    rest = mangled[m.end():]
    base, rest = rest[:int(m.group(1))], rest[int(m.group(1)):]
    t = re.match(r"I(13__nv_bfloat16|f)(?:Li(\d+)E)?(?:Lb([01])E)?E", rest)
    args = [a for a in ({"13__nv_bfloat16": "bf16", "f": "f32"}[t.group(1)], t.group(2),
                        "wgmma" if t.group(3) == "1" else None) if a] if t else []
    return base + (f"<{', '.join(args)}>" if args else "")

print(f"sm_{arch}: ptxas -v")
kernel = None
for line in open(os.path.join(tmp, "ptxas.txt")):
    if "Compiling entry function" in line:
        kernel = name(re.search(r"'(\w+)'", line).group(1))
    elif "spill stores" in line:
        spill = re.sub(r".*?(\d+ bytes stack frame.*)", r"\1", line.strip())
    elif (m := re.search(r"Used (\d+) registers", line)) and kernel:
        print(f"  {kernel:26} {m.group(1):>3} registers  {spill}")
objdump = os.environ.get("OBJDUMP")
if not objdump:
    sys.exit("(no cuobjdump: no SASS counts)")
print("SASS: 16-byte global loads, tensor-core instructions, local-memory traffic")
sass = subprocess.run([objdump, "-sass", os.path.join(tmp, "k.o")], capture_output=True, text=True).stdout
counts, kernel = collections.defaultdict(collections.Counter), None
for line in sass.splitlines():
    if (m := re.search(r"Function : (\w+)", line)):
        kernel = name(m.group(1))
    for op in re.findall(r"\b(LDG\.E\.128|H[G]?MMA\.\w+(?:\.\w+)*|LDSM\.\w+(?:\.\w+)*|LDS(?:\.\w+)*|LDL|STL)\b", line):
        counts[kernel][op] += 1
for k in sorted(counts):
    print(f"  {k:26} " + "  ".join(f"{op} x{n}" for op, n in sorted(counts[k].items())))
PY
