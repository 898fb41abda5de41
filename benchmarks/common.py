"""Timing and memory helpers shared by the benchmarks."""
import argparse
import contextlib
import csv
import functools
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

import torch


def header(device: torch.device) -> str:
    """One line naming the hardware and every version that matters for the numbers."""
    try:
        import triton
        triton_v = triton.__version__
    except Exception:  # triton missing or broken
        triton_v = "none"
    import fastcl
    return (f"device: {_hardware(device)} | torch {torch.__version__} | triton {triton_v} | "
            f"fastcl {fastcl.__version__} @ {commit()} | {time.strftime('%Y-%m-%d %H:%M')}")


def commit() -> str:
    """The code's revision: FASTCL_COMMIT where the caller sets it (a copy of the tree without
    .git, as on the lent GPU, named 'unknown' in 22 of its rows), else git's HEAD, '-dirty' when
    tracked files have uncommitted changes (the HEAD alone named code that was not what ran),
    benchmarks/results/ aside (the sweep appends to its CSVs)."""
    return os.environ.get("FASTCL_COMMIT") or _git_commit()


@functools.lru_cache(maxsize=None)
def _git_commit() -> str:
    """commit()'s git part, read once per process (header() is called for every CSV row)."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                    ":(top,exclude)benchmarks/results")
    except OSError:
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def fastcl_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> list:
    """The fastcl kernel backends worth timing here: torch everywhere; triton and cuda on a GPU,
    where the dispatcher allows them (the Triton CPU interpreter is for tests, not timings)."""
    from fastcl import _dispatch
    out = ["torch"]
    if device.type == "cuda":
        out += [b for b in ("triton", "cuda") if _dispatch.why_not(b, device, dtype) is None]
    return out


def names(arg: str) -> list:
    """argparse type of --only: comma-separated provider names."""
    return arg.split(",")


def sizes(arg: str) -> list:
    """argparse type of --sizes: comma-separated batch sizes, each >= 1."""
    try:
        out = [int(s) for s in arg.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {arg!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {arg!r}")
    return out


def count(arg: str) -> int:
    """argparse type of --reps: an integer >= 1."""
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"an integer >= 1, got {arg!r}")
    return n


def picked(provs: dict, only=None) -> dict:
    """The providers named in `only` (every one when None), in their own order. A name that is
    not run here (unknown, or unavailable on this machine: no cuda build, no wgmma, a peer not
    installed) is said, not silently dropped."""
    if only:
        missing = [n for n in only if n not in provs]
        if missing:
            print(f"--only: not run here (unknown, or unavailable on this machine): {', '.join(missing)}; "
                  f"available: {', '.join(provs)}", flush=True)
    return {n: f for n, f in provs.items() if not only or n in only}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, reps: int, warmup: int = 2, budget_ms: float = 3000.0, min_reps: int = 5):
    """Median, p20, p80 in ms over `reps` runs: device events on CUDA, perf_counter on CPU.
    Slow steps get fewer runs (at least min_reps) so one provider spends about budget_ms."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    warm_ms = float("inf")
    for _ in range(warmup):  # the last warm-up, past any compilation, estimates one step
        t0 = time.perf_counter()
        fn()
        _sync(device)
        warm_ms = (time.perf_counter() - t0) * 1e3
    reps = max(min(min_reps, reps), min(reps, int(budget_ms / max(warm_ms, 1e-3))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    # inclusive: percentiles stay within the measured times even for a handful of runs
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def peak_memory(fn, device, leaves=()) -> float:
    """Peak bytes allocated by one call of fn beyond what was allocated before (CUDA only).
    What is counted: everything fn allocates, the gradients it writes into `leaves` included
    (their .grad from an earlier run is dropped before the baseline, or the step's own freeing
    of it would hide that much); the inputs and, in bwd mode, the kept forward graph are not."""
    if device.type != "cuda":
        return float("nan")
    for t in leaves:
        t.grad = None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def is_oom(e: BaseException) -> bool:
    """CUDA's out-of-memory error, or the CPU allocator's ("can't allocate memory")."""
    text = str(e).lower()
    return (isinstance(e, torch.OutOfMemoryError) or "out of memory" in text
            or "can't allocate memory" in text)


class Unsupported(Exception):
    """A provider that cannot take this shape (inf-cl at a D that no head size divides): a row
    that says so ("n/a"), not a crash of the sweep."""


def measure(step, device, reps, leaves=()):
    """(median ms, p20, p80, peak bytes, status) of step(); out-of-memory is a result ("OOM"),
    and so is a shape the provider refuses (Unsupported: "n/a").
    leaves: the tensors whose .grad step() writes (see peak_memory)."""
    nan = float("nan")
    try:
        med, p20, p80 = time_fn(step, device, reps)
    except Unsupported:
        return nan, nan, nan, nan, "n/a"
    except Exception as e:
        if not is_oom(e):
            raise
        return nan, nan, nan, nan, "OOM"
    try:  # the timed runs fit: an OOM of this extra run (fragmentation) keeps their times
        return med, p20, p80, peak_memory(step, device, leaves), "ok"
    except Exception as e:
        if not is_oom(e):
            raise
        return med, p20, p80, nan, "ok"


class SlowGuard:
    """Skips a provider at a size where its step is predicted to exceed `limit_ms`, so a sweep
    spends its time on the providers that scale. These losses cost ~B² per step, so the prediction
    from the last size measured is ms * (B / B_then) ** 2."""

    def __init__(self, limit_ms: float):
        self.limit_ms, self.last = limit_ms, {}

    def predicted_ms(self, name: str, B: int) -> float:
        if name not in self.last:
            return 0.0
        b0, ms = self.last[name]
        return ms * (B / b0) ** 2

    def skip(self, name: str, B: int) -> bool:
        return self.predicted_ms(name, B) > self.limit_ms

    def record(self, name: str, B: int, ms: float):
        if ms == ms:  # not NaN (OOM rows predict nothing)
            self.last[name] = (B, ms)


def append_csv(path, rows, device):
    """Append result rows (dicts with the same keys) to an append-only CSV, with the header line."""
    if not path or not rows:
        return
    fields = list(rows[0]) + ["header"]
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            have = next(csv.reader(f), [])
        if have != fields:  # appending would put values under the wrong column names
            raise ValueError(f"{path} has the columns {have}, these rows have {fields}: "
                             f"move the old file away (results are append-only per column set)")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, "header": header(device)})


def progress(total: int, desc: str):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal (the table goes to
    stdout; in a log, as gpu_run.sh's `2>&1 | tee`, the bar's redraws were clutter), else nothing."""
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    except ImportError:
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Null()


def _not_measured(rows, name, x="B") -> str:
    """The legend's note of the sizes a provider has no time for, by status ("OOM at B=65536",
    "slow at B=2048-8192 (3 sizes)"): the plot's lines end there, and without the note a line that
    stops looked like a sweep that stopped."""
    notes = []
    for status in dict.fromkeys(r["status"] for r in rows if r["provider"] == name and r["status"] != "ok"):
        xs = sorted({r[x] for r in rows if r["provider"] == name and r["status"] == status})
        where = ", ".join(map(str, xs)) if len(xs) <= 3 else f"{xs[0]}-{xs[-1]} ({len(xs)} sizes)"
        notes.append(f"{status} at {x}={where}")
    return "; ".join(notes)


def plot(rows, path, x="B", title=""):
    """Time and peak memory vs `x` per provider, log-log, saved as PNG (needs matplotlib). The
    sizes a provider has no figure for (OOM, slow, n/a) are named in its legend entry and marked
    with an x on the panel's top edge. Returns each panel's legend labels."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = []
    for ax, key, label in zip(axes, ("ms", "peak_mib"), ("time per step (ms)", "peak memory (MiB)")):
        names = []
        drawn = any(r[key] == r[key] and r[key] > 0 for r in rows)  # else nothing to draw here
        for name in dict.fromkeys(r["provider"] for r in rows) if drawn else ():
            # OOM rows and unmeasured memory (CPU) are NaN: plot the finite points only.
            pts = [r for r in rows if r["provider"] == name and r[key] == r[key] and r[key] > 0]
            missing = [r[x] for r in rows if r["provider"] == name and r["status"] != "ok"]
            if not pts and not missing:
                continue
            note = _not_measured(rows, name, x)
            names.append(f"{name} ({note})" if note else name)
            line, = ax.plot([p[x] for p in pts], [p[key] for p in pts], marker="o", label=names[-1])
            if missing:  # y in axes units: the top edge, whatever the data's range
                ax.plot(missing, [0.97] * len(missing), "x", color=line.get_color(),
                        transform=ax.get_xaxis_transform(), clip_on=False)
        if drawn:
            ax.set(xscale="log", yscale="log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured on this device", ha="center", transform=ax.transAxes)
        labels.append(names)
        ax.set(xlabel=x, ylabel=label, title=title)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot saved to {path}")
    return labels


def fmt_ms(status: str, ms: float) -> str:
    """The table's time cell: the median, or why there is none (OOM, slow)."""
    return f"{ms:.3f}" if status == "ok" else status


def stop_on_sigterm():
    """Turn a timeout's SIGTERM into SystemExit, so that a sweep cut short (gpu_run.sh bounds
    each step) still leaves `finishing`: the plot of what it measured. Call it from main()."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))


@contextlib.contextmanager
def finishing(rows, bar, plot_path=None, title=""):
    """Around a sweep's loop: then close its progress bar and plot its rows, also when a timeout
    cuts it short (stop_on_sigterm). Each row went to the CSV when measured."""
    try:
        yield
    finally:
        bar.close()
        if plot_path and len({r["B"] for r in rows}) > 1:
            plot(rows, plot_path, "B", title)
