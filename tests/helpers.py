"""Error-budget comparisons against a float64 oracle."""
import contextlib

import torch

# Floors for the budget: below these, differences are rounding noise of the dtype itself.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}
MULTIPLE = 4.0


def rel_err(x, ref):
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")  # NaN/inf (e.g. a poisoned, unwritten output) never passes
    # Relative error. Where the exact value is 0 (B=1: loss and gradients) only rounding
    # remains, and the error is absolute.
    if not ref.numel():
        return 0.0
    scale = ref.norm()
    return float((x - ref).norm() / (scale if scale > 0 else 1.0))


def assert_within_budget(name, ours, torch_same_dtype, ref, dtype, floor=None):
    """ours vs fp64 must be no worse than MULTIPLE x (same-dtype naive torch vs fp64), or the
    dtype's floor (a test that knows its errors are well above rounding noise passes floor=0)."""
    e_ours, e_torch = rel_err(ours, ref), rel_err(torch_same_dtype, ref)
    budget = max(MULTIPLE * e_torch, FLOOR[dtype] if floor is None else floor)
    assert e_ours <= budget, (f"{name}: error vs float64 {e_ours:.3g} > budget {budget:.3g} "
                              f"(same-dtype torch: {e_torch:.3g})")
    return e_ours, e_torch


# The flag combinations of the fused op that the losses use: plain / labels with extra negatives
# (InfoNCE, MNRL), symmetric (CLIP), exclude_diag (NT-Xent), exclude_diag + exclude_pos (DCL),
# class ids (SupCon). Shared by the CUDA backend's GPU tests and its CPU-emulated tests.
FLAG_CASES = {
    "plain": dict(),
    "labels_extra_negatives": dict(labels=True, N_extra=37),
    "symmetric": dict(symmetric=True),
    "exclude_diag": dict(exclude_diag=True, labels=True),
    "dcl": dict(exclude_diag=True, exclude_pos=True, labels=True),
    "supcon": dict(multi=True, exclude_diag=True),
    # MNRL's variants: plain log-sum-exps, rows without a positive (label -1), self left out
    "no_positive_exclude_diag": dict(exclude_diag=True, no_positive=True),
}


@contextlib.contextmanager
def counted_collectives(name="all_reduce"):
    """[one entry per torch.distributed.<name> call] while inside (fastcl.distributed calls
    its collectives through the module, so the count sees a backward's)."""
    import torch.distributed as dist
    calls, orig = [], getattr(dist, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return orig(*args, **kwargs)
    setattr(dist, name, counted)
    try:
        yield calls
    finally:
        setattr(dist, name, orig)


def error_messages(cases):
    """'Type: message' of each (fn, args, kwargs) call's error, or 'no error' (the collective
    error tests: every rank records what it was told)."""
    out = []
    for fn, args, kw in cases:
        try:
            fn(*args, **kw)
            out.append("no error")
        except (ValueError, TypeError, RuntimeError) as e:
            out.append(f"{type(e).__name__}: {e}")
    return out


class Embedder(torch.nn.Module):
    """Stands in for a SentenceTransformer in the drop-in tests: features {"x": embeddings} ->
    {"sentence_embedding": embeddings}."""

    def forward(self, features):
        return {"sentence_embedding": features["x"]}
