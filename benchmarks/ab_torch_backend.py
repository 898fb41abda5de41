"""The torch backend against its own source at an earlier git revision, in one process.

    python -m benchmarks.ab_torch_backend REV [--B 1024 4096] [--D 128] [--reps 9]

Loads fastcl/chunked.py as it was at REV (`git show`) beside the current one and times one
fwd+bwd step of each loss with each, alternating run by run, so that drift of the machine
(other jobs, clocks) hits both alike. Prints the median ms of each and old/new.
"""
import argparse
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time

import torch

import fastcl.functional as FCL
from fastcl import chunked

from .common import header

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_revision(rev: str):
    """fastcl/chunked.py at git revision `rev`, imported as a separate module. A revision whose
    lse_backward predates label smoothing gets one that takes smoothing=0 (all the A/B runs)."""
    src = subprocess.run(["git", "show", f"{rev}:fastcl/chunked.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    try:
        spec = importlib.util.spec_from_file_location(f"chunked_{rev}", f.name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        os.unlink(f.name)
    if "smoothing" not in inspect.signature(mod.lse_backward).parameters:
        mod.lse_backward = _without_smoothing(mod.lse_backward)
    return mod


def _without_smoothing(lse_backward):
    def wrapped(*args, smoothing=0.0, **kwargs):
        if smoothing:
            raise ValueError("this revision's torch backend predates label smoothing")
        return lse_backward(*args, **kwargs)
    return wrapped


def losses(B: int, D: int, device):
    """{name: step} of one fwd+bwd step per loss on the torch backend."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, D, generator=g).to(device).requires_grad_()
    b = torch.randn(B, D, generator=g).to(device).requires_grad_()
    cls = torch.randint(0, max(1, B // 8), (B,), generator=g).to(device)
    calls = {
        "clip": lambda: FCL.info_nce(a, b, temperature=0.07, symmetric=True, backend="torch"),
        "info_nce": lambda: FCL.info_nce(a, b, temperature=0.07, backend="torch"),
        "nt_xent": lambda: FCL.nt_xent(a, b, temperature=0.5, backend="torch"),
        "dcl": lambda: FCL.dcl(a, b, temperature=0.1, backend="torch"),
        "supcon": lambda: FCL.supcon(torch.stack([a, b], 1), cls, backend="torch"),
        "mnrl": lambda: FCL.multiple_negatives_ranking(a, b, b.flip(0), backend="torch"),
    }
    return {name: (lambda f=f: f().backward()) for name, f in calls.items()}


def _once(step, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def alternate(step, variants: dict, reps: int, device, once) -> dict:
    """{variant: median ms of step()}, each variant's install() called before its run, the
    variants alternating run by run (drift hits all alike), after one warm-up round.
    once(step, device): one timed run in ms."""
    times = {v: [] for v in variants}
    for r in range(reps + 1):
        for v, install in variants.items():
            install()
            t = once(step, device)
            if r:  # the first round is the warm-up
                times[v].append(t)
    return {v: sorted(t)[len(t) // 2] for v, t in times.items()}


def compare(old, sizes, D: int, reps: int, device) -> list:
    """[(loss, B, old ms, new ms)]: medians over `reps` alternating runs after one warm-up each."""
    new = {n: getattr(chunked, n) for n in ("lse_forward", "lse_backward")}

    def installer(fns):
        return lambda: [setattr(chunked, n, fn) for n, fn in fns.items()]

    variants = {"old": installer({n: getattr(old, n) for n in new}), "new": installer(new)}
    rows = []
    try:
        for B in sizes:
            for name, step in losses(B, D, device).items():
                med = alternate(step, variants, reps, device, _once)
                rows.append((name, B, med["old"], med["new"]))
    finally:
        for n, fn in new.items():
            setattr(chunked, n, fn)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev", help="git revision whose fastcl/chunked.py is the baseline")
    p.add_argument("--B", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(header(device), f"| baseline {args.rev}", flush=True)
    print(f"{'loss':10s} {'B':>6s} {'old ms':>10s} {'new ms':>10s} {'old/new':>8s}")
    rows = compare(load_revision(args.rev), args.B, args.D, args.reps, device)
    for name, B, o, n in rows:
        print(f"{name:10s} {B:6d} {o:10.2f} {n:10.2f} {o / n:8.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
