"""Run the benchmark suite on whatever device is present: ``python -m benchmarks [--quick]``.

Appends to benchmarks/results/*.csv (or $FASTCL_BENCH_DIR) and writes PNG plots beside them.
``--quick``: small sizes for every part (about 20 s on a 2-core CPU; checks the suite runs, measures
little). Other arguments go to the InfoNCE sweep (see ``python -m benchmarks.bench_info_nce
--help``); the suite names its own output files, so ``--csv`` and ``--plot`` are refused here.
"""
import os
import sys

from benchmarks import bench_family, bench_info_nce, bench_max_batch, bench_whitening

# --quick: every part at small sizes, whatever the device.
QUICK = {
    "info_nce": ["--sizes", "128,256", "--dim", "32", "--reps", "2"],
    "family": ["--sizes", "64,128", "--dim", "32", "--reps", "2"],
    "whitening": ["--n", "512", "--d", "64", "--group", "16", "--reps", "2"],
    "max_batch": ["--start", "128", "--max-b", "512", "--max-seconds", "2", "--dim", "32"],
}


def main(argv):
    for a in argv:
        if a.split("=")[0] in ("--csv", "--plot"):
            sys.exit(f"{a.split('=')[0]}: the suite writes its own files under $FASTCL_BENCH_DIR "
                     f"(default benchmarks/results); run python -m benchmarks.bench_info_nce for one file")
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    extra = (lambda part: QUICK[part]) if quick else (lambda part: [])
    out = os.environ.get("FASTCL_BENCH_DIR", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out, exist_ok=True)
    # every mode unless the caller picked one (the plot shows fwd+bwd)
    picked = any(a == "--mode" or a.startswith("--mode=") for a in argv)
    modes = [[]] if picked else [[], ["--mode", "fwd"], ["--mode", "bwd"]]
    for i, mode in enumerate(modes):
        plot = ["--plot", os.path.join(out, "info_nce.png")] if i == 0 else []
        bench_info_nce.main(extra("info_nce") + argv + mode + ["--csv", os.path.join(out, "info_nce.csv")] + plot)
    bench_family.main(extra("family") + ["--csv", os.path.join(out, "family.csv"), "--plot-dir", out])
    bench_whitening.main(extra("whitening") + ["--csv", os.path.join(out, "whitening.csv")])
    bench_max_batch.main(extra("max_batch") + ["--csv", os.path.join(out, "max_batch.csv")])


if __name__ == "__main__":
    main(sys.argv[1:])
