"""ZCA / Cholesky whitening of fp32 features: the covariance in fp64 (the default since
2026-11-24, see fastcl.whitening.stats_dtype) against the fp32 covariance it replaced, in one
process.

    python -m benchmarks.ab_whitening_stats [--N 1024 8192] [--D 768] [--group 64] [--reps 10]

One fwd+bwd step of group_whiten (backend="torch") per variant, alternating run by run so that
drift of the machine hits both alike; medians after one warm-up round.
"""
import argparse
import sys

import torch

from fastcl import whitening

from .ab_torch_backend import _once, alternate
from .common import header


def compare(sizes, D: int, group: int, reps: int, device, methods=("zca", "cholesky")) -> list:
    """[(method, N, fp32-covariance ms, fp64-covariance ms)]."""
    fp64 = whitening.stats_dtype
    variants = {"fp32": lambda method, xg: xg.dtype, "fp64": fp64}
    rows = []
    try:
        for N in sizes:
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(N, D, generator=g) + 3.0).to(device)
            gy = torch.randn(N, D, generator=g).to(device)
            for method in methods:
                xx = x.clone().requires_grad_()

                def step():
                    xx.grad = None
                    whitening.group_whiten(xx, D // group, method=method, backend="torch").backward(gy)

                med = alternate(step, {v: (lambda fn=fn: setattr(whitening, "stats_dtype", fn))
                                       for v, fn in variants.items()}, reps, device, _once)
                rows.append((method, N, med["fp32"], med["fp64"]))
    finally:
        whitening.stats_dtype = fp64
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(header(device), flush=True)
    print(f"group_whiten fwd+bwd, D={args.D}, groups of {args.group}, fp32 x, median of {args.reps}")
    print(f"{'method':10s} {'N':>6s} {'fp32 cov ms':>12s} {'fp64 cov ms':>12s} {'fp64/fp32':>10s}")
    rows = compare(args.N, args.D, args.group, args.reps, device)
    for method, N, a, b in rows:
        print(f"{method:10s} {N:6d} {a:12.2f} {b:12.2f} {b / a:10.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
