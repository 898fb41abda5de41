"""Input checks shared by every fastcl op: clear errors instead of silent wrong numbers."""
import math
import numbers
import sys

import torch
from torch._subclasses.fake_tensor import is_fake

from .chunked import compute_dtype

# The largest finite float, as a plain module constant: torch 2.4's Dynamo cannot read
# sys.float_info inside a compiled function (it failed every compile that took a temperature).
FLOAT_MAX = sys.float_info.max

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def has_values(t: torch.Tensor) -> bool:
    """False for tensors that carry shapes only: meta tensors, and fake tensors while tracing
    under FakeTensorMode outside torch.compile (dynamo sees fake tensors too, but a value check
    there must still run or become a device-side assert)."""
    return t.device.type != "meta" and (_compiling() or not is_fake(t))


def require(ok: torch.Tensor, message: str) -> None:
    """ValueError(message) unless the bool tensor ok is True. Under torch.compile a device-side
    assert instead: a host check there is data-dependent (a graph break, or an error with
    fullgraph=True)."""
    require_all((ok, message))


def require_all(*checks) -> None:
    """require() for several (ok, message) pairs with one host sync; the first failing message."""
    if _compiling():
        for ok, message in checks:
            torch._assert_async(ok, message)
        return
    for good, (_, message) in zip(torch.stack([ok.reshape(()) for ok, _ in checks]).tolist(), checks):
        if not good:
            raise ValueError(message)


def check_embeddings(q, k, name_q="q", name_k="k"):
    for name, t in ((name_q, q), (name_k, k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}): the loss is undefined")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has feature dimension 0 (shape {tuple(t.shape)})")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{name_q} and {name_k} must have the same feature dimension, "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.device != k.device:
        raise ValueError(f"{name_q} and {name_k} must be on the same device, got {q.device} and {k.device}")
    if q.dtype != k.dtype:
        raise TypeError(f"{name_q} and {name_k} must have the same dtype, got {q.dtype} and {k.dtype}")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_class_ids(labels, batch: int, device, name="labels"):
    """Integer ids, one per row (any values: class ids of multi-positive losses)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 (or int32), got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"{name} must have shape [{batch}] (one per row), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on {device}, got {labels.device}")


def check_labels(labels, batch: int, num_classes: int, device, name="labels"):
    """Column indices: integer [batch] on `device`, each in [0, num_classes)."""
    check_class_ids(labels, batch, device, name)
    if not has_values(labels):  # shapes only, no values to check
        return
    if _compiling():  # no host sync inside a graph: a device-side assert still refuses bad labels
        # A fixed message: formatting the symbolic num_classes into it would pin it to a constant
        # and recompile the graph for every key count.
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(),
                            f"{name} must lie in [0, N) (the rows of k)")
    else:
        # one host sync; worth it for a clear error. Under vmap, on the labels of every sample
        # (a batched tensor's .item() is refused).
        lo, hi = (int(t) for t in torch.aminmax(_unwrapped(labels)))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}) (the rows of k), "
                             f"got values in [{lo}, {hi}]")


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """t without its torch.func wrappers (vmap's batched tensors: their values, every sample's)."""
    F = torch._C._functorch
    while F.is_functorch_wrapped_tensor(t):
        t = F.get_unwrapped(t)
    return t


def is_int(value) -> bool:
    """An integer, Python's or NumPy's, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(value, name: str) -> bool:
    """value as a Python bool, if it is True or False (NumPy's too, or an integer 0 or 1); a
    string such as "no" would otherwise read as True. Callers pass on the result: the custom
    ops' bool arguments take Python bools only."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and getattr(getattr(value, "dtype", None), "kind", "") == "b" \
            and getattr(value, "ndim", None) == 0:
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def positive_number(value, name: str) -> float:
    """value as a float, if it is a real number > 0 and finite; else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__} {value!r}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile a float that changed between calls
    # becomes symbolic, and math.isfinite cannot trace it (NaN fails both comparisons). The
    # largest finite float, not inf: "value < inf" installed no guard, so a compiled graph then
    # took an infinite temperature (the loss came out log N).
    if not (value > 0 and value <= FLOAT_MAX):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def smoothing(value) -> float:
    """label_smoothing as a float in [0, 1), else a clear error. A Python or NumPy real number;
    not a string (it passed float() on some backends and not others) nor a tensor (one that
    needed a gradient silently got none)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"label_smoothing must be a number in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value < 1.0:
        # no value in the message while compiling: formatting a symbolic float cannot be traced
        raise ValueError("label_smoothing must be in [0, 1)" + ("" if _compiling() else f", got {value}"))
    return value


def float_tensor(value: float, device, dtype) -> torch.Tensor:
    """A 0-dim tensor holding a Python float (rounded once, from float64, to dtype). Built by
    arithmetic, not torch.tensor(value): under torch.compile a float that changes between calls
    is symbolic, and torch.tensor would bake each value into its own graph (recompiling until
    the recompile limit fails the call). On the CPU, then moved: some devices lack float64."""
    return (torch.ones((), dtype=torch.float64) * value).to(device=device, dtype=dtype)


def reciprocal_tensor(value: float, device, dtype) -> torch.Tensor:
    """float_tensor(1 / value), with the division done by the tensor (correctly rounded in
    float64, as Python's 1.0 / value is): torch 2.11's AOTAutograd baked a symbolic float
    computed in Python (1.0 / temperature) into the graph, one graph per value, where the
    symbolic input itself stayed symbolic."""
    return (torch.ones((), dtype=torch.float64) / value).to(device=device, dtype=dtype)


SCALE_FLOOR = 2.0 ** -100  # s * q.k stays a normal fp32 number for |q.k| >= 2^-26
LOG2E = 1.4426950408889634


def max_scale(dtype: torch.dtype) -> float:
    """The largest logit multiplier s for inputs of `dtype`. The logits of unit vectors span
    [-s, s], and the kernels hold them in log2 units (s log2(e)): twice that must be finite in
    the compute dtype, else an inf or NaN loss, where the kernels' log2 units overflowed before
    torch's natural ones (s in 1.18e38 to 1.7e38, fp32)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max / (2 * LOG2E)


def scale_tensor(temperature, logit_scale, device, dtype=torch.float32) -> torch.Tensor:
    """The logit multiplier s as a 0-dim tensor: exp(logit_scale) (differentiable) or 1/temperature."""
    if temperature is not None and logit_scale is not None:
        raise ValueError("give either temperature or logit_scale, not both")
    if logit_scale is not None:
        if not isinstance(logit_scale, torch.Tensor):
            raise TypeError("logit_scale must be a tensor (log of the logit multiplier, as in CLIP); "
                            "for a fixed value pass temperature=")
        if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
            raise ValueError(f"logit_scale must be a floating tensor with one element, "
                             f"got shape {tuple(logit_scale.shape)} dtype {logit_scale.dtype}")
        if logit_scale.device != device:
            raise ValueError(f"logit_scale must be on {device}, got {logit_scale.device}")
        # exp in fp32 at least: a bf16 exp of log(100) is 99.0 (1% off the scale)
        s = logit_scale.reshape(()).to(compute_dtype(logit_scale.dtype)).exp()
        # On the CPU, where it costs no device sync (a CUDA one would, and would break graph
        # capture), a multiplier above max_scale is refused as a temperature's is.
        if logit_scale.device.type == "cpu" and has_values(logit_scale) and not _compiling():
            limit = max_scale(dtype)
            value = float(_unwrapped(logit_scale.detach()).max())  # (under vmap, every sample's)
            if not value <= math.log(limit):
                raise ValueError(f"logit_scale must be at most {math.log(limit):.4g} for {dtype} inputs (its exp, "
                                 f"the logit multiplier, at most {limit:.3g}), got {value:g}")
        # Below logit_scale ~ -104 (fp32) exp underflows to 0, and the backward's dL/ds, formed
        # as sum(G * S) / s, is 0/0: a NaN that d logit_scale = s dL/ds kept (naive autograd
        # gives 0). So s is floored at SCALE_FLOOR, its gradient passed straight through: the
        # loss moves by ~1e-30, and s dL/ds is ~0 as it should be.
        return s + (s.clamp_min(SCALE_FLOOR) - s).detach()
    if temperature is None:
        temperature = 0.07
    if isinstance(temperature, torch.Tensor):
        raise TypeError("temperature must be a Python float; pass a learnable scale as logit_scale=")
    temperature = positive_number(temperature, "temperature")
    # float64 inputs get a float64 1/temperature: rounding it to fp32 would cost ~1e-8 relative.
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    # A comparison that torch.compile can guard on a symbolic temperature
    if not temperature * max_scale(sdt) >= 1.0:
        raise ValueError(f"the logit multiplier 1/temperature is too large for {sdt} (at most {max_scale(sdt):.3g}: "
                         f"twice it, in the kernels' log2 units, must be finite)"
                         + ("" if _compiling() else f": temperature {temperature}"))
    return reciprocal_tensor(temperature, device, sdt)
