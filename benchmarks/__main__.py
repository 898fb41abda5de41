"""Run the benchmark suite on whatever device is present: ``python -m benchmarks``.

Appends to benchmarks/results/*.csv (or $FASTCL_BENCH_DIR) and writes PNG plots beside them.
Extra arguments go to the InfoNCE sweep (see ``python -m benchmarks.bench_info_nce --help``).
"""
import os
import sys

from benchmarks import bench_family, bench_info_nce, bench_max_batch, bench_whitening

if __name__ == "__main__":
    out = os.environ.get("FASTCL_BENCH_DIR", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out, exist_ok=True)
    # every mode unless the caller picked one (the plot shows fwd+bwd)
    picked = any(a == "--mode" or a.startswith("--mode=") for a in sys.argv[1:])
    modes = [[]] if picked else [[], ["--mode", "fwd"], ["--mode", "bwd"]]
    for i, mode in enumerate(modes):
        plot = ["--plot", os.path.join(out, "info_nce.png")] if i == 0 else []
        bench_info_nce.main(sys.argv[1:] + mode + ["--csv", os.path.join(out, "info_nce.csv")] + plot)
    bench_family.main(["--csv", os.path.join(out, "family.csv"), "--plot-dir", out])
    bench_whitening.main(["--csv", os.path.join(out, "whitening.csv")])
    bench_max_batch.main(["--csv", os.path.join(out, "max_batch.csv")])
