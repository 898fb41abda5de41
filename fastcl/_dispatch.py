"""The one place that chooses a backend, and says why a backend cannot run."""
import importlib

import torch

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on these inputs; the message says why."""


# What the installation and the GPU are, asked by every call, including calls that torch.compile
# traces. Dynamo cannot trace an import (fullgraph=True failed for backend="triton", and for
# "auto" on a GPU), so it calls these functions itself, once per trace, and keeps the result as
# a constant: none of it changes while the process runs (a tensor on another GPU recompiles).
_IMPORT_ERRORS = {}


@torch.compiler.assume_constant_result
def _import_error(module: str):
    if module not in _IMPORT_ERRORS:
        try:
            importlib.import_module(module)
            _IMPORT_ERRORS[module] = None
        except Exception as e:  # ImportError, or a broken install raising something else
            _IMPORT_ERRORS[module] = f"{module} cannot be imported ({type(e).__name__}: {e})"
    return _IMPORT_ERRORS[module]


@torch.compiler.assume_constant_result
def _triton_interpreting() -> bool:
    from fastcl.kernels.info_nce import interpreting
    return interpreting()


@torch.compiler.assume_constant_result
def _cuda_available() -> bool:
    return torch.cuda.is_available()


@torch.compiler.assume_constant_result
def capability(device: torch.device):
    """(major, minor) compute capability of a CUDA device."""
    return tuple(torch.cuda.get_device_capability(device))


@torch.compiler.assume_constant_result
def shared_memory_per_block(device: torch.device):
    """Opt-in shared memory per block of a CUDA device, in bytes (None if torch does not say)."""
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)


_NO_CUDA = "torch sees no CUDA device here (torch.cuda.is_available() is False)"


def check_name(backend) -> None:
    """ValueError unless backend is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def why_not(backend: str, device: torch.device, dtype: torch.dtype):
    """None if `backend` can run on tensors of this device/dtype, else the reason it cannot."""
    if backend in ("torch", "reference"):
        # any device torch runs on; a CUDA device only where there is one
        return _NO_CUDA if device.type == "cuda" and not _cuda_available() else None
    if backend == "cuda":
        from . import cuda_backend
        err = cuda_backend.unavailable()
        if err:
            return err
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"the CUDA kernels take float16/bfloat16/float32, not {dtype} (use backend='torch')"
        if device.type != "cuda":
            return f"tensors are on {device.type}; the CUDA C++ kernels need CUDA tensors"
        if not _cuda_available():
            return _NO_CUDA
        major, minor = capability(device)
        if major < 8:
            return f"the CUDA kernels need compute capability 8.0+, this GPU is {major}.{minor}"
        # A cubin for sm_XY runs on sm_XZ with Z >= Y (same major); no PTX is embedded.
        if not any(a // 10 == major and a % 10 <= minor for a in cuda_backend.compiled_archs()):
            return (f"fastcl._C holds kernels for sm {cuda_backend.compiled_archs()}, not for this "
                    f"GPU (sm_{major}{minor}); rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
        return None
    if backend == "triton":
        err = _import_error("triton")
        if err:
            return err
        if dtype == torch.float64:
            return "the Triton kernels take float16/bfloat16/float32, not float64 (use backend='torch')"
        if device.type == "cuda":
            return None if _cuda_available() else _NO_CUDA
        if device.type == "cpu" and _triton_interpreting():
            if dtype == torch.bfloat16:
                # Measured: the interpreter silently returns garbage for bf16 (shared/reference).
                return "the Triton CPU interpreter computes bfloat16 wrongly; use float32/float16 or a GPU"
            return None
        return (f"tensors are on {device.type}; Triton kernels need a CUDA device "
                f"(or TRITON_INTERPRET=1 for the CPU interpreter, set before importing fastcl)")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# Measured fwd+bwd milliseconds per GPU architecture, op and input precision
# (benchmarks/RESULTS.md: H100 80GB HBM3, 2026-11-24, scripts/gpu_run.sh). `auto` takes the
# fastest usable backend with a figure for the GPU, op and precision at hand, and Triton where
# none has one: figures, not guesses. `python -m benchmarks.measured_figures` prints this entry
# from the benchmark CSVs (scripts/gpu_run.sh runs it); a test holds the two in step.
#   info_nce 16bit: CLIP loss, B=32768, D=512, bf16 (cuda: its wgmma path, the default then;
#                   WMMA, the default since, took 98.7 ms in the same run).
#   info_nce fp32:  NT-Xent, 2 x 4096 views, D=256 (Triton's 3xTF32 path; 286 ms in IEEE FMAs
#                   on 2026-11-23).
#   group_whiten fp32: Newton-Schulz, N=8192, D=768, groups of 64; mean of three runs, whose
#                   spread (9-17 ms) is larger than the differences between backends.
MEASURED_MS = {
    "sm_90": {
        "info_nce": {
            "16bit": {"triton": 29.7, "cuda": 110.0, "torch": 331.2},
            "fp32": {"triton": 9.8, "cuda": 9.3, "torch": 18.1},
        },
        "group_whiten": {
            "fp32": {"triton": 14.0, "cuda": 13.3, "torch": 12.2},
        },
    },
}


def _arch(device: torch.device) -> str:
    major, minor = capability(device)
    return f"sm_{major}{minor}"


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "fp32"
    return "16bit" if dtype in (torch.float16, torch.bfloat16) else str(dtype)  # no figures


def auto_gpu_choice(device: torch.device, dtype: torch.dtype, reason_for=None, op: str = "info_nce"):
    """(backend, why) that `auto` picks on a CUDA device, or (None, why) if no GPU backend
    (cuda, triton) can run and nothing measured says the torch backend is faster."""
    if reason_for is None:  # not `or`: torch 2.4's export took a function's truthiness for data
        reason_for = lambda b: why_not(b, device, dtype)  # noqa: E731
    usable = [b for b in ("cuda", "triton", "torch") if reason_for(b) is None]
    arch, prec = _arch(device), _precision(dtype)
    measured = MEASURED_MS.get(arch, {}).get(op, {}).get(prec, {})
    figures = {b: ms for b, ms in measured.items() if b in usable}
    if figures:
        best = None
        for b, ms in figures.items():  # min(figures, key=...) is beyond torch 2.4's Dynamo
            if best is None or ms < figures[best]:
                best = b
        return best, f"fastest measured on {arch} ({prec}): " + ", ".join(
            f"{b} {ms} ms" for b, ms in figures.items())
    gpu = [b for b in ("triton", "cuda") if b in usable]
    if not gpu:
        return None, "; ".join(f"{b}: {reason_for(b)}" for b in ("cuda", "triton"))
    return gpu[0], f"no measured figures for {arch} ({prec}); {gpu[0]} is the default"


def resolve(backend: str, device: torch.device, dtype: torch.dtype, unsupported=None,
            op: str = "info_nce") -> str:
    """Map 'auto' to a concrete backend; raise BackendUnavailable for one that cannot run.

    unsupported: {backend: reason} for limits of the calling op itself (e.g. group whitening's
    Triton kernel covers one method and group sizes <= 128); None values are ignored.
    """
    unsupported = {k: v for k, v in (unsupported or {}).items() if v}

    def reason_for(b):
        return unsupported.get(b) or why_not(b, device, dtype)

    if backend == "auto":
        if device.type == "cuda":
            choice, _ = auto_gpu_choice(device, dtype, reason_for, op)
            if choice is not None:
                return choice
        return "torch"
    check_name(backend)
    reason = reason_for(backend)
    if reason is not None:
        raise BackendUnavailable(f"backend={backend!r} is not usable: {reason}")
    return backend


def available_backends(device="cpu", dtype=torch.float32) -> dict:
    """{backend: None if usable else reason} for tensors of this device and dtype."""
    device = torch.device(device)
    return {b: why_not(b, device, dtype) for b in BACKENDS if b != "auto"}
