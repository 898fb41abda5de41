"""Launchers of the CUDA C++ backend: the kernels in csrc/, built as the extension fastcl._C.

The extension registers ``torch.ops.fastcl_cuda.lse_forward`` / ``lse_backward`` with
torch.library; this module gives them fake (shape) implementations for torch.compile and the
same Python contract as the Triton launchers (kernels/info_nce.py), so fastcl's op
(``fastcl::info_nce_rows``) uses either one interchangeably. Statistics are in log2 units.

Build it with ``FASTCL_BUILD_CUDA=1 pip install --no-build-isolation .`` (or
``python setup.py build_ext --inplace`` in a checkout) next to a CUDA build of torch; see
csrc/README.md.
"""
import importlib.util
import math

import torch

from ._common import grad_amp
from .chunked import smoothing_centres

LOG_UNIT = math.log(2.0)  # the statistics (max, log-sum) are in log2 units


def _load():
    """(module, None, archs) or (None, why it is not available, ())."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return None, ("the CUDA extension fastcl._C is not built; build it with FASTCL_BUILD_CUDA=1 "
                      "next to a CUDA torch (csrc/README.md)"), ()
    try:
        from . import _C
    except ImportError as e:  # built, but against another torch, or CPU torch installed
        return None, (f"fastcl._C is built but cannot be loaded with torch {torch.__version__} ({e}); "
                      f"rebuild it against this torch (csrc/README.md)"), ()
    _register_fakes()
    archs = tuple(int(a) // 10 for a in _C.compiled_archs().split(",") if a.strip().isdigit())
    return _C, None, archs


def unavailable():
    """None if the extension is importable, else the reason."""
    return _STATE[1]  # a module constant: torch.compile reads it instead of tracing the import


def _module():
    """The loaded extension, or the reason it is not usable as a RuntimeError."""
    mod, err, _ = _STATE
    if mod is None:
        raise RuntimeError(err)
    return mod


def compiled_archs():
    """The SM architectures the built extension holds kernels for, e.g. [80, 90]."""
    _module()
    return list(_STATE[2])  # read at import: torch.compile cannot trace into the pybind11 call


def wgmma_available():
    """Whether the current GPU runs the extension's sm_90a code (an H100/H200 with the default
    TORCH_CUDA_ARCH_LIST "8.0;9.0a"): there the 16-bit kernels compute their score tiles with
    Hopper's wgmma if the environment sets FASTCL_CUDA_WGMMA=1, and with WMMA otherwise (as on
    sm_80; WMMA was the faster on the H100, 2026-11-24)."""
    return bool(_module().wgmma_available())


def wgmma_enabled():
    """Whether the 16-bit kernels take the wgmma path now: FASTCL_CUDA_WGMMA is 1, true, on or
    yes (any case), read at every call, and wgmma_available(). Without the opt-in it is False
    without asking the GPU."""
    return bool(_module().wgmma_enabled())


def _register_fakes():
    # Shapes only, for torch.compile / meta tensors; mirrors csrc/info_nce.cu.
    @torch.library.register_fake("fastcl_cuda::lse_forward")
    def _(u, v, scale, labels, row_cls, col_cls, symmetric, exclude_diag, exclude_pos):
        B, N = u.shape[0], (v.shape[0] if symmetric else 0)
        f = dict(dtype=torch.float32, device=u.device)
        return (u.new_empty(B, **f), u.new_empty(N, **f), u.new_empty(4, B, **f),
                u.new_empty(2, N, **f))

    @torch.library.register_fake("fastcl_cuda::newton_schulz")
    def _(S, iters):
        return S.new_empty(S.shape)  # contiguous, as the kernel returns it

    @torch.library.register_fake("fastcl_cuda::lse_backward")
    def _(u, v, scale, row_stats, col_stats, g_row, g_col, amp, labels, row_cls, col_cls, symmetric,
          exclude_diag, exclude_pos, label_smoothing=0.0, centres=None):
        return torch.empty_like(u), torch.empty_like(v), scale.new_empty((), dtype=torch.float32)


def lse_forward(u, v, scale, labels, symmetric: bool, row_cls=None, col_cls=None,
                exclude_diag=False, exclude_pos=False):
    """(row_loss [B], col_loss [N] or [0], row_stats [4, B], col_stats [2, N] or [2, 0]),
    float32; the same contract as fastcl.kernels.info_nce.lse_forward."""
    if unavailable():
        raise RuntimeError(unavailable())
    return torch.ops.fastcl_cuda.lse_forward(u.contiguous(), v.contiguous(), scale, labels, row_cls,
                                             col_cls, symmetric, exclude_diag, exclude_pos)


def lse_backward(u, v, scale, row_stats, col_stats, g_row, g_col, labels, symmetric: bool,
                 row_cls=None, col_cls=None, exclude_diag=False, exclude_pos=False, smoothing=0.0):
    """dU [B, D], dV [N, D] (input dtype), d scale [] (float32); the same contract as
    fastcl.kernels.info_nce.lse_backward."""
    if unavailable():
        raise RuntimeError(unavailable())
    centres = None
    if smoothing:  # d scale's centres (as the torch and Triton backends take them)
        centres = smoothing_centres(u, v, scale, row_stats[2], labels, symmetric, smoothing, LOG_UNIT).float()
    return torch.ops.fastcl_cuda.lse_backward(
        u.contiguous(), v.contiguous(), scale, row_stats, col_stats, g_row.contiguous(),
        g_col.contiguous(), grad_amp(scale, g_row, g_col if symmetric else None), labels, row_cls, col_cls,
        symmetric, exclude_diag, exclude_pos, float(smoothing), centres)


def newton_schulz_whitening_matrix(S: torch.Tensor, iters: int) -> torch.Tensor:
    """W ~= S^-1/2 for S [G, g, g] float32 SPD, g <= 128: the coupled Newton-Schulz iteration,
    one block per group (csrc/whitening_kernels.cuh); same contract as the Triton kernel's."""
    if unavailable():
        raise RuntimeError(unavailable())
    return torch.ops.fastcl_cuda.newton_schulz(S.contiguous(), int(iters))


# Loaded once, when fastcl is imported (cheap: one find_spec, plus the .so where it is built).
_STATE = _load()
