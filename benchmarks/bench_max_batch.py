"""The largest CLIP-loss batch each provider can run (fwd+bwd) on this device.

For each provider, B doubles from --start until the step runs out of memory, exceeds --max-seconds
for one fwd+bwd (or would: a step costs ~B², so one predicted to take 4x the last is not started),
or reaches --max-b. Reports the largest B that ran, its time and peak memory,
and why the probe stopped. One run per size (a capacity probe, not a timing benchmark).
"""
import argparse
import time

import torch

from benchmarks.bench_info_nce import DTYPES, providers
from benchmarks.common import Unsupported, append_csv, header, is_oom, names, peak_memory, picked, stop_on_sigterm


def _why_stopped(e: BaseException) -> str:
    if isinstance(e, Unsupported):
        return f"n/a: {e}"
    return "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:80]}"


def probe(name, fn, device, dim, dtype, start, max_b, max_seconds, seen=None):
    """(best, why it stopped); seen (a dict), if given, holds the best so far as it grows, for
    a caller whose run is cut short (a timeout's SIGTERM) to record."""
    best, B, stop = None, start, f"reached --max-b {max_b}"
    # Untimed warm-ups at two small sizes: kernel compilation must not count against
    # --max-seconds, nor torch.compile's second graph (dynamic in B) after a shape change.
    # A provider that refuses the shape (or fails) here is a row that says so, not a crash.
    try:
        for n in (64, 96):
            w = torch.randn(n, dim, device=device).to(DTYPES[dtype]).requires_grad_()
            fn(w, w.detach().clone().requires_grad_(), 0.07, True).backward()
    except Exception as e:  # noqa: BLE001 - reported in the row
        return None, _why_stopped(e)
    while B <= max_b:
        try:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(B, dim, device=device, generator=g).to(DTYPES[dtype]).requires_grad_()
            k = torch.randn(B, dim, device=device, generator=g).to(DTYPES[dtype]).requires_grad_()

            def step():
                fn(q, k, 0.07, True).backward()

            t0 = time.perf_counter()
            if device.type == "cuda":
                mem = peak_memory(step, device)  # runs the step once, synchronised
            else:
                step()
                mem = float("nan")
            seconds = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - OOM is the result we look for; others are reported
            stop = _why_stopped(e)
            break
        finally:
            q = k = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        best = dict(B=B, seconds=seconds, peak_mib=mem / 2**20)
        if seen is not None:
            seen["best"] = best
        print(f"  {name:<16} B={B:>9} {seconds:8.3f} s {best['peak_mib']:>10.0f} MiB", flush=True)
        if seconds > max_seconds:
            stop = f"one step took {seconds:.1f} s > {max_seconds} s"
            break
        if B * 2 <= max_b and 4 * seconds > max_seconds:  # the step costs ~B²: don't start what won't end
            stop = f"time: B={2 * B} would take ~{4 * seconds:.0f} s > {max_seconds} s (not memory)"
            break
        B *= 2
    return best, stop


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dim", type=int, default=512 if cuda else 64)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--start", type=int, default=4096 if cuda else 256)
    p.add_argument("--max-b", type=int, default=1 << 20 if cuda else 4096)
    p.add_argument("--max-seconds", type=float, default=60.0 if cuda else 5.0)
    p.add_argument("--only", type=names, default=None, help="comma-separated providers")
    p.add_argument("--csv", default=None)
    a = p.parse_args(argv)
    if not 1 <= a.start <= a.max_b:
        p.error(f"--start {a.start} must be at least 1 and at most --max-b {a.max_b}")
    stop_on_sigterm()
    device = torch.device("cuda" if cuda else "cpu")
    print(header(device))
    print(f"largest CLIP-loss batch, fwd+bwd, D={a.dim}, {a.dtype}")
    rows = []
    # torch.compile of the naive loss only when named: its graph keeps the B x B logits, and it
    # compiles again for dynamic B.
    compile_naive = a.only is not None and "torch-compile" in a.only
    for name, fn in picked(providers(device, compile_naive=compile_naive, only=a.only), a.only).items():
        seen, cut = {}, None
        try:
            best, stop = probe(name, fn, device, a.dim, a.dtype, a.start, a.max_b, a.max_seconds, seen)
        except SystemExit as e:  # a timeout's SIGTERM (gpu_run.sh): keep the largest B reached so far
            best, stop, cut = seen.get("best"), "timeout (SIGTERM) during the probe", e
        row = dict(op="info_nce_max_batch", provider=name, D=a.dim, dtype=a.dtype, device=str(device),
                   max_B=best["B"] if best else 0, seconds=best["seconds"] if best else float("nan"),
                   peak_mib=best["peak_mib"] if best else float("nan"), stopped_by=stop)
        rows.append(row)
        append_csv(a.csv, [row], device)  # at once: a run cut short keeps earlier rows
        print(f"{name:<16} largest B {row['max_B']:>9}  (stopped: {stop})", flush=True)
        if cut is not None:
            raise cut
    return rows


if __name__ == "__main__":
    main()
