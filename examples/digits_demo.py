"""Contrastive learning on scikit-learn's bundled digits, fully offline on the CPU.

Trains a small MLP encoder with InfoNCE, DCL and DCLW (SimCLR-style: two augmented views per
image) through fastcl.train, then evaluates the frozen embeddings against the untrained encoder:
- kNN (k=5, cosine) on all training labels,
- a linear probe trained on only 5 labels per class (where representation quality shows).
Prints a table and saves a plot.

    python examples/digits_demo.py [--steps 600] [--out examples/digits_demo.png]
"""
import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from fastcl import train as T


def load_digits_split(seed=0):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = 1200
    return x[perm[:n_train]], y[perm[:n_train]], x[perm[n_train:]], y[perm[n_train:]]


def augment(x):
    """Random 1-pixel shifts, pixel dropout, intensity jitter and noise on 8x8 images."""
    b = x.shape[0]
    img = x.view(b, 8, 8)
    dx, dy = torch.randint(-1, 2, (2,))
    img = torch.roll(img, shifts=(int(dy), int(dx)), dims=(1, 2))
    img = img * (torch.rand(b, 8, 8) > 0.1)
    img = img * (0.8 + 0.4 * torch.rand(b, 1, 1)) + 0.05 * torch.randn_like(img)
    return img.reshape(b, 64)


def encoder(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 32))


@torch.no_grad()
def embed(enc, x):
    """The encoder's 32-d output embedding, L2-normalised."""
    enc.eval()
    return nn.functional.normalize(enc(x), dim=-1)


def knn_accuracy(ztr, ytr, zte, yte, k=5):
    sim = zte @ ztr.T
    idx = sim.topk(k, dim=1).indices
    votes = torch.nn.functional.one_hot(ytr[idx], 10).sum(1)
    return float((votes.argmax(1) == yte).float().mean())


def few_label_probe(ztr, ytr, zte, yte, per_class=5, seed=0):
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.choice(np.flatnonzero(ytr.numpy() == c), per_class, replace=False) for c in range(10)])
    clf = LogisticRegression(max_iter=2000).fit(ztr.numpy()[pick], ytr.numpy()[pick])
    return float(clf.score(zte.numpy(), yte.numpy()))


def evaluate(enc, xtr, ytr, xte, yte):
    ztr, zte = embed(enc, xtr), embed(enc, xte)
    return knn_accuracy(ztr, ytr, zte, yte), few_label_probe(ztr, ytr, zte, yte)


def batches(x, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            yield x[perm[i:i + batch_size]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_demo.png"),
                   help="PNG path (default: beside this script, wherever it is run from)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    xtr, ytr, xte, yte = load_digits_split(a.seed)
    rows, curves = [], {}
    knn, probe = evaluate(encoder(a.seed), xtr, ytr, xte, yte)
    rows.append(("untrained encoder", knn, probe, float("nan"), 0.0))
    for loss, tau in (("info_nce", 0.5), ("dcl", 0.5), ("dclw", 0.5)):
        enc = encoder(a.seed)
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        hist = T.Trainer(T.SimCLR(enc, augment, loss=loss, temperature=tau), batches(xtr, a.batch_size, a.seed),
                         T.TrainConfig(steps=a.steps, lr=1e-3, progress=False)).train()
        secs = time.perf_counter() - t0
        knn, probe = evaluate(enc, xtr, ytr, xte, yte)
        rows.append((f"{loss} (tau={tau})", knn, probe, hist[-1]["loss"], secs))
        curves[loss] = [h["loss"] for h in hist]
    print(f"digits: {len(xtr)} train / {len(xte)} test images, {a.steps} steps of batch {a.batch_size}, "
          f"torch {torch.__version__}")
    print(f"{'encoder':<20}{'kNN acc':>9}{'probe@5/class':>15}{'final loss':>12}{'train s':>9}")
    for name, knn, probe, final, secs in rows:
        print(f"{name:<20}{knn:>9.3f}{probe:>15.3f}{final:>12.3f}{secs:>9.1f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for name, c in curves.items():
            ax1.plot(c, label=name)
        ax1.set(xlabel="step", ylabel="loss", title="training loss")
        ax1.legend()
        names = [r[0].split(" ")[0] for r in rows]
        xs = np.arange(len(rows))
        ax2.bar(xs - 0.2, [r[1] for r in rows], 0.4, label="kNN")
        ax2.bar(xs + 0.2, [r[2] for r in rows], 0.4, label="probe, 5 labels/class")
        ax2.set_xticks(xs, names)
        ax2.set(ylim=(0, 1), title="test accuracy")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(a.out, dpi=100)
        print(f"plot saved to {a.out}")
    except ImportError:
        print("matplotlib not installed: no plot")
    return rows


if __name__ == "__main__":
    main()
