"""The figures `auto` chooses backends by (fastcl._dispatch.MEASURED_MS), taken from benchmark CSVs.

    python -m benchmarks.measured_figures --arch sm_90 --info info_nce.csv --family family.csv \
        --whitening whitening.csv

prints the entry for one GPU architecture, to paste into fastcl/_dispatch.py. Each figure is a
fwd+bwd median in ms at the reference point below; the latest row counts (the CSVs are
append-only), except for whitening, whose run-to-run spread is large: the mean of every row.
  info_nce 16bit:    CLIP loss (bench_info_nce), B=32768, D=512, bf16
  info_nce fp32:     NT-Xent (bench_family), B=4096 pairs, D=256, fp32
  group_whiten fp32: Newton-Schulz (bench_whitening), N=8192, D=768, groups of 64
"""
import argparse
import csv
import os
import pprint
import statistics

BACKENDS = ("triton", "cuda", "torch")


def _rows(path):
    if not path or not os.path.exists(path):  # a sweep that was cut short before its first row
        return []
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r.get("status") == "ok"]


def figures(info=None, family=None, whitening=None):
    """{op: {precision: {backend: ms}}} from the CSV paths given (None: not read)."""
    out = {}

    def latest(rows, match, key):
        found = {}
        for r in rows:  # file order: a later row replaces an earlier one
            if match(r):
                found[key(r)] = round(float(r["ms"]), 1)
        return found

    clip = latest(_rows(info), lambda r: (r["op"], r["mode"], r["B"], r["D"], r["dtype"], r["symmetric"]) ==
                  ("info_nce", "fwd+bwd", "32768", "512", "bf16", "True")
                  and r["provider"][len("fastcl-"):] in BACKENDS, lambda r: r["provider"][len("fastcl-"):])
    ntx = latest(_rows(family), lambda r: (r["op"], r["mode"], r["B"], r["D"], r["dtype"]) ==
                 ("nt_xent", "fwd+bwd", "4096", "256", "fp32")
                 and r["provider"][len("fastcl-"):] in BACKENDS, lambda r: r["provider"][len("fastcl-"):])
    if clip or ntx:
        out["info_nce"] = {k: v for k, v in (("16bit", clip), ("fp32", ntx)) if v}
    ns = {}
    for r in _rows(whitening):
        if (r["method"], r["N"], r["D"], r["group"], r["dtype"]) == ("newton_schulz", "8192", "768", "64", "fp32") \
                and r["backend"] in BACKENDS:
            ns.setdefault(r["backend"], []).append(float(r["ms"]))
    if ns:
        out["group_whiten"] = {"fp32": {b: round(statistics.mean(v), 1) for b, v in ns.items()}}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, help="e.g. sm_90 (torch.cuda.get_device_capability)")
    p.add_argument("--info", help="bench_info_nce CSV")
    p.add_argument("--family", help="bench_family CSV")
    p.add_argument("--whitening", help="bench_whitening CSV")
    a = p.parse_args(argv)
    fig = figures(a.info, a.family, a.whitening)
    print(f"# MEASURED_MS entry from {', '.join(x for x in (a.info, a.family, a.whitening) if x)}")
    print(f'"{a.arch}": ' + pprint.pformat(fig, sort_dicts=True, width=100) + ",")
    return fig


if __name__ == "__main__":
    main()
