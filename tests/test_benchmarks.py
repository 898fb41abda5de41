"""The benchmark suite at CI size on the CPU: each sweep runs end to end and appends its rows to
the CSV (with the header line naming device and versions); out-of-memory and predicted-slow steps
are recorded as results, not crashes; --only and the slow guard do what they say. Timings are not
checked here (performance claims live in benchmarks/RESULTS.md)."""
import csv
import importlib.util
import math
import os
import time

import pytest
import torch

from benchmarks import bench_distributed, bench_family, bench_info_nce, bench_max_batch, bench_whitening, common

CPU = torch.device("cpu")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_info_nce_sweep_rows_csv_and_plot(tmp_path):
    path, png = tmp_path / "info.csv", tmp_path / "info.png"
    bench_info_nce.run([32, 48], 8, "fp32", True, 2, CPU, str(path), only=["naive-torch", "fastcl-torch"],
                       plot_path=str(png))
    got = _rows(path)
    assert [(r["provider"], r["B"]) for r in got] == [("naive-torch", "32"), ("fastcl-torch", "32"),
                                                      ("naive-torch", "48"), ("fastcl-torch", "48")]
    for r in got:
        assert r["status"] == "ok" and float(r["ms"]) > 0 and float(r["p20"]) <= float(r["p80"]), r
        assert r["header"].startswith("device: CPU") and "torch " + torch.__version__ in r["header"]
    assert all(float(r["speedup_vs_naive"]) == 1.0 for r in got if r["provider"] == "naive-torch")
    # a second run appends below the first, without a second header row
    bench_info_nce.run([32], 8, "fp32", False, 2, CPU, str(path), only=["fastcl-torch"], mode="fwd")
    got = _rows(path)
    assert len(got) == 5 and (got[-1]["mode"], got[-1]["symmetric"]) == ("fwd", "False")
    if importlib.util.find_spec("matplotlib"):
        assert png.stat().st_size > 0


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_a_sweep_cut_short_still_plots(tmp_path, monkeypatch):
    """gpu_run.sh bounds each step with timeout: its SIGTERM (SystemExit through
    stop_on_sigterm) stopped the CLIP sweep before its plot, which it drew only at the end."""
    calls = []

    def timed(fn, *a):
        calls.append(fn)
        if len(calls) == 5:  # the third size's first provider: the timeout strikes
            raise SystemExit(124)
        return 1.0, 1.0, 1.0, 0.0, "ok"
    monkeypatch.setattr(bench_info_nce, "_time_provider", timed)
    png = tmp_path / "cut.png"
    with pytest.raises(SystemExit):
        bench_info_nce.run([32, 48, 64], 8, "fp32", True, 2, CPU, str(tmp_path / "cut.csv"),
                           only=["naive-torch", "fastcl-torch"], plot_path=str(png))
    assert png.stat().st_size > 0 and len(_rows(tmp_path / "cut.csv")) == 4


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot_names_the_sizes_without_a_figure(tmp_path):
    """A provider's line that ends at its first OOM (or skipped slow size) looked like a sweep
    that ended there, and one with no figure at all was missing from the legend."""
    nan = float("nan")

    def row(provider, B, status, ms=nan, mib=nan):
        return dict(provider=provider, B=B, status=status, ms=ms, peak_mib=mib)
    rows = [row("naive", 1024, "ok", 2.0, 64.0), row("naive", 2048, "OOM"), row("naive", 4096, "OOM"),
            row("fastcl", 1024, "ok", 1.0, 8.0), row("fastcl", 2048, "ok", 4.0, 16.0),
            row("fastcl", 4096, "ok", 16.0, 32.0),
            row("peer", 1024, "n/a"), row("peer", 2048, "n/a")]
    rows += [row("slowpoke", B, "ok" if B < 4096 else "slow", 1.0 if B < 4096 else nan, 1.0 if B < 4096 else nan)
             for B in (1024, 2048, 4096, 8192, 16384, 32768)]
    png = tmp_path / "p.png"
    labels = common.plot(rows, str(png))
    assert png.stat().st_size > 0
    want = ["naive (OOM at B=2048, 4096)", "fastcl", "peer (n/a at B=1024, 2048)",
            "slowpoke (slow at B=4096-32768 (4 sizes))"]
    assert labels == [want, want]
    # CPU: no memory figures at all; that panel says so, and has no legend
    assert common.plot([dict(r, peak_mib=nan) for r in rows], str(png))[1] == []


def test_derived_columns(monkeypatch):
    """speed-up = naive ms / provider ms; TFLOP/s = 8 B^2 D / s (fwd+bwd); peak bytes -> MiB: from
    timings fixed here, so the formulas are checked, not the machine."""
    fixed = {"naive-torch": 4.0, "fastcl-torch": 2.0}  # ms
    monkeypatch.setattr(bench_info_nce, "_time_provider",
                        lambda fn, *a: (fixed[fn.name],) * 3 + (3 * 2**20, "ok"))

    def named(name):
        fn = lambda *a: None  # noqa: E731
        fn.name = name
        return fn
    monkeypatch.setattr(bench_info_nce, "providers", lambda *a, **k: {n: named(n) for n in fixed})
    rows = bench_info_nce.run([64], 16, "fp32", True, 2, CPU)
    by = {r["provider"]: r for r in rows}
    assert by["fastcl-torch"]["speedup_vs_naive"] == pytest.approx(2.0)
    assert by["naive-torch"]["tflops"] == pytest.approx(8 * 64 * 64 * 16 / 4e-3 / 1e12)
    assert by["fastcl-torch"]["peak_mib"] == pytest.approx(3.0)

    # the family sweep: each provider's step runs once, then "takes" its fixed time
    current = []

    def loss_of(name):
        def loss(a, b, lab):
            current.append(name)
            return (a * b).sum()
        return loss

    def measure(step, device, reps, leaves=()):
        step()
        return (fixed[current[-1]],) * 3 + (2**20, "ok")
    monkeypatch.setattr(bench_family, "providers", lambda op, device: {n: loss_of(n) for n in fixed})
    monkeypatch.setattr(bench_family, "measure", measure)
    rows = bench_family.run("nt_xent", [16], 8, 2, CPU)
    by = {r["provider"]: r for r in rows}
    assert by["fastcl-torch"]["speedup_vs_naive"] == pytest.approx(2.0) and by["fastcl-torch"]["peak_mib"] == 1.0


def test_time_fn_median_and_percentiles(monkeypatch):
    """median, p20, p80 of the timed runs (not the warm-ups), from a fake clock: durations 1..9 ms
    and one 200 ms outlier give 5.5, 2.8 and 8.2 (inclusive quantiles)."""
    clock = [0.0]
    durations = iter([1.0, 1.0] + [3, 200, 1, 9, 5, 2, 8, 4, 7, 6])  # 2 warm-ups, 10 runs (ms)
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(durations) / 1e3
    med, p20, p80 = common.time_fn(fn, CPU, reps=10, warmup=2, min_reps=10)
    assert (med, p20, p80) == pytest.approx((5.5, 2.8, 8.2))


def test_slow_guard_skips_predicted_slow_steps(tmp_path):
    g = common.SlowGuard(100.0)
    assert not g.skip("a", 10**6)  # nothing measured yet: it runs
    g.record("c", 1000, 10.0)
    g.record("c", 2000, float("nan"))  # an OOM row predicts nothing and keeps the last figure
    assert g.skip("c", 4000)  # 10 ms * 16 > 100 ms
    g.record("a", 1000, 30.0)
    assert g.predicted_ms("a", 2000) == pytest.approx(120.0)  # ~B²
    assert g.skip("a", 2000) and not g.skip("a", 1500)
    g.record("b", 1000, float("nan"))  # an OOM row predicts nothing
    assert not g.skip("b", 10**6)
    # in a sweep: every provider measured at the first size, recorded as "slow" at the next
    path = tmp_path / "info.csv"
    bench_info_nce.run([32, 64], 8, "fp32", True, 2, CPU, str(path), only=["naive-torch"], slow_ms=1e-9)
    assert [(r["B"], r["status"]) for r in _rows(path)] == [("32", "ok"), ("64", "slow")]


def test_oom_is_a_result_other_errors_are_not():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    med, p20, p80, mem, status = common.measure(oom, CPU, 3)
    assert status == "OOM" and all(math.isnan(x) for x in (med, p20, p80, mem))

    def cpu_oom():  # what torch's CPU allocator raises when malloc fails
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 80000000000 bytes. Error code 12")

    assert common.measure(cpu_oom, CPU, 3)[4] == "OOM"

    def broken():
        raise ValueError("a bug, not a capacity limit")

    with pytest.raises(ValueError):
        common.measure(broken, CPU, 3)


def test_a_shape_a_provider_refuses_is_a_row():
    """inf-cl views D as heads of 16 to 256: at D = 33 it has no head size, and its row says
    n/a instead of crashing the sweep (the quick suite's D = 32 crashed it on the GPU, where
    inf-cl's default head_dim of 256 did not divide D)."""
    q = torch.randn(4, 33)
    with pytest.raises(common.Unsupported, match="D=33"):
        bench_info_nce._inf_cl(q, q, 0.07, True)
    assert common.measure(lambda: bench_info_nce._inf_cl(q, q, 0.07, True), CPU, 3)[4] == "n/a"


def test_provider_environment_covers_forward_and_backward(monkeypatch):
    """A provider's `env` (the cuda kernels' wgmma variant: FASTCL_CUDA_WGMMA=1) holds for its
    forward and its backward, and is undone afterwards."""
    monkeypatch.delenv("FASTCL_PROBE", raising=False)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(os.environ.get("FASTCL_PROBE"))
            ctx.shape = x.shape
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            seen.append(os.environ.get("FASTCL_PROBE"))
            return g * torch.ones(ctx.shape)

    def fn(q, k, t, sym):
        return Probe.apply(q) + k.sum()
    fn.env = {"FASTCL_PROBE": "on"}
    q = k = torch.randn(4, 3)
    bench_info_nce._time_provider(fn, q, k, False, "fwd+bwd", torch.device("cpu"), 3)
    assert seen and all(v == "on" for v in seen), seen
    assert "FASTCL_PROBE" not in os.environ


def test_kernel_variants_only_when_named(monkeypatch):
    """A kernel variant (an env setting of its backend) is timed only when --only names it, and
    carries the env its launcher reads."""
    monkeypatch.setattr(bench_info_nce, "fastcl_backends", lambda device: ["torch", "triton"])
    assert "fastcl-triton-bn32" not in bench_info_nce.providers(CPU, False)
    provs = bench_info_nce.providers(CPU, False, only=["fastcl-triton", "fastcl-triton-bn32"])
    assert provs["fastcl-triton-bn32"].env == {"FASTCL_BWD_BN": "32"}
    assert "fastcl-triton-bd256" not in provs
    provs = bench_info_nce.providers(CPU, False, only=["fastcl-triton-chunks", "fastcl-triton-onedot",
                                                       "fastcl-triton-bd256"])
    assert provs["fastcl-triton-bd256"].env == {"FASTCL_BWD_BD": "256"}
    assert "fastcl-triton-bd256-bn128" not in provs
    assert provs["fastcl-triton-chunks"].env == {"FASTCL_BWD_SAME_CHUNKS": "1"}
    assert provs["fastcl-triton-onedot"].env == {"FASTCL_BWD_SAME_CHUNKS": "0"}
    assert getattr(provs["fastcl-triton"], "env", {}) == {}
    assert "fastcl-cuda-wgmma" not in bench_info_nce.providers(CPU, False, only=["fastcl-cuda-wgmma"])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its ptxas)")
def test_triton_resources_compiles_offline():
    """scripts/triton_resources.py compiles the backward for sm_90 with Triton's own ptxas, no
    GPU, and reports registers, spills and the tile loop."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "scripts", "triton_resources.py"),
                          "--only", "grad dU one-direction"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("grad dU one-direction")]
    assert len(line) == 1, out.stdout
    regs = int(line[0].split("regs")[1].split()[0])
    assert 0 < regs <= 255 and "HGMMA" in line[0] and "inner loop:" in line[0]
    assert int(line[0].split("HGMMA")[1].split()[0]) > 0  # wgmma on sm_90


def test_time_fn_runs_adapt_to_the_step():
    calls = []
    med, p20, p80 = common.time_fn(lambda: calls.append(1), CPU, reps=20)
    assert len(calls) == 2 + 20 and p20 <= med <= p80  # fast: all 20 runs after 2 warm-ups
    calls.clear()

    def slow():
        calls.append(1)
        time.sleep(0.02)

    common.time_fn(slow, CPU, reps=20, budget_ms=50.0)
    assert len(calls) == 2 + 5  # ~20 ms a step, 50 ms budget: the minimum of 5 runs


def test_family_sweep_only_and_peers(tmp_path):
    path = tmp_path / "family.csv"
    bench_family.main(["--ops", "supcon,mnrl", "--sizes", "32", "--dim", "8", "--reps", "2", "--csv", str(path),
                       "--only", "naive-torch,fastcl-torch"])
    got = _rows(path)
    assert [(r["op"], r["provider"]) for r in got] == [("supcon", "naive-torch"), ("supcon", "fastcl-torch"),
                                                       ("mnrl", "naive-torch"), ("mnrl", "fastcl-torch")]
    assert all(r["status"] == "ok" for r in got)
    # without --only, the libraries installed here join the same run
    peers = {"nt_xent": {"lightly": "lightly", "pml": "pytorch_metric_learning"},
             "supcon": {"pml": "pytorch_metric_learning"},
             "mnrl": {"sentence-transformers": "sentence_transformers"},
             "mnrl_variant": {"sentence-transformers": "sentence_transformers"}}
    path = tmp_path / "family_all.csv"
    for op, libs in peers.items():
        bench_family.run(op, [32], 8, 2, CPU, str(path))
        names = {r["provider"] for r in _rows(path) if r["op"] == op and r["status"] == "ok"}
        assert {"naive-torch", "fastcl-torch"} | {p for p, m in libs.items() if importlib.util.find_spec(m)} == names


def test_distributed_bench_runs_every_op(capsys):
    """Each op's fwd+bwd on two gloo ranks, the distributed whitening included; a bad --ops or
    --group is refused before any process starts."""
    bench_distributed.main(["--local-batch", "8", "--dim", "8", "--group", "4", "--worlds", "2", "--reps", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == list(bench_distributed.OPS), rows
    assert all(r[1] == "2" and r[2] == "16" and float(r[3]) > 0 for r in rows), rows
    for bad in (["--ops", "clip"], ["--group", "3"]):
        with pytest.raises(SystemExit):
            bench_distributed.main(["--dim", "8"] + bad)
    assert "must divide" in capsys.readouterr().err


def test_max_batch_probe_and_whitening(tmp_path):
    path = tmp_path / "max.csv"
    rows = bench_max_batch.main(["--dim", "8", "--start", "32", "--max-b", "128", "--only", "fastcl-torch",
                                 "--csv", str(path)])
    assert [(r["provider"], r["max_B"], r["stopped_by"]) for r in rows] == [
        ("fastcl-torch", 128, "reached --max-b 128")]
    assert _rows(path)[0]["max_B"] == "128"
    path = tmp_path / "white.csv"
    bench_whitening.main(["--n", "64", "--d", "16", "--group", "8", "--reps", "2", "--csv", str(path)])
    got = _rows(path)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = [b for b in common.fastcl_backends(dev) if b != "torch"]  # on a GPU: Newton-Schulz only
    assert {(r["method"], r["backend"]) for r in got} == {(m, b) for m in ("zca", "cholesky", "newton_schulz")
                                                           for b in ("reference", "torch")} | {
        ("newton_schulz", b) for b in kernels}
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 for r in got)


def test_max_batch_probes_torch_compile_only_when_named(monkeypatch):
    """torch.compile of the naive loss joins the probe when --only names it (compiled eagerly
    here: the plumbing is under test, not Inductor), and only then."""
    compiled = []
    monkeypatch.setattr(bench_info_nce.torch, "compile", lambda f: compiled.append(f) or f)
    rows = bench_max_batch.main(["--dim", "8", "--start", "32", "--max-b", "64", "--only", "torch-compile"])
    assert [(r["provider"], r["max_B"]) for r in rows] == [("torch-compile", 64)] and len(compiled) == 1
    rows = bench_max_batch.main(["--dim", "8", "--start", "32", "--max-b", "32", "--only", "naive-torch"])
    assert [r["provider"] for r in rows] == ["naive-torch"] and len(compiled) == 1


def test_max_batch_probe_does_not_start_a_step_predicted_too_slow(monkeypatch):
    """A step costs ~B^2: after 0.3 s at B = 32, B = 64 (~1.2 s) is not started under a 1 s limit."""
    clock = [0.0]
    monkeypatch.setattr(bench_max_batch.time, "perf_counter", lambda: clock[0])

    def fn(q, k, t, sym):
        clock[0] += 0.3 * (q.shape[0] / 32) ** 2
        return (q * k).sum()
    best, stop = bench_max_batch.probe("fake", fn, CPU, 4, "fp32", 32, 1024, 1.0)
    assert best["B"] == 32 and best["seconds"] == pytest.approx(0.3)
    assert stop.startswith("time: B=64 would take")


def test_auto_figures_come_from_the_committed_csvs():
    """fastcl._dispatch.MEASURED_MS is what benchmarks.measured_figures reads off the committed
    H100 CSVs: the figures `auto` decides by can be traced to raw, dated rows."""
    from benchmarks import measured_figures
    from fastcl._dispatch import MEASURED_MS
    res = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")
    fig = measured_figures.figures(os.path.join(res, "info_nce_h100.csv"), os.path.join(res, "family_h100.csv"),
                                   os.path.join(res, "whitening_h100.csv"))
    assert fig == MEASURED_MS["sm_90"]


def test_ab_whitening_stats_times_both_and_restores(monkeypatch):
    """Both covariance dtypes timed (seen in the dtype group_whiten's S gets), and the default
    put back, also when a step raises."""
    from benchmarks import ab_whitening_stats
    from fastcl import whitening
    default = whitening.stats_dtype
    seen = []
    real = whitening.group_stats
    monkeypatch.setattr(whitening, "group_stats", lambda xg, eps, ddof, dtype=None, over=None: (
        seen.append(dtype), real(xg, eps, ddof, dtype, over))[1])
    rows = ab_whitening_stats.compare([10], 8, 4, 1, CPU, methods=("cholesky",))
    assert [r[:2] for r in rows] == [("cholesky", 10)] and all(t > 0 for t in rows[0][2:])
    assert {torch.float32, torch.float64} <= set(seen)
    assert whitening.stats_dtype is default
    monkeypatch.setattr(ab_whitening_stats, "_once", lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ab_whitening_stats.compare([10], 8, 4, 1, CPU)
    assert whitening.stats_dtype is default


def test_ab_torch_backend_runs_both_revisions_and_restores(monkeypatch):
    """The A/B of the torch backend against a git revision: each loss timed with both sources,
    and fastcl.chunked holds the current functions again afterwards (also on an error)."""
    from benchmarks import ab_torch_backend
    from fastcl import chunked
    current = (chunked.lse_forward, chunked.lse_backward)
    old = ab_torch_backend.load_revision("HEAD")
    assert old.lse_forward is not chunked.lse_forward and callable(old.lse_backward)
    seen = set()
    real_once = ab_torch_backend._once

    def once(step, device):  # which lse_forward each timed run used
        seen.add(chunked.lse_forward)
        return real_once(step, device)

    monkeypatch.setattr(ab_torch_backend, "_once", once)
    rows = ab_torch_backend.compare(old, [6], 4, 1, CPU)
    assert [r[:2] for r in rows] == [(n, 6) for n in ("clip", "info_nce", "nt_xent", "dcl", "supcon", "mnrl")]
    assert all(o > 0 and n > 0 for _, _, o, n in rows)
    assert seen == {old.lse_forward, current[0]}
    assert (chunked.lse_forward, chunked.lse_backward) == current
    monkeypatch.setattr(ab_torch_backend, "_once", lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ab_torch_backend.compare(old, [6], 4, 1, CPU)
    assert (chunked.lse_forward, chunked.lse_backward) == current


def test_ab_torch_backend_takes_a_revision_before_label_smoothing():
    """fastcl's op passes smoothing= to every backend's lse_backward; a revision's backend from
    before label smoothing takes it as 0 (all the A/B runs) and refuses any other value."""
    from benchmarks import ab_torch_backend
    seen = []
    wrapped = ab_torch_backend._without_smoothing(lambda *a, **kw: seen.append((a, kw)) or "ran")
    assert wrapped(1, 2, exclude_pos=True, smoothing=0.0) == "ran" and seen == [((1, 2), {"exclude_pos": True})]
    with pytest.raises(ValueError, match="predates label smoothing"):
        wrapped(1, 2, smoothing=0.1)


def test_suite_quick_writes_every_part(tmp_path, monkeypatch):
    """python -m benchmarks --quick: every part runs and appends to its CSV under FASTCL_BENCH_DIR."""
    from benchmarks.__main__ import main
    monkeypatch.setenv("FASTCL_BENCH_DIR", str(tmp_path))
    main(["--quick", "--mode", "fwd+bwd"])
    for name in ("info_nce", "family", "whitening", "max_batch"):
        assert _rows(tmp_path / f"{name}.csv"), name
    assert {r["B"] for r in _rows(tmp_path / "info_nce.csv")} == {"128", "256"}
    with pytest.raises(SystemExit, match="own files"):
        main(["--csv", str(tmp_path / "x.csv")])
    with pytest.raises(SystemExit, match="own files"):
        main(["--plot=x.png"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is measured on CUDA only")
def test_peak_memory_counts_the_gradients_a_step_writes():
    """A step that drops and rewrites .grad: the gradient's bytes are part of its peak, even
    though the timed runs left the previous .grad allocated."""
    dev = torch.device("cuda")
    x = torch.randn(1 << 20, device=dev, requires_grad=True)

    def step():
        x.grad = None
        (x * 2).sum().backward()

    step()  # as after the timed runs: x.grad is allocated
    assert common.peak_memory(step, dev, leaves=(x,)) >= 4 * x.numel()


def test_csv_refuses_rows_with_other_columns(tmp_path):
    path = tmp_path / "r.csv"
    common.append_csv(str(path), [dict(a=1, b=2)], CPU)
    common.append_csv(str(path), [dict(a=3, b=4)], CPU)
    assert [r["a"] for r in _rows(path)] == ["1", "3"]
    with pytest.raises(ValueError, match="columns"):
        common.append_csv(str(path), [dict(a=1, c=2)], CPU)
    with pytest.raises(ValueError, match="reps"):
        common.time_fn(lambda: None, CPU, 0)


def test_oom_in_the_memory_run_keeps_the_times(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(common, "peak_memory", oom)
    med, p20, p80, mem, status = common.measure(lambda: None, CPU, 3)
    assert status == "ok" and med == med and math.isnan(mem)


def test_gpu_run_names_only_providers_that_exist():
    """A provider named in gpu_run.sh's --only lists that the sweep does not know is silently
    left out (picked() keeps the names it has): after the wgmma/WMMA switch, a stale
    fastcl-cuda-wmma would have dropped a column on the GPU unnoticed."""
    import re
    script = open(os.path.join(os.path.dirname(__file__), "..", "scripts", "gpu_run.sh")).read().replace("\\\n", " ")
    named = {n for lst in re.findall(r"\$M?B [^\n]*--only ([\w,-]+)", script) for n in lst.split(",")}
    known = ({"naive-torch", "torch-compile", "open_clip", "inf-cl"}
             | {f"fastcl-{b}" for b in ("torch", "triton", "cuda")} | set(bench_info_nce.VARIANTS))
    assert named and named <= known, named - known
    assert {"fastcl-cuda-wgmma", "fastcl-triton-bd256", "torch-compile", "inf-cl"} <= named  # every step read


def test_gpu_slow_first_list_names_tests_that_exist():
    """gpu_run.sh starts the tests of tests/gpu_slow_tests.txt first; a renamed test left in
    the list would silently go back to its place in the queue."""
    import glob
    import re
    from tests.conftest import slow_test_names
    names = slow_test_names()
    defined = set()
    for path in glob.glob(os.path.join(os.path.dirname(__file__), "test_*.py")):
        defined |= set(re.findall(r"^def (test_\w+)\(", open(path).read(), re.M))
    assert len(names) >= 10 and len(set(names)) == len(names)
    assert set(names) <= defined, set(names) - defined


def test_slow_first_moves_only_the_named_tests_and_keeps_every_test():
    from tests.conftest import slow_first

    class Item:
        def __init__(self, name):
            self.originalname, self.name = name, name + "[p]"

    items = [Item(n) for n in ("a", "slow2", "b", "slow1", "slow2", "c")]
    out = slow_first(items, ["slow1", "slow2", "absent"])
    assert [i.originalname for i in out] == ["slow1", "slow2", "slow2", "a", "b", "c"]
    assert sorted(map(id, out)) == sorted(map(id, items))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_test_run_stopped_by_sigterm_still_summarises(tmp_path, workers):
    """gpu_run.sh stops the GPU tests with timeout's SIGTERM, sent to the whole process group;
    pytest then died without its summary, so a run cut short said neither how many tests had
    passed nor which were slow (2026-11-24). tests/conftest.py makes it end as on Ctrl-C."""
    import signal
    import subprocess
    import sys
    if workers and importlib.util.find_spec("xdist") is None:
        pytest.skip("pytest-xdist not installed (the test extra installs it)")
    mark = tmp_path / "slow_started"
    (tmp_path / "test_x.py").write_text(
        "import os, time\n\n"
        "def test_quick():\n    pass\n\n"
        f"def test_slow():\n    open({str(mark)!r}, 'w').close()\n    time.sleep(120)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
           "-p", "no:benchmark", "-c", os.devnull, "--rootdir", str(tmp_path), "--durations=5",
           str(tmp_path / "test_x.py")] + (["-n", str(workers)] if workers else [])
    # Not an xdist worker's variables (this test under -n): conftest read PYTEST_XDIST_WORKER
    # and left SIGTERM to a controller that was not there (a hang until the timeout).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(PYTHONPATH=root, FASTCL_SLOW_FIRST="0")
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not mark.exists() and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.2)
        time.sleep(3.0)  # test_quick's report reaches the controller (margin for a loaded CPU)
        os.killpg(p.pid, signal.SIGTERM)  # as timeout does
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert mark.exists(), out
    assert "KeyboardInterrupt: SIGTERM" in out and "slowest" in out, out
    assert "1 passed" in out, out


def test_header_names_the_commit_the_caller_gives(monkeypatch):
    """The lent GPU's copy of the tree has no .git: 22 of the H100 rows say '@ unknown'.
    FASTCL_COMMIT names it; without it git's own, '-dirty' for uncommitted changes."""
    monkeypatch.setenv("FASTCL_COMMIT", "abc1234-dirty")
    assert "@ abc1234-dirty |" in common.header(CPU)
    monkeypatch.delenv("FASTCL_COMMIT")
    assert common.commit() != "abc1234-dirty"


def test_only_names_that_do_not_run_are_said(capsys):
    """--only with a misspelt or unavailable provider printed the table header alone and exited
    0, with no CSV."""
    got = common.picked({"naive-torch": 1, "fastcl-torch": 2}, ["fastcl-trition", "fastcl-torch"])
    assert list(got) == ["fastcl-torch"]
    out = capsys.readouterr().out
    assert "not run here (unknown, or unavailable on this machine): fastcl-trition" in out
    assert "available: naive-torch, fastcl-torch" in out


@pytest.mark.parametrize("main,argv", [
    (bench_info_nce.main, ["--sizes", "0,64"]),           # ZeroDivisionError in the slow guard
    (bench_info_nce.main, ["--reps", "0"]),               # failed after the header
    (bench_family.main, ["--ops", "nt_xent,ntxent"]),     # ran nt_xent, then died on the unknown op
    (bench_family.main, ["--sizes", "64,x"]),
    (bench_whitening.main, ["--d", "64", "--group", "48"]),  # one group of 64, labelled 48
    (bench_max_batch.main, ["--start", "1024", "--max-b", "512"]),  # max_B 0, "reached --max-b"
])
def test_bad_arguments_are_refused_before_anything_runs(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().out


def test_backward_mode_takes_a_refused_shape_as_a_row():
    """--mode bwd ran the provider's forward outside `measure`: a shape it refuses crashed the
    sweep (fwd+bwd gave an n/a row)."""
    def refuses(q, k, t, sym):
        raise common.Unsupported("no head size divides D")
    q = torch.randn(8, 4)
    for mode in ("bwd", "fwd+bwd", "fwd"):
        assert bench_info_nce._time_step(refuses, q, q, True, mode, CPU, 2)[4] == "n/a", mode


def test_max_batch_records_a_refusal_and_a_probe_cut_short(tmp_path, monkeypatch):
    """A provider refusing the shape in the warm-ups crashed the probe (the later providers
    were lost); a timeout's SIGTERM during a probe lost that provider's best B so far."""
    def refuses(q, k, t, sym):
        raise common.Unsupported("no head size divides D")

    def cut_at_128(q, k, t, sym):
        if q.shape[0] >= 128:
            raise SystemExit(124)  # what stop_on_sigterm turns the SIGTERM into
        return (q * k).sum()
    monkeypatch.setattr(bench_max_batch, "providers",
                        lambda device, compile_naive, only: {"refuses": refuses, "cut": cut_at_128})
    path = tmp_path / "max.csv"
    with pytest.raises(SystemExit):
        bench_max_batch.main(["--dim", "8", "--start", "32", "--max-b", "1024", "--csv", str(path)])
    rows = _rows(path)
    assert [(r["provider"], r["max_B"]) for r in rows] == [("refuses", "0"), ("cut", "64")]
    assert rows[0]["stopped_by"].startswith("n/a: no head size") and rows[1]["stopped_by"].startswith("timeout")


def test_open_clip_has_no_one_direction_row():
    """Its one-direction row timed naive torch under open_clip's name."""
    with pytest.raises(common.Unsupported, match="one-direction"):
        bench_info_nce._no_one_direction()


def test_measured_figures_refuse_rows_of_two_gpus(tmp_path):
    """An H100 and an H200 are both sm_90: their rows in one entry would mix two GPUs."""
    from benchmarks import measured_figures
    src = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "family_h100.csv")
    with open(src) as f:
        rows = list(csv.DictReader(f))
    point = [r for r in rows if r["op"] == "nt_xent" and r["B"] == "4096" and r["D"] == "256"
             and r["status"] == "ok" and r["provider"].startswith("fastcl-")]
    assert point
    other = dict(point[-1], header=point[-1]["header"].replace("H100 80GB HBM3", "H200"))
    path = tmp_path / "mixed.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(point + [other])
    with pytest.raises(ValueError, match="several GPUs"):
        measured_figures.figures(family=str(path))
    devices = set()
    measured_figures.figures(family=src, devices=devices)
    assert devices == {"NVIDIA H100 80GB HBM3"}
