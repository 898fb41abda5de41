"""Group whitening fwd+bwd: fastcl backends vs the naive torch.linalg reference (eigh autograd)."""
import argparse
import torch

from benchmarks.common import append_csv, count, fastcl_backends, fmt_ms, header, measure
from fastcl.whitening import group_whiten

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(n, d, group, methods, reps, device, dtype="fp32", csv_path=None):
    print(header(device))
    print(f"group_whiten fwd+bwd | N={n} D={d} group size {group} | {dtype} | median of up to {reps} runs "
          f"(p20-p80; fewer, at least 5, where a step is slow)")
    print(f"{'method':<15}{'backend':<11}{'ms':>10}{'p20-p80':>17}{'peak MiB':>10}{'x reference':>13}")
    x = torch.randn(n, d, device=device, generator=torch.Generator(device=device).manual_seed(0))
    x = (x + 3.0).to(DTYPES[dtype])
    gy = torch.randn_like(x)
    backends = ["reference"] + fastcl_backends(device)
    rows = []
    for method in methods:
        ref_ms = float("nan")
        for backend in backends:
            if backend in ("triton", "cuda") and method != "newton_schulz":
                continue
            xx = x.clone().requires_grad_()

            def step():
                xx.grad = None
                group_whiten(xx, d // group, method=method, backend=backend).backward(gy)

            med, p20, p80, mem, status = measure(step, device, reps, leaves=(xx,))
            if backend == "reference":
                ref_ms = med
            row = dict(op="group_whiten", method=method, backend=backend, N=n, D=d, group=group,
                       dtype=dtype, status=status, ms=med, p20=p20, p80=p80, peak_mib=mem / 2**20,
                       speedup_vs_reference=ref_ms / med, device=str(device))
            rows.append(row)
            append_csv(csv_path, [row], device)
            print(f"{method:<15}{backend:<11}{fmt_ms(status, med):>10}{f'{p20:.2f}-{p80:.2f}':>17}"
                  f"{row['peak_mib']:>10.1f}{ref_ms / med:>13.2f}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--methods", default="zca,cholesky,newton_schulz")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--reps", type=count, default=20 if torch.cuda.is_available() else 5)
    p.add_argument("--csv", default=None)
    a = p.parse_args(argv)
    if a.group < 1 or a.d % a.group:  # else d // group groups of another size, labelled `group`
        p.error(f"--group {a.group} must divide --d {a.d}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run(a.n, a.d, a.group, a.methods.split(","), a.reps, device, a.dtype, a.csv)


if __name__ == "__main__":
    main()
