"""How the CUDA extension fastcl._C is built: read by setup.py (loaded by path, so it imports
nothing from fastcl) and by nothing at run time.

FASTCL_BUILD_CUDA=1 forces the extension (and fails loudly if it cannot be built), 0 skips it;
unset, it is built when the build environment has a CUDA build of torch and an nvcc of the same
CUDA major version, and a failed build then leaves an install without it (an optional accelerator
should not make `pip install` fail; backend="cuda" then says it is not built). The warning is in
the build log, which pip shows with -v.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0a" (the kernels need sm_80+: bf16 tensor cores; 9.0a, not
9.0, so that H100/H200s get the kernels that use wgmma, which exists only in sm_90a code).
MAX_JOBS defaults to what the machine's memory allows (an nvcc job can take ~3 GiB).
"""
import os
import re
import subprocess
import sys

SOURCES = ["csrc/bindings.cpp", "csrc/info_nce.cu", "csrc/whitening.cu"]
DEFAULT_ARCHS = "8.0;9.0a"
# No -std: torch.utils.cpp_extension picks the standard its headers need (C++20 for torch 2.14).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]
GIB_PER_JOB = 3


def mode() -> str:
    """'force', 'skip' or 'auto' from FASTCL_BUILD_CUDA."""
    flag = os.environ.get("FASTCL_BUILD_CUDA", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return "force"
    if flag in ("0", "false", "no", "off"):
        return "skip"
    return "auto"


def memory_bounded_jobs() -> int:
    """Parallel compile jobs: no more than the CPUs, nor than available memory / 3 GiB."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, kib // (GIB_PER_JOB * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_mem = 1
    return max(1, min(os.cpu_count() or 1, by_mem))


def _default_cuda_home():
    # torch derives CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin (as on these
    # machines) would make that /usr/local, which has no CUDA headers.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        if os.path.exists("/usr/local/cuda/bin/nvcc"):
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


def pip_cuda_include_dirs():
    """Headers of the CUDA libraries a pip-installed CUDA torch brings (cuSPARSE, cuBLAS, ...),
    which ATen's CUDA headers include and an nvcc-only toolkit may lack."""
    import importlib.util

    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []  # a full toolkit: its own headers only
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    out = []
    for root in spec.submodule_search_locations:
        for name in sorted(os.listdir(root)):
            inc = os.path.join(root, name, "include")
            if os.path.isdir(inc):
                out.append(inc)
    return out


def nvcc_version(cuda_home):
    """(major, minor) of the CUDA toolkit's nvcc, or None if it cannot be asked."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def why_not_buildable():
    """None if a CUDA extension can be built here, else the reason."""
    _default_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return ("torch is not importable in the build environment; build CUDA wheels with "
                "`pip wheel . --no-build-isolation` next to an installed CUDA torch")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME)"
    nvcc = nvcc_version(cpp_extension.CUDA_HOME)
    if nvcc is not None and str(nvcc[0]) != torch.version.cuda.split(".")[0]:
        # torch.utils.cpp_extension refuses this pair itself, with a traceback mid-build
        return (f"nvcc in {cpp_extension.CUDA_HOME} is CUDA {nvcc[0]}.{nvcc[1]} and torch {torch.__version__} "
                f"was built with CUDA {torch.version.cuda}: extensions need the same major version "
                f"(set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit)")
    return None


def best_effort(build_ext_cls):
    """build_ext_cls, made to leave the extension out with a warning where its build fails."""
    class BestEffortBuildExt(build_ext_cls):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # a compiler error, or torch's own checks
                print(f"fastcl: WARNING: the CUDA extension fastcl._C failed to build ({type(e).__name__}: "
                      f"{e}); installing fastcl without it. FASTCL_BUILD_CUDA=1 makes this an error, "
                      f"0 skips the attempt.", file=sys.stderr)
                # An earlier build's binary must not ship or load in its place: both the build
                # folder's and the in-place copy (setuptools builds with inplace=0, then copies).
                saved = self.inplace
                try:
                    for ext in self.extensions:
                        for self.inplace in (0, 1):
                            path = self.get_ext_fullpath(ext.name)
                            if os.path.exists(path):
                                os.remove(path)
                finally:
                    self.inplace = saved
                self.extensions = []  # nothing to copy or list as an output
                self.distribution.ext_modules = []

    return BestEffortBuildExt


def ext_modules():
    """[CUDAExtension] and {'build_ext': BuildExtension}, or ([], {}) for a pure-Python build."""
    m = mode()
    if m == "skip":
        return [], {}
    reason = why_not_buildable()
    if reason is not None:
        if m == "force":
            raise RuntimeError(f"FASTCL_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"fastcl: building without the CUDA extension ({reason})")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(memory_bounded_jobs()))
    print(f"fastcl: building fastcl._C for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"with MAX_JOBS={os.environ['MAX_JOBS']}")
    ext = CUDAExtension("fastcl._C", SOURCES, include_dirs=pip_cuda_include_dirs(),
                        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
    return [ext], {"build_ext": BuildExtension if m == "force" else best_effort(BuildExtension)}
