"""Run the benchmark suite on whatever device is present: ``python -m benchmarks``."""
import os
import sys

from benchmarks import bench_info_nce

if __name__ == "__main__":
    out = os.environ.get("FASTCL_BENCH_DIR", os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out, exist_ok=True)
    bench_info_nce.main(sys.argv[1:] + ["--csv", os.path.join(out, "info_nce.csv")])
