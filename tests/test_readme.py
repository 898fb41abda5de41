"""The README's code runs, and the signatures it prints are the code's.

A newcomer copies these; they must not drift from the API. The snippets run with small stand-in
tensors and models (the names the README leaves to the reader), the trainer for 2 steps.
"""
import inspect
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import fastcl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)
# `fastcl.x.y(params)` spans in the prose (they may wrap over lines)
SIGNATURES = [(m.group(1), " ".join(m.group(2).split()))
              for m in re.finditer(r"`(fastcl\.[\w.]+)\(([^`]*)\)`", README, re.S)]


def _stand_ins():
    """The README's free names: features, a CLIP model with a logit scale, an encoder and data."""
    g = torch.Generator().manual_seed(0)
    B, D = 12, 16

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    encoder = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 8))
    feats = {n: torch.randn(B, D, generator=g, requires_grad=True)
             for n in ("q", "k", "image_features", "text_features", "out0", "out1",
                       "q_local", "k_local")}
    return dict(feats, model=Model(), encoder=encoder,
                augment=lambda x: x + 0.1 * torch.randn_like(x),
                batches=[torch.randn(B, D, generator=g) for _ in range(3)])


def test_readme_has_the_snippets_this_test_runs():
    # the drop-in losses, the trainer and the distributed loss; a new block is run too, and may
    # need a stand-in above
    assert len(SNIPPETS) == 3, [s.splitlines()[0] for s in SNIPPETS]


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    code = SNIPPETS[index]
    if "steps=600" in code:  # the trainer: same call, 2 steps
        code = code.replace("steps=600", "steps=2")
    monkeypatch.chdir(tmp_path)  # the trainer writes its checkpoint into the working directory
    names = _stand_ins()
    own_group = "distributed" in code and not dist.is_initialized()
    if own_group:  # a one-process gloo group: the snippet runs as one rank of a job would
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                                rank=0, world_size=1)
    try:
        exec(compile(code, f"README.md python block {index}", "exec"), names)
    finally:
        if own_group:
            dist.destroy_process_group()
    results = [v for k, v in names.items() if k in ("loss", "history")]
    assert results, "the snippet computed nothing this test can check"
    for r in results:
        if isinstance(r, torch.Tensor):
            assert r.ndim == 0 and torch.isfinite(r), r
        else:  # the trainer's history: one record per step, finite losses
            assert len(r) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in r)
    if "checkpoint_path" in code:
        assert (tmp_path / "ckpt.pt").exists()


def _resolve(dotted):
    """fastcl.a.B: the longest importable module prefix, then attributes."""
    import importlib
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj


def _documented(params):
    """inspect.Signature of the README's parameter list (descriptions such as `x or xs[...]` are
    not Python and fail here, which is why only the `fastcl.`-qualified spans are checked)."""
    ns = {}
    exec(f"def f({params}): pass", ns)
    return inspect.signature(ns["f"])


def test_readme_lists_the_signatures_checked_here():
    assert {name for name, _ in SIGNATURES} >= {
        "fastcl.functional.info_nce", "fastcl.functional.group_whiten", "fastcl.available_backends",
        "fastcl.integrations.MultipleNegativesRankingLoss"}


@pytest.mark.parametrize("name,params", SIGNATURES, ids=[n for n, _ in SIGNATURES])
def test_readme_signature_matches_the_code(name, params):
    real = inspect.signature(_resolve(name)).parameters
    doc = _documented(params).parameters
    missing = [p for p in doc if p not in real]
    assert not missing, f"{name}: the README names {missing}, the code has {list(real)}"
    order = [p for p in real if p in doc]
    assert order == list(doc), f"{name}: README order {list(doc)}, code order {order}"
    for p in doc.values():
        r = real[p.name]
        assert r.kind == p.kind, f"{name}({p.name}): README {p.kind}, code {r.kind}"
        if p.default is not inspect.Parameter.empty:
            assert r.default == p.default, f"{name}({p.name}=): README {p.default!r}, code {r.default!r}"
    if "*" in params:  # a full signature: nothing left out
        assert list(doc) == [p for p in real if p != "self"], f"{name}: the code has {list(real)}"


PUBLIC = ["fastcl", "fastcl.functional", "fastcl.nn", "fastcl.distributed", "fastcl.integrations",
          "fastcl.train"]


@pytest.mark.parametrize("module", PUBLIC)
def test_public_names_are_listed_and_documented(module):
    """Each public module says what it exports (``import *`` gave fastcl.nn's internal helpers
    too), and every exported class and function has a docstring."""
    import importlib
    m = importlib.import_module(module)
    assert hasattr(m, "__all__"), module
    undocumented = []
    for name in m.__all__:
        obj = getattr(m, name)  # AttributeError: listed but missing
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
            undocumented.append(name)
    assert not undocumented, f"{module}: no docstring on {undocumented}"
    own = [n for n, o in vars(m).items() if not n.startswith("_") and (inspect.isclass(o) or inspect.isfunction(o))
           and getattr(o, "__module__", None) == module]
    assert set(own) <= set(m.__all__), f"{module}: public but not in __all__: {set(own) - set(m.__all__)}"


def test_version_is_the_packages():
    """__version__ is written in fastcl/__init__.py and pyproject.toml: they must agree."""
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == fastcl.__version__
