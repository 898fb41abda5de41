"""Small helpers shared by the fused ops and the references."""
import contextlib
from typing import Optional

import torch
from torch import Tensor


def no_autocast(device: torch.device):
    """Autocast off for device's type (a no-op where autocast does not exist, e.g. meta). The
    ops choose their own precision from their inputs' dtype: autocast must not lower a matmul
    that its backward (or a statistic) needs in fp32."""
    available = _AUTOCAST.get(device.type)
    if available is None:  # another device type: asked eagerly (torch 2.4's Dynamo cannot)
        available = torch.amp.is_autocast_available(device.type)
    return torch.autocast(device.type, enabled=False) if available else contextlib.nullcontext()


# Asked once, at import: a plain dict is what torch.compile reads inside a traced function.
_AUTOCAST = {t: torch.amp.is_autocast_available(t) for t in ("cpu", "cuda", "meta", "xpu", "mps", "hpu")}


def refuse_func_transforms(message: str, *xs: Tensor, refused=("Grad",)) -> None:
    """Raise NotImplementedError(message) inside the torch.func transforms named in `refused`
    (TransformType names: Grad covers grad, vjp and jacrev). Neither a torch custom op's
    autograd nor an autograd.Function without setup_context runs under them, and torch's own
    error names neither fastcl nor the way out. Given tensors xs (refused=("Grad",)), only
    where a grad transform differentiates one of them: a loss of tensors that none does (a
    metric inside torch.func.grad) runs as it did."""
    if torch.compiler.is_compiling():  # Dynamo traces no functorch stack; nothing to ask
        return
    F = torch._C._functorch
    stack = F.get_interpreter_stack() or ()
    if not any(i.key().name in refused for i in stack):
        return
    if xs and not any(_grad_tracked(x) for x in xs):
        return
    raise NotImplementedError(message)


def _grad_tracked(x: Tensor) -> bool:
    """Whether a grad transform differentiates x. Under grad every new tensor is wrapped: its
    layer tracks x only where it requires grad (an outer vmap's wrapper hides that, hence the
    walk through the layers)."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(x):
        if F.is_gradtrackingtensor(x) and x.requires_grad:
            return True
        x = F.get_unwrapped(x)
    return False


def grad_amp(scale: Tensor, g_row: Tensor, g_col: Optional[Tensor] = None) -> Tensor:
    """The backward kernels' gradient amplification, float32 [1] (Triton and CUDA C++ alike).

    They round G = g * s * (P - targets) to the input dtype for the dG @ V products. Since
    |G| <= |s| * (max|g_row| + max|g_col|), multiplying by this power of two (undone exactly
    afterwards) puts that bound near 2^14: within fp16's range, and clear of its subnormals when
    the upstream gradient is tiny (a 2^-17 loss scale). |s|: a negative raw-op scale must not
    overflow."""
    gmax = sum(g.abs().amax() if g.numel() else g.new_zeros(()) for g in (g_row, g_col) if g is not None)
    amp = torch.exp2(torch.floor(torch.log2(16384.0 / (scale.float().abs() * gmax).clamp_min(1e-30))))
    return amp.clamp(2.0 ** -60, 2.0 ** 60).reshape(1).to(torch.float32)


def reduce(per: Tensor, reduction: str, valid: Optional[Tensor] = None) -> Tensor:
    """mean / sum / none over per-row losses; rows where valid is False count for nothing."""
    if valid is not None:
        per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "mean":
        return per.sum() / valid.sum().clamp_min(1) if valid is not None else per.mean()
    if reduction == "sum":
        return per.sum()
    return per
