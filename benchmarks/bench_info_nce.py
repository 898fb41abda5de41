"""InfoNCE / CLIP loss, forward+backward: fastcl backends vs naive torch on this device.

Counts 8*B*N*D flops for fwd+bwd (2 for the forward logits, 6 for the backward's recompute
and the two gradient matmuls), 2*B*N*D for fwd and 6*B*N*D for bwd: the nominal figures used
across the suite. Mode bwd runs the forward once, untimed, and times backward passes through the
kept graph (retain_graph=True); torch.compile's backward cannot be re-run that way, so it is left
out of that mode.
"""
import argparse
import contextlib
import importlib.util
import os

import torch
import torch.nn.functional as F

import fastcl.functional as FCL
from benchmarks.common import (SlowGuard, append_csv, fastcl_backends, finishing, fmt_ms, header, is_oom,
                               measure, Unsupported, count, names, picked, progress, sizes, stop_on_sigterm)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def naive_torch(q, k, temperature, symmetric):
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits.float(), labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T.float(), labels))
    return loss


def _symmetric(fn, q, k, sym):
    return 0.5 * (fn(q, k) + fn(k, q)) if sym else fn(q, k)


# Kernel variants timed beside their backend's default, selected by environment variables that
# the launchers read at every call: the cuda kernels with WMMA instead of wgmma (Hopper), the
# Triton backward with 64 x 32 tiles (no spills in its tile loop, scripts/triton_resources.py)
# instead of 64 x 64 (the fastest measured so far), with D-slabs of 256 (at D = 512: half the
# registers for the [BM, BD] gradient accumulator and the slab of A, for S recomputed twice;
# no spills in Triton 3.9's offline sm_90 compile, with 64 x 64 or 64 x 128 tiles),
# and the Triton backward's S recompute in the forward's D-chunks (the fp32 default) or as one
# dot over the D-slab (the 16-bit default); and the Triton kernels split over the column blocks
# (FASTCL_TRITON_SPLIT=auto: for batches with fewer row blocks than two per SM, untimed so far).
VARIANTS = {
    "fastcl-triton-split": ("triton", {"FASTCL_TRITON_SPLIT": "auto"}),
    "fastcl-cuda-wgmma": ("cuda", {"FASTCL_CUDA_WGMMA": "1"}),
    "fastcl-triton-bn32": ("triton", {"FASTCL_BWD_BN": "32"}),
    "fastcl-triton-bd256": ("triton", {"FASTCL_BWD_BD": "256"}),
    "fastcl-triton-bd256-bn128": ("triton", {"FASTCL_BWD_BD": "256", "FASTCL_BWD_BN": "128"}),
    "fastcl-triton-chunks": ("triton", {"FASTCL_BWD_SAME_CHUNKS": "1"}),
    "fastcl-triton-onedot": ("triton", {"FASTCL_BWD_SAME_CHUNKS": "0"}),
}


def providers(device, compile_naive: bool, only=None):
    """Everything that computes the same loss, in one run: fastcl backends, naive torch (eager
    and compiled), and the libraries users have today where they are installed. `only` skips
    the others' imports (open_clip's alone takes seconds)."""
    out = {"naive-torch": lambda q, k, t, sym: naive_torch(q, k, t, sym)}
    if compile_naive:
        compiled = torch.compile(naive_torch)
        out["torch-compile"] = lambda q, k, t, sym: compiled(q, k, t, sym)
    for be in fastcl_backends(device):
        out[f"fastcl-{be}"] = lambda q, k, t, sym, be=be: FCL.info_nce(q, k, temperature=t, symmetric=sym,
                                                                       backend=be)
    for name, (be, env) in VARIANTS.items():  # only when named: each compiles kernels of its own
        if f"fastcl-{be}" not in out or not only or name not in only:
            continue
        if name == "fastcl-cuda-wgmma":
            from fastcl import cuda_backend
            if not cuda_backend.wgmma_available():  # not Hopper (or no sm_90a build): no such variant
                continue
        fn = lambda q, k, t, sym, be=be: FCL.info_nce(q, k, temperature=t, symmetric=sym, backend=be)  # noqa: E731
        fn.env = env  # for its forward and backward alike
        out[name] = fn
    if importlib.util.find_spec("open_clip") and (not only or "open_clip" in only):
        import open_clip
        oc = open_clip.ClipLoss()
        out["open_clip"] = lambda q, k, t, sym: oc(F.normalize(q, dim=-1), F.normalize(k, dim=-1), 1.0 / t) \
            if sym else _no_one_direction()
    if device.type == "cuda" and importlib.util.find_spec("inf_cl") and (not only or "inf-cl" in only):
        out["inf-cl"] = _inf_cl
    return out


def _no_one_direction():
    # open_clip's ClipLoss is the CLIP loss only: its one-direction row used to time naive torch
    raise Unsupported("open_clip: ClipLoss has no one-direction loss")


def _inf_cl(q, k, t, sym):
    """inf-cl's loss, one direction per `cal_inf_loss` call (two for the CLIP loss). It views D
    as heads of `head_dim` (default 256), so D must be a multiple of one of its head sizes."""
    head = next((h for h in (256, 128, 64, 32, 16) if q.shape[1] % h == 0), None)
    if head is None:
        raise Unsupported(f"inf-cl: D={q.shape[1]} is not a multiple of 16")
    from inf_cl import cal_inf_loss
    return _symmetric(lambda a, b: cal_inf_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), scale=1.0 / t,
                                                head_dim=head), q, k, sym)


@contextlib.contextmanager
def _environment(env):
    old = {n: os.environ.get(n) for n in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _time_provider(fn, q, k, symmetric, mode, device, reps):
    """(median ms, p20, p80, peak bytes, status) of one provider's step on copies of q, k, in the
    environment the provider asks for (its `env` attribute)."""
    with _environment(getattr(fn, "env", {})):
        return _time_step(fn, q, k, symmetric, mode, device, reps)


def _time_step(fn, q, k, symmetric, mode, device, reps):
    backward = mode != "fwd"
    qq, kk = q.clone().requires_grad_(backward), k.clone().requires_grad_(backward)
    loss = None
    refused = None
    if mode == "bwd":
        try:  # the forward, once and untimed; its graph is kept for the timed backwards
            loss = fn(qq, kk, 0.07, symmetric)
        except Unsupported as e:  # a row ("n/a"), raised from the step as in the other modes
            refused = e
        except Exception as e:  # noqa: BLE001 - OOM is a result; anything else is not
            if not is_oom(e):
                raise

    def step():
        if refused is not None:
            raise refused
        if mode == "bwd":
            if loss is None:
                raise torch.OutOfMemoryError("the untimed forward ran out of memory")
            qq.grad = kk.grad = None
            loss.backward(retain_graph=True)
        elif backward:
            qq.grad = kk.grad = None
            fn(qq, kk, 0.07, symmetric).backward()
        else:
            fn(qq, kk, 0.07, symmetric)

    # qq, kk and the graph are freed on return
    return measure(step, device, reps, leaves=(qq, kk) if backward else ())


def run(sizes, dim, dtype, symmetric, reps, device, csv_path=None, only=None, mode="fwd+bwd",
        compile_naive=False, plot_path=None, slow_ms=float("inf")):
    print(header(device))
    print(f"info_nce {mode} | D={dim} | {dtype} | symmetric={symmetric} | median of up to {reps} runs (p20-p80; "
          f"fewer, at least 5, where a step is slow: ~3 s per provider and size)")
    cols = f"{'provider':<16}{'B':>9}{'ms':>11}{'p20-p80':>17}{'peak MiB':>11}{'TFLOP/s':>9}{'x naive':>9}"
    flop_factor = {"fwd+bwd": 8, "fwd": 2, "bwd": 6}[mode]
    print(cols)
    rows, naive_ms, guard = [], {}, SlowGuard(slow_ms)
    provs = picked(providers(device, compile_naive, only), only)
    if mode == "bwd":
        provs.pop("torch-compile", None)  # its compiled backward cannot run twice on one graph
    bar = progress(len(sizes) * len(provs), "info_nce")
    with finishing(rows, bar, plot_path, f"info_nce {mode}, D={dim}, {dtype}"):
        for B in sizes:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(B, dim, device=device, generator=g).to(DTYPES[dtype])
            k = (q.float() + 0.5 * torch.randn(B, dim, device=device, generator=g)).to(DTYPES[dtype])
            for name, fn in provs.items():
                bar.update()
                if guard.skip(name, B):  # predicted from a smaller B to take > slow_ms per step
                    print(f"  ({name} at B={B}: predicted {guard.predicted_ms(name, B):.0f} ms > --slow-ms "
                          f"{slow_ms:.0f})", flush=True)
                    nan = float("nan")
                    med, p20, p80, mem, status = nan, nan, nan, nan, "slow"
                else:
                    med, p20, p80, mem, status = _time_provider(fn, q, k, symmetric, mode, device, reps)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    guard.record(name, B, med)
                if name == "naive-torch":
                    naive_ms[B] = med
                tflops = flop_factor * B * B * dim / (med * 1e-3) / 1e12
                speedup = naive_ms.get(B, float("nan")) / med
                row = dict(op="info_nce", mode=mode, provider=name, B=B, D=dim, dtype=dtype, symmetric=symmetric,
                           status=status, ms=med, p20=p20, p80=p80, peak_mib=mem / 2**20, tflops=tflops,
                           speedup_vs_naive=speedup, device=str(device))
                rows.append(row)
                append_csv(csv_path, [row], device)
                ms = fmt_ms(status, med)
                print(f"{name:<16}{B:>9}{ms:>11}{f'{p20:.2f}-{p80:.2f}':>17}{row['peak_mib']:>11.1f}"
                      f"{tflops:>9.1f}{speedup:>9.2f}", flush=True)
    return rows


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=sizes, default="4096,16384,32768,65536" if cuda else "256,1024,2048")
    p.add_argument("--dim", type=int, default=512 if cuda else 128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--one-direction", action="store_true", help="InfoNCE instead of the CLIP loss")
    p.add_argument("--reps", type=count, default=20 if cuda else 5)
    p.add_argument("--csv", default=None)
    p.add_argument("--only", type=names, default=None, help="comma-separated providers")
    p.add_argument("--mode", choices=["fwd", "bwd", "fwd+bwd"], default="fwd+bwd")
    p.add_argument("--compile", action="store_true", default=None,
                   help="also time torch.compile of the naive loss (default: on CUDA only)")
    p.add_argument("--plot", default=None, help="PNG path for time/memory vs B")
    p.add_argument("--slow-ms", type=float, default=1000.0 if cuda else 2000.0,
                   help="a provider predicted (~B^2 from its last size) to be slower than this per step "
                        "is skipped at that B and recorded as 'slow'")
    a = p.parse_args(argv)
    stop_on_sigterm()
    device = torch.device("cuda" if cuda else "cpu")
    run(a.sizes, a.dim, a.dtype, not a.one_direction, a.reps, device,
        a.csv, a.only, a.mode,
        cuda if a.compile is None else a.compile, a.plot, a.slow_ms)


if __name__ == "__main__":
    main()
