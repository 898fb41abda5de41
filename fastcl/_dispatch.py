"""The one place that chooses a backend, and says why a backend cannot run."""
import functools
import importlib

import torch

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on these inputs; the message says why."""


@functools.lru_cache(maxsize=None)
def _import_error(module: str):
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"{module} cannot be imported ({type(e).__name__}: {e})"
    return None


def why_not(backend: str, device: torch.device, dtype: torch.dtype):
    """None if `backend` can run on tensors of this device/dtype, else the reason it cannot."""
    if backend in ("torch", "reference"):
        return None
    if backend == "cuda":
        return ("the CUDA C++ extension (csrc/) is not part of this build yet; "
                "use backend='triton' on GPUs")
    if backend == "triton":
        err = _import_error("triton")
        if err:
            return err
        from fastcl.kernels.info_nce import interpreting
        if dtype == torch.float64:
            return "the Triton kernels take float16/bfloat16/float32, not float64 (use backend='torch')"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreting():
            if dtype == torch.bfloat16:
                # Measured: the interpreter silently returns garbage for bf16 (shared/reference).
                return "the Triton CPU interpreter computes bfloat16 wrongly; use float32/float16 or a GPU"
            return None
        return (f"tensors are on {device.type}; Triton kernels need a CUDA device "
                f"(or TRITON_INTERPRET=1 for the CPU interpreter, set before importing fastcl)")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(backend: str, device: torch.device, dtype: torch.dtype, unsupported=None) -> str:
    """Map 'auto' to a concrete backend; raise BackendUnavailable for one that cannot run.

    unsupported: {backend: reason} for limits of the calling op itself (e.g. group whitening's
    Triton kernel covers one method and group sizes <= 128); None values are ignored.
    """
    unsupported = {k: v for k, v in (unsupported or {}).items() if v}

    def reason_for(b):
        return unsupported.get(b) or why_not(b, device, dtype)

    if backend == "auto":
        return "triton" if device.type == "cuda" and reason_for("triton") is None else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reason = reason_for(backend)
    if reason is not None:
        raise BackendUnavailable(f"backend={backend!r} is not usable: {reason}")
    return backend


def available_backends(device="cpu", dtype=torch.float32) -> dict:
    """{backend: None if usable else reason} for tensors of this device and dtype."""
    device = torch.device(device)
    return {b: why_not(b, device, dtype) for b in BACKENDS if b != "auto"}
