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


# The reference point of each figure: the CSV columns a row must match.
CLIP = dict(op="info_nce", mode="fwd+bwd", B="32768", D="512", dtype="bf16", symmetric="True")
NT_XENT = dict(op="nt_xent", mode="fwd+bwd", B="4096", D="256", dtype="fp32")
NEWTON_SCHULZ = dict(method="newton_schulz", N="8192", D="768", group="64", dtype="fp32")


def _times(path, point, backend_of, devices):
    """{backend: [ms, ...] in file order} of the rows at the reference point; each row's GPU is
    added to the set `devices`."""
    out = {}
    for r in _rows(path):
        b = backend_of(r)
        if b in BACKENDS and all(r[k] == v for k, v in point.items()):
            out.setdefault(b, []).append(float(r["ms"]))
            devices.add(_gpu(r))
    return out


def _gpu(row):
    """The GPU's name in a row's header ("device: NAME (n SMs, ...) | torch ...")."""
    return row.get("header", "").split(" | ")[0].removeprefix("device: ").split(" (")[0]


def _fastcl(row):  # provider "fastcl-<backend>"
    p = row["provider"]
    return p[len("fastcl-"):] if p.startswith("fastcl-") else None


def figures(info=None, family=None, whitening=None, devices=None):
    """{op: {precision: {backend: ms}}} from the CSV paths given (None: not read). The rows
    must come from one GPU (an entry is per architecture, and an H100 and an H200 are both
    sm_90); its name is added to `devices`, a set, if given."""
    out, seen = {}, set()
    latest = {prec: {b: round(ms[-1], 1) for b, ms in _times(path, point, _fastcl, seen).items()}
              for prec, path, point in (("16bit", info, CLIP), ("fp32", family, NT_XENT))}
    if any(latest.values()):
        out["info_nce"] = {prec: v for prec, v in latest.items() if v}
    ns = _times(whitening, NEWTON_SCHULZ, lambda r: r["backend"], seen)
    if ns:
        out["group_whiten"] = {"fp32": {b: round(statistics.mean(ms), 1) for b, ms in ns.items()}}
    if len(seen) > 1:
        raise ValueError(f"the rows come from several GPUs, {sorted(seen)}: give the CSVs of one")
    if devices is not None:
        devices.update(seen)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, help="e.g. sm_90 (torch.cuda.get_device_capability)")
    p.add_argument("--info", help="bench_info_nce CSV")
    p.add_argument("--family", help="bench_family CSV")
    p.add_argument("--whitening", help="bench_whitening CSV")
    a = p.parse_args(argv)
    devices = set()
    fig = figures(a.info, a.family, a.whitening, devices)
    print(f"# MEASURED_MS entry from {', '.join(x for x in (a.info, a.family, a.whitening) if x)} "
          f"({', '.join(sorted(devices)) or 'no rows'})")
    print(f'"{a.arch}": ' + pprint.pformat(fig, sort_dicts=True, width=100) + ",")
    return fig


if __name__ == "__main__":
    main()
