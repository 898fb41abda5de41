"""The loss family, fwd+bwd: fastcl vs naive torch vs the libraries users have today, same run.

nt_xent: lightly / pytorch-metric-learning NTXentLoss; supcon: pytorch-metric-learning
SupConLoss; mnrl: sentence-transformers MultipleNegativesRankingLoss (on given embeddings);
mnrl_variant (not in the default --ops): the same with every direction and a hardness penalty.
Libraries that are not installed are left out of the table. B is the number of pairs (nt_xent)
or samples (supcon, mnrl, mnrl_variant).
"""
import argparse
import importlib.util

import torch
import torch.nn.functional as F

import fastcl.functional as FCL
from benchmarks.common import (SlowGuard, append_csv, fastcl_backends, finishing, fmt_ms, header, measure,
                               count, names, picked, progress, sizes, stop_on_sigterm)
from fastcl import reference as R


def _has(m):
    return importlib.util.find_spec(m) is not None


OPS = ("nt_xent", "supcon", "mnrl", "mnrl_variant")


def providers(op, device):
    fused = fastcl_backends(device)
    out = {}
    if op == "nt_xent":
        out["naive-torch"] = lambda a, b, lab: R.nt_xent_reference(a, b, temperature=0.1)
        for be in fused:
            out[f"fastcl-{be}"] = lambda a, b, lab, be=be: FCL.nt_xent(a, b, temperature=0.1, backend=be)
        if _has("pytorch_metric_learning"):
            from pytorch_metric_learning.losses import NTXentLoss
            pml = NTXentLoss(temperature=0.1)
            out["pml"] = lambda a, b, lab: pml(torch.cat([a, b]), torch.arange(a.shape[0], device=a.device).repeat(2))
        if _has("lightly"):
            from lightly.loss import NTXentLoss as LNT
            ll = LNT(temperature=0.1)
            out["lightly"] = lambda a, b, lab: ll(a, b)
    elif op == "supcon":
        out["naive-torch"] = lambda a, b, lab: R.supcon_reference(a, lab, temperature=0.1)
        for be in fused:
            out[f"fastcl-{be}"] = lambda a, b, lab, be=be: FCL.supcon(a, lab, temperature=0.1, backend=be)
        if _has("pytorch_metric_learning"):
            from pytorch_metric_learning.losses import SupConLoss
            pml = SupConLoss(temperature=0.1)
            out["pml"] = lambda a, b, lab: pml(a, lab)
    elif op == "mnrl":
        def naive(a, b, lab):
            scores = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T * 20.0
            return F.cross_entropy(scores.float(), torch.arange(a.shape[0], device=a.device))
        out["naive-torch"] = naive
        for be in fused:
            out[f"fastcl-{be}"] = lambda a, b, lab, be=be: FCL.multiple_negatives_ranking(a, b, backend=be)
        _sentence_transformers(out, {})
    elif op == "mnrl_variant":
        out["naive-torch"] = lambda a, b, lab: R.mnrl_reference(a, b, scale=20.0, **MNRL_VARIANT)
        for be in fused:
            out[f"fastcl-{be}"] = lambda a, b, lab, be=be: FCL.multiple_negatives_ranking(
                a, b, scale=20.0, backend=be, **MNRL_VARIANT)
        _sentence_transformers(out, MNRL_VARIANT)
    else:
        raise ValueError(f"unknown op {op!r}")
    return out


# mnrl_variant: every direction, one softmax, the penalty on all negatives (sentence-transformers'
# options); each direction is a fused pass of its own.
MNRL_VARIANT = dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                    hardness_mode="all_negatives", hardness_strength=1.0)


def _sentence_transformers(out, options):
    """sentence-transformers' MNRL with these options, where installed (and new enough for them)."""
    if not _has("sentence_transformers"):
        return
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    class _Given(torch.nn.Module):  # the embeddings are the features: time the loss alone
        def forward(self, f):
            return {"sentence_embedding": f["x"]}
    try:
        st = MultipleNegativesRankingLoss(_Given(), scale=20.0, **options)
    except TypeError:  # a release without the variants
        return
    out["sentence-transformers"] = lambda a, b, lab: st([{"x": a}, {"x": b}], None)


def run(op, sizes, dim, reps, device, csv_path=None, plot_path=None, slow_ms=2000.0, only=None):
    print(header(device))
    print(f"{op} fwd+bwd | D={dim} | fp32 | median of up to {reps} runs (p20-p80; fewer, at least 5, where a "
          f"step is slow: ~3 s per provider and size)")
    print(f"{'provider':<22}{'B':>8}{'ms':>10}{'p20-p80':>17}{'peak MiB':>10}{'x naive':>9}")
    provs = picked(providers(op, device), only)
    bar = progress(len(sizes) * len(provs), op)
    rows, guard = [], SlowGuard(slow_ms)
    with finishing(rows, bar, plot_path, f"{op} fwd+bwd, D={dim}"):
        for B in sizes:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(B, dim, device=device, generator=g)
            b = a + 0.5 * torch.randn(B, dim, device=device, generator=g)
            lab = torch.randint(0, max(2, B // 8), (B,), device=device, generator=g)
            naive_ms = float("nan")
            for name, fn in provs.items():
                bar.update()
                aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()

                def step():
                    aa.grad = bb.grad = None
                    loss = fn(aa, bb, lab)
                    loss.backward()

                if guard.skip(name, B):  # predicted from a smaller B to take > slow_ms per step
                    nan = float("nan")
                    med, p20, p80, mem, status = nan, nan, nan, nan, "slow"
                else:
                    med, p20, p80, mem, status = measure(step, device, reps, leaves=(aa, bb))
                    guard.record(name, B, med)
                if name == "naive-torch":
                    naive_ms = med
                row = dict(op=op, mode="fwd+bwd", provider=name, B=B, D=dim, dtype="fp32", status=status,
                           ms=med, p20=p20, p80=p80, peak_mib=mem / 2**20, speedup_vs_naive=naive_ms / med,
                           device=str(device))
                rows.append(row)
                append_csv(csv_path, [row], device)
                ms = fmt_ms(status, med)
                print(f"{name:<22}{B:>8}{ms:>10}{f'{p20:.2f}-{p80:.2f}':>17}{row['peak_mib']:>10.1f}"
                      f"{naive_ms / med:>9.2f}", flush=True)
    return rows


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ops", default="nt_xent,supcon,mnrl")
    p.add_argument("--sizes", type=sizes, default="4096,16384" if cuda else "256,1024")
    p.add_argument("--dim", type=int, default=256 if cuda else 64)
    p.add_argument("--reps", type=count, default=20 if cuda else 3)
    p.add_argument("--csv", default=None)
    p.add_argument("--plot-dir", default=None)
    p.add_argument("--slow-ms", type=float, default=2000.0,
                   help="a provider predicted to be slower than this per step is skipped at that B")
    p.add_argument("--only", type=names, default=None, help="comma-separated providers")
    a = p.parse_args(argv)
    ops = a.ops.split(",")
    unknown = [o for o in ops if o not in OPS]
    if unknown:  # before any op runs (the first ones ran, then the sweep died on the unknown one)
        p.error(f"unknown --ops {unknown}; choose from {list(OPS)}")
    stop_on_sigterm()
    device = torch.device("cuda" if cuda else "cpu")
    for op in ops:
        run(op, a.sizes, a.dim, a.reps, device, a.csv,
            f"{a.plot_dir}/{op}.png" if a.plot_dir else None, a.slow_ms, a.only)


if __name__ == "__main__":
    main()
