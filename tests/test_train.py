import collections
import copy
import math
import os
import random
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastcl import train as T


def _mlp(d_in=6, d_out=5, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, 16), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(16, d_out)]
    return nn.Sequential(*layers).double()


def _noise(x):
    return x + 0.1 * torch.randn_like(x)


def _batches(n=5, b=20, d=6, seed=0, pairs=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(b, d, generator=g, dtype=torch.float64)
        out.append((x, x + 0.3 * torch.randn(b, d, generator=g, dtype=torch.float64)) if pairs else x)
    return out


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _cfg(**kw):
    return T.TrainConfig(**{**dict(steps=1, lr=1e-2, progress=False), **kw})


@pytest.mark.parametrize("recipe_name", ["simclr_info_nce", "simclr_dcl", "clip", "whitened"])
def test_grad_cache_equals_one_pass(recipe_name):
    """Chunked encoding (GradCache) gives exactly the gradient of one pass over the batch."""
    def make():
        return {
            "simclr_info_nce": lambda: T.SimCLR(_mlp(), _noise, loss="info_nce"),
            "simclr_dcl": lambda: T.SimCLR(_mlp(), _noise, loss="dcl"),
            "clip": lambda: T.CLIP(_mlp(seed=1), _mlp(seed=2)).double(),
            "whitened": lambda: T.WhitenedCSE(_mlp(d_out=6), num_groups=2, k=3),
        }[recipe_name]()

    data = _batches(pairs=recipe_name == "clip")
    results = []
    for chunk in (None, 7):  # 7 does not divide 20: a ragged last chunk
        recipe = make()
        torch.manual_seed(123)  # the same augmentation noise in both runs
        # SGD, whose step is linear in the gradient (AdamW's would hide a scaled gradient).
        T.Trainer(recipe, data, _cfg(steps=2, chunk_size=chunk),
                  torch.optim.SGD(recipe.parameters(), lr=0.1)).train()
        results.append(_params(recipe))
    assert torch.allclose(results[0], results[1], atol=1e-12)


def test_grad_cache_replays_dropout():
    """With dropout, the re-encoding sees the same masks as the first pass (RNG replayed):
    the update equals full-graph encoding of the same chunks from the same RNG state."""
    data = _batches(n=1)
    recipe = T.SimCSE(_mlp(dropout=0.3))
    before = copy.deepcopy(recipe)
    torch.manual_seed(7)
    T.Trainer(recipe, data, _cfg(chunk_size=6), torch.optim.SGD(recipe.parameters(), lr=0.1)).train()

    ref = before
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)  # linear in the gradient, unlike AdamW
    torch.manual_seed(7)
    x = data[0]
    z = [torch.cat([ref.encoders["encoder"](x[i:i + 6]) for i in range(0, 20, 6)]) for _ in range(2)]
    ref.loss(z).backward()
    opt.step()
    assert torch.allclose(_params(recipe), _params(ref), atol=1e-12)


def test_checkpoint_resume_continues_exactly(tmp_path):
    data = _batches(n=4)
    full = T.SimCLR(_mlp(), _noise, loss="nt_xent")
    torch.manual_seed(0)
    hist_full = T.Trainer(full, data, _cfg(steps=6)).train()

    path = str(tmp_path / "ckpt.pt")
    part = T.SimCLR(_mlp(), _noise, loss="nt_xent")
    torch.manual_seed(0)
    T.Trainer(part, data, _cfg(steps=3, checkpoint_path=path)).train()
    resumed = T.SimCLR(_mlp(seed=99), _noise, loss="nt_xent")  # different init: the checkpoint wins
    trainer = T.Trainer(resumed, data, _cfg(steps=6, checkpoint_path=path, resume=True))
    assert trainer.step == 3
    hist = trainer.train()
    assert torch.allclose(_params(resumed), _params(full), atol=1e-12)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in hist_full], abs=1e-12)


def test_checkpoint_resume_with_a_seeded_shuffling_dataloader(tmp_path):
    """A DataLoader with its own generator: the resumed run sees the same batches and noise."""
    xs = torch.cat(_batches(n=3))

    def loader():
        return torch.utils.data.DataLoader(xs, batch_size=20, shuffle=True,
                                           generator=torch.Generator().manual_seed(5))

    full = T.SimCLR(_mlp(), _noise, loss="info_nce")
    torch.manual_seed(0)
    hist_full = T.Trainer(full, loader(), _cfg(steps=5)).train()
    path = str(tmp_path / "ckpt.pt")
    part = T.SimCLR(_mlp(), _noise, loss="info_nce")
    torch.manual_seed(0)
    T.Trainer(part, loader(), _cfg(steps=4, checkpoint_path=path)).train()  # crosses an epoch
    resumed = T.SimCLR(_mlp(), _noise, loss="info_nce")
    hist = T.Trainer(resumed, loader(), _cfg(steps=5, checkpoint_path=path, resume=True)).train()
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in hist_full], abs=1e-12)
    assert torch.allclose(_params(resumed), _params(full), atol=1e-12)


def _noise_py(x):
    """Augmentation drawing from Python's `random` too (its state must be checkpointed)."""
    return x + random.uniform(0.05, 0.2) * torch.randn_like(x)


@pytest.mark.parametrize("kind", ["plain_dataloader", "python_random"])
def test_checkpoint_resume_restores_every_rng(tmp_path, kind):
    """A DataLoader without a generator seeds itself from the global RNG at each iter(): the
    resume's re-iteration must not shift the restored stream. Python's `random` is restored."""
    xs = torch.cat(_batches(n=3))
    if kind == "plain_dataloader":
        def data():
            return torch.utils.data.DataLoader(xs, batch_size=20)
        aug = _noise
    else:
        def data():
            return list(xs.split(20))
        aug = _noise_py

    def run(steps, **kw):
        recipe = T.SimCLR(_mlp(), aug, loss="info_nce")
        torch.manual_seed(0)
        random.seed(0)
        return recipe, T.Trainer(recipe, data(), _cfg(steps=steps, **kw)).train()

    full, hist_full = run(5)
    path = str(tmp_path / "ckpt.pt")
    run(2, checkpoint_path=path)
    torch.manual_seed(1)  # the checkpoint's states must win over whatever the new process has
    random.seed(1)
    resumed = T.SimCLR(_mlp(), aug, loss="info_nce")
    hist = T.Trainer(resumed, data(), _cfg(steps=5, checkpoint_path=path, resume=True)).train()
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in hist_full], abs=1e-12)
    assert torch.allclose(_params(resumed), _params(full), atol=1e-12)


class _AugmentingDataset(torch.utils.data.Dataset):
    """Random augmentation in __getitem__: in a DataLoader's worker, from the worker's seed."""
    def __init__(self):
        self.x = torch.cat(_batches(n=3))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1], dtype=self.x.dtype)


@pytest.mark.parametrize("kind", ["workers", "persistent_workers", "shuffle"])
@pytest.mark.parametrize("saved_at", [2, 4], ids=["mid_epoch", "next_epoch"])
def test_checkpoint_resume_with_dataloader_draws_at_iter(tmp_path, kind, saved_at):
    """A DataLoader draws from the global RNG at iter(): its workers' seeds (at the first iter()
    only when persistent), a shuffled order without a generator of its own. The resume's
    re-iteration must start those epochs from the saved run's states, or the workers'
    augmentations differ (they did, with the docstring saying exact). The checkpoint is resumed
    once without a step (a finished run restarted by the same command), which saves it again:
    that save must keep the states (it wrote none, and the next resume drifted)."""
    def run(steps, **kw):
        recipe = T.SimCSE(_mlp())
        torch.manual_seed(0)
        loader = dict(workers=dict(num_workers=1), persistent_workers=dict(num_workers=1, persistent_workers=True),
                      shuffle=dict(shuffle=True))[kind]
        data = torch.utils.data.DataLoader(_AugmentingDataset(), batch_size=20, **loader)
        return recipe, T.Trainer(recipe, data, _cfg(steps=steps, **kw)).train()

    full, hist_full = run(6)
    path = str(tmp_path / "ckpt.pt")
    run(saved_at, checkpoint_path=path)
    torch.manual_seed(1)
    run(saved_at, checkpoint_path=path, resume=True)  # no step; saves again
    resumed, hist = run(6, checkpoint_path=path, resume=True)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in hist_full], abs=1e-12)
    assert torch.allclose(_params(resumed), _params(full), atol=1e-12)


def test_namedtuple_batches():
    """default_collate keeps a namedtuple's type: rebuilding it from a generator failed."""
    Sample = collections.namedtuple("Sample", ["x", "label"])
    data = [Sample(x, torch.arange(20)) for x in _batches(n=2)]
    hist = T.Trainer(T.SimCSE(_mlp()), data, _cfg(steps=2)).train()
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)


def test_checkpoint_settings_are_checked_up_front(tmp_path):
    """checkpoint_every without a path saved nothing; a path in a missing folder failed at the
    first save, after the steps (with checkpoint_every=0, the whole run's)."""
    with pytest.raises(ValueError, match="checkpoint_every=5 needs a checkpoint_path"):
        T.TrainConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match="must be a file's path, got the folder"):
        T.Trainer(T.SimCSE(_mlp()), _batches(1), _cfg(checkpoint_path=str(tmp_path)))
    path = tmp_path / "new" / "folder" / "ckpt.pt"
    T.Trainer(T.SimCSE(_mlp()), _batches(1), _cfg(checkpoint_path=str(path))).train()
    assert path.exists()


def test_grad_cache_updates_batchnorm_statistics_once_per_chunk():
    """The re-encoding pass must not update BatchNorm's running statistics a second time: they
    equal those of the chunks encoded once each."""
    def enc():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)).double()

    x = _batches(n=1)[0]
    recipe = T.SimCSE(enc())
    T.Trainer(recipe, [x], _cfg(chunk_size=7)).train()
    bn = recipe.encoders["encoder"][1]
    expected = enc()
    with torch.no_grad():
        for _ in range(2):  # SimCSE encodes the batch twice (two dropout views), in 3 chunks each
            for i in range(0, 20, 7):
                expected(x[i:i + 7])
    ref = expected[1]
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 6
    assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-14)
    assert torch.allclose(bn.running_var, ref.running_var, atol=1e-14)


class _CountingSimCSE(T.SimCSE):
    """A loss that updates a buffer of its own (like a MoCo queue or a loss head's statistics)."""

    def __init__(self, encoder):
        super().__init__(encoder)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def loss(self, z):
        self.calls += 1
        return super().loss(z)


def test_grad_cache_keeps_buffers_the_loss_updates():
    """The re-encoding's buffer restore undoes only the re-encoding: a buffer the loss updates
    ends the same with chunk_size as without (it was put back to 0 every chunked step)."""
    calls = []
    for chunk in (None, 7):
        recipe = _CountingSimCSE(_mlp())
        T.Trainer(recipe, _batches(n=3), _cfg(steps=3, chunk_size=chunk)).train()
        calls.append(int(recipe.calls))
    assert calls == [3, 3]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains(amp):
    enc = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 8))
    data = [x.float() for x in _batches(n=3, b=32)]
    torch.manual_seed(0)
    hist = T.Trainer(T.SimCLR(enc, _noise, loss="dclw"), data,
                     _cfg(steps=30, amp=amp, chunk_size=10, lr=3e-3)).train()
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert sum(h["loss"] for h in hist[-5:]) < sum(h["loss"] for h in hist[:5])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_matches_fp32_step(amp):
    """One SGD step under autocast (fp16 with the GradScaler, through GradCache) moves the weights
    like the fp32 step, within 16-bit precision: catches a missing unscale or a wrong scale."""
    data = [x.float() for x in _batches(n=1, b=32)]
    deltas = []
    for mode in (None, amp):
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 8))
        start = _params(enc).clone()
        recipe = T.SimCLR(enc, _noise, loss="info_nce")
        torch.manual_seed(1)
        T.Trainer(recipe, data, _cfg(steps=1, amp=mode, chunk_size=10),
                  torch.optim.SGD(recipe.parameters(), lr=1.0)).train()
        deltas.append(_params(enc) - start)
    rel = float((deltas[1] - deltas[0]).norm() / deltas[0].norm())
    assert rel < 3e-2, rel


@pytest.mark.parametrize("chunk", [None, 7])
def test_fp16_logged_loss_is_unscaled(chunk):
    """Under fp16 the GradScaler multiplies the loss by its scale (65536 at the start) for the
    backward; the logged loss is the recipe's own loss on the batch."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))  # no dropout: deterministic
    recipe = T.SimCSE(enc, temperature=0.5)
    x = _batches(n=1)[0].float()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.float16):
            z16 = enc(x)
        expected = recipe.loss([z16.float(), z16.float()]).item()
        fp32 = recipe.loss([enc(x), enc(x)]).item()
    trainer = T.Trainer(recipe, [x], _cfg(amp="fp16", chunk_size=chunk))
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1e3  # the scale is in play
    logged = trainer.train()[0]["loss"]
    assert logged == pytest.approx(expected, rel=1e-5)
    assert logged == pytest.approx(fp32, rel=1e-2)  # and the fp16 encoding is close to fp32's


def test_metrics_logged_and_temperature_learned():
    data = _batches(n=4, pairs=True)
    recipe = T.CLIP(_mlp(seed=1), _mlp(seed=2), init_temperature=0.07).double()
    hist = T.Trainer(recipe, data, _cfg(steps=8)).train()
    assert set(hist[-1]) >= {"step", "loss", "temperature", "alignment", "uniformity", "seconds"}
    assert hist[-1]["temperature"] != pytest.approx(0.07)  # the logit scale is learned
    assert hist[-1]["temperature"] == pytest.approx(math.exp(-recipe.logit_scale.item()), rel=1e-12)
    assert 0.0 < hist[-1]["alignment"] <= 4.0  # image vs text embeddings, not one view with itself
    # Closed forms: E||u_a - u_b||^2, and log E exp(-2 ||u_i - u_j||^2).
    assert T.alignment(torch.ones(3, 2), torch.ones(3, 2)) == 0.0
    assert T.alignment(torch.eye(2), torch.tensor([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert T.uniformity(torch.eye(4)) == pytest.approx(-4.0)  # every pair at squared distance 2


def test_recipes_compute_their_losses():
    """Each recipe's loss on given embeddings is the fastcl loss it names, with its temperature."""
    import fastcl.functional as FCL
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randn(12, 6, generator=g, dtype=torch.float64)
    for loss, expected in [("info_nce", FCL.info_nce(a, b, temperature=0.3, symmetric=True)),
                           ("nt_xent", FCL.nt_xent(a, b, temperature=0.3)),
                           ("dcl", FCL.dcl(a, b, temperature=0.3)),
                           ("dclw", FCL.dcl(a, b, temperature=0.3, weight="vmf"))]:
        assert T.SimCLR(_mlp(), _noise, loss=loss, temperature=0.3).loss([a, b]) == pytest.approx(
            expected.item(), rel=1e-12), loss
    assert T.SimCSE(_mlp(), temperature=0.2).loss([a, b]) == pytest.approx(
        FCL.info_nce(a, b, temperature=0.2).item(), rel=1e-12)
    clip = T.CLIP(_mlp(), _mlp(), init_temperature=0.1).double()
    assert clip.loss([a, b]).item() == pytest.approx(FCL.info_nce(
        a, b, logit_scale=clip.logit_scale.detach(), symmetric=True).item(), rel=1e-12)
    assert clip.temperature() == pytest.approx(0.1, rel=1e-6)
    with torch.no_grad():
        clip.logit_scale.fill_(6.0)  # a step past the cap log(100): clamped in place, still learning
    clip.loss([a, b]).backward()
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0)) and clip.logit_scale.grad.item() != 0
    # WhitenedCSE: SupCon over the k whitened views, whose positives are the same sample's views
    w = T.WhitenedCSE(_mlp(), num_groups=2, k=3, temperature=0.2)
    torch.manual_seed(5)
    got = w.loss([a])
    torch.manual_seed(5)
    views = FCL.shuffled_group_whiten(a, 2, 3, method="zca", detach_stats=True, eps=1e-5)  # [k, N, D]
    expected = FCL.supcon(torch.cat(views.unbind(0)), torch.arange(12).repeat(3), temperature=0.2)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_simclr_views_are_two_augmentations():
    x = _batches(n=1)[0]
    torch.manual_seed(0)
    (n1, v1), (n2, v2) = T.SimCLR(_mlp(), _noise).views(x)
    assert n1 == n2 == "encoder" and v1.shape == v2.shape == x.shape
    assert not torch.equal(v1, v2) and not torch.equal(v1, x)


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_dtypes(amp, dtype):
    """The encoders run in the autocast dtype; the loss gets fp32 embeddings."""
    seen = {}

    class Enc(nn.Linear):
        def forward(self, x):
            out = super().forward(x)
            seen["encoder"] = out.dtype
            return out

    class Recipe(T.SimCSE):
        def loss(self, z):
            seen["loss"] = z[0].dtype
            return super().loss(z)

    T.Trainer(Recipe(Enc(6, 4)), [x.float() for x in _batches(n=1)], _cfg(amp=amp)).train()
    assert seen == {"encoder": dtype, "loss": torch.float32}


def test_checkpoint_every(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(T.Trainer, "save", lambda self, path: saved.append(self.step))
    T.Trainer(T.SimCSE(_mlp()), _batches(n=2), _cfg(steps=5, checkpoint_path=str(tmp_path / "c.pt"),
                                                    checkpoint_every=2)).train()
    assert saved == [2, 4, 5]  # every 2 steps, and at the end


def test_resume_restores_the_grad_scaler(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    data = [x.float() for x in _batches(n=2, b=16)]
    enc = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    first = T.Trainer(T.SimCLR(enc, _noise), data, _cfg(steps=3, amp="fp16", checkpoint_path=path))
    first.train()
    fresh = torch.amp.GradScaler("cpu").state_dict()
    assert first.scaler.state_dict() != fresh  # the scaler has state worth restoring
    enc2 = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    resumed = T.Trainer(T.SimCLR(enc2, _noise), data, _cfg(steps=6, amp="fp16", checkpoint_path=path, resume=True))
    assert resumed.scaler.state_dict() == first.scaler.state_dict()


@pytest.mark.parametrize("field, value", [
    ("amp", "fp8"), ("chunk_size", 0), ("chunk_size", 2.5), ("steps", -1), ("steps", 2.5),
    ("steps", True), ("log_every", 0), ("checkpoint_every", -1), ("lr", -1.0), ("lr", True),
    ("weight_decay", False),
    ("lr", float("nan")), ("weight_decay", float("inf")), ("resume", "no"), ("progress", None)])
def test_bad_config(field, value):
    # steps=-1 trained 0 steps and 2.5 trained 3, both silently; chunk_size=2.5 was a TypeError
    # deep in the step
    with pytest.raises((ValueError, TypeError), match=field):
        T.TrainConfig(**{field: value})
    cfg = T.TrainConfig()
    setattr(cfg, field, value)  # set after it was built: the Trainer checks it again
    with pytest.raises((ValueError, TypeError), match=field):
        T.Trainer(T.SimCSE(_mlp()), _batches(1), cfg)


def test_bad_recipe_and_trainer_arguments():
    with pytest.raises(ValueError, match="loss must be"):
        T.SimCLR(_mlp(), _noise, loss="triplet")
    for make in (lambda t: T.SimCLR(_mlp(), _noise, temperature=t), lambda t: T.SimCSE(_mlp(), temperature=t),
                 lambda t: T.WhitenedCSE(_mlp(), num_groups=1, temperature=t)):
        for t in (0, -0.1, None, float("nan")):  # SimCLR's -0.1 was accepted until the first step
            with pytest.raises((ValueError, TypeError), match="temperature"):
                make(t)
    with pytest.raises(TypeError, match="augment"):
        T.SimCLR(_mlp(), "flip")
    with pytest.raises(ValueError, match="k must be"):
        T.WhitenedCSE(_mlp(), num_groups=1, k=1)  # one view has no positives
    with pytest.raises(TypeError, match="recipe"):
        T.Trainer(_mlp(), _batches(1), _cfg())
    with pytest.raises(TypeError, match="config"):
        T.Trainer(T.SimCSE(_mlp()), _batches(1), dict(steps=1))


@pytest.mark.parametrize("kw, name", [
    (dict(num_groups=0), "num_groups"), (dict(num_groups="2"), "num_groups"),
    (dict(num_groups=2.0), "num_groups"), (dict(num_groups=2, method="pca"), "method"),
    (dict(num_groups=2, eps=-1.0), "eps"), (dict(num_groups=2, eps="1e-5"), "eps"),
    (dict(num_groups=2, detach_stats="no"), "detach_stats")])
def test_whitened_cse_checks_its_whitening_options(kw, name):
    # each was accepted until the first training step's group_whiten
    with pytest.raises((ValueError, TypeError), match=name):
        T.WhitenedCSE(nn.Linear(6, 6).double(), **kw)


def test_whitened_cse_num_groups_not_dividing_the_width():
    """The encoder's output width is known only at the first step, which names both."""
    recipe = T.WhitenedCSE(nn.Linear(6, 6).double(), num_groups=4)
    with pytest.raises(ValueError, match=r"num_groups must be a positive divisor of D=6, got 4"):
        T.Trainer(recipe, _batches(n=1), _cfg()).train()


def test_resume_without_a_checkpoint_path_is_an_error():
    # it was silently a fresh run
    for path in (None, ""):
        with pytest.raises(ValueError, match="resume=True needs a checkpoint_path"):
            T.TrainConfig(resume=True, checkpoint_path=path)
        cfg = T.TrainConfig(checkpoint_path=path)
        cfg.resume = True  # set after it was built: the Trainer checks it again
        with pytest.raises(ValueError, match="resume=True needs a checkpoint_path"):
            T.Trainer(T.SimCSE(_mlp()), _batches(1), cfg)


def test_resume_from_a_missing_checkpoint_warns_and_starts_fresh(tmp_path):
    """A preemptible job's first start (same command as its restarts): no file yet, so a fresh
    run, but said aloud (it was silent, like a mistyped path)."""
    path = str(tmp_path / "missing.pt")
    with pytest.warns(UserWarning, match=re.escape(f"no checkpoint was found at '{path}'") + ".*step 0"):
        trainer = T.Trainer(T.SimCSE(_mlp()), _batches(n=2), _cfg(steps=2, checkpoint_path=path, resume=True))
    assert trainer.step == 0
    assert len(trainer.train()) == 2 and os.path.exists(path)


def test_zero_steps_trains_nothing():
    assert T.Trainer(T.SimCSE(_mlp()), _batches(1), _cfg(steps=0)).train() == []


def test_empty_data_is_a_clear_error():
    with pytest.raises(ValueError, match="no batches"):  # was a bare StopIteration
        T.Trainer(T.SimCSE(_mlp()), [], _cfg()).train()
    one_shot = iter(_batches(2))
    with pytest.raises(ValueError, match="no batches"):
        T.Trainer(T.SimCSE(_mlp()), one_shot, _cfg(steps=3)).train()


def test_metrics_check_their_inputs():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="same shape"):
        T.alignment(a, b)  # broadcasting error from inside torch before
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        T.uniformity(a[0])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        T.alignment(a.long(), a.long())
    assert T.alignment(a, a) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(T.uniformity(a[:1]))


# --- DDP on gloo: two ranks with half the batch each equal one process on the whole batch ---

class _Alternating:
    """A deterministic SimCLR augmentation: its calls alternate between two transforms, so the
    two views differ, and alike on every rank and in one process."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x + 0.1 if self.calls % 2 else 0.9 * x


def _ddp_recipe(kind):
    # CLIP: two towers; SimCSE: one encoder used twice per step (deterministic: no dropout);
    # SimCLR with NT-Xent and DCLW, whose distributed losses gather every rank's two views.
    if kind == "clip":
        return T.CLIP(_mlp(seed=1), _mlp(seed=2)).double()
    if kind.startswith("simclr_"):
        return T.SimCLR(_mlp(seed=4), _Alternating(), loss=kind[len("simclr_"):], temperature=0.3)
    if kind == "whitened":  # whitening statistics of the global batch; rank 0's permutations
        return T.WhitenedCSE(_mlp(seed=5, d_out=6), num_groups=2, k=3, detach_stats=False, temperature=0.2)
    return T.SimCSE(_mlp(seed=3))


def _ddp_data(kind):
    return _batches(n=2, pairs=kind == "clip")


def _ddp_worker(rank, world, init_file, out, chunk, kind):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sl = slice(rank * 10, (rank + 1) * 10)
    local = [(b[0][sl], b[1][sl]) if kind == "clip" else b[sl] for b in _ddp_data(kind)]
    recipe = _ddp_recipe(kind)
    # SGD: updates linear in the gradient (Adam's m/sqrt(v) would amplify 1e-16 differences of
    # near-zero gradients into 1e-8 parameter differences).
    T.Trainer(recipe, local, _cfg(steps=2, chunk_size=chunk), torch.optim.SGD(recipe.parameters(), lr=0.1)).train()
    torch.save(_params(recipe), f"{out}{rank}.pt")
    dist.barrier()  # every rank is done talking
    # Results are on disk; skip the process-group teardown, whose C++ destructors race with
    # gloo threads at exit and now and then abort ("terminate called without an active exception").
    os._exit(0)


def _ddp_bad_checkpoint_worker(rank, world, init_file, out, folder):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        T.Trainer(T.SimCSE(_mlp()), _batches(1), _cfg(checkpoint_path=folder))
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    torch.save(msg, f"{out}{rank}.pt")
    dist.barrier()
    os._exit(0)


def test_ddp_bad_checkpoint_path_raises_on_every_rank(tmp_path):
    """Rank 0, which writes, checks the path; the other ranks went on into the loss's first
    collective and waited there until the process group's timeout (30 min on gloo)."""
    mp.spawn(_ddp_bad_checkpoint_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "r"), str(tmp_path)),
             nprocs=2, join=True)
    assert "must be a file's path, got the folder" in torch.load(tmp_path / "r0.pt")
    assert "rank(s) [0]" in torch.load(tmp_path / "r1.pt")


@pytest.mark.parametrize("kind", ["clip", "simcse", "simclr_nt_xent", "simclr_dclw", "whitened"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_ddp_equals_single_process(tmp_path, chunk, kind):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "r"), chunk, kind), nprocs=2, join=True)
    recipe = _ddp_recipe(kind)
    T.Trainer(recipe, _ddp_data(kind), _cfg(steps=2), torch.optim.SGD(recipe.parameters(), lr=0.1)).train()
    for r in range(2):
        assert torch.allclose(torch.load(tmp_path / f"r{r}.pt"), _params(recipe), atol=1e-10)


def _ddp_resume_worker(rank, world, init_file, out, ckpt):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    local = [b[rank * 10:(rank + 1) * 10] for b in _batches(n=3)]
    losses = {}
    for phase, steps, kw in [("full", 4, {}), ("part", 2, dict(checkpoint_path=ckpt)),
                             ("resumed", 4, dict(checkpoint_path=ckpt, resume=True))]:
        recipe = T.SimCLR(_mlp(), _noise, loss="info_nce")
        torch.manual_seed(100 + rank)  # each rank its own augmentation stream
        trainer = T.Trainer(recipe, local, _cfg(steps=steps, **kw), torch.optim.SGD(recipe.parameters(), lr=0.1))
        # alignment and uniformity are of this rank's embeddings: resumed, the steps before the
        # checkpoint showed rank 0's on every rank
        losses[phase] = [v for h in trainer.train() for v in (h["loss"], h["alignment"], h["uniformity"])]
        dist.barrier()  # the checkpoint is written before anyone reads it
    torch.save(losses, f"{out}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _ddp_worker


def test_ddp_resume_restores_each_ranks_rng(tmp_path):
    """Each rank resumes its own RNG stream and log, not rank 0's."""
    mp.spawn(_ddp_resume_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "r"), str(tmp_path / "c.pt")),
             nprocs=2, join=True)
    for r in range(2):
        losses = torch.load(tmp_path / f"r{r}.pt")
        assert losses["resumed"] == pytest.approx(losses["full"], abs=1e-12)


def test_resume_on_another_world_size_warns(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    T.Trainer(T.SimCSE(_mlp()), _batches(n=1), _cfg(checkpoint_path=path)).train()
    state = torch.load(path, weights_only=False)
    state["rng_per_rank"] *= 2  # as if written by two processes
    torch.save(state, path)
    with pytest.warns(UserWarning, match="not restored"):
        T.Trainer(T.SimCSE(_mlp()), _batches(n=1), _cfg(steps=2, checkpoint_path=path, resume=True))


class _RankBiasSimCSE(T.SimCSE):
    """A loss parameter outside DDP that only rank 0's loss uses: rank 1 has no gradient for it."""

    def __init__(self, encoder):
        super().__init__(encoder)
        self.bias = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def loss(self, z):
        extra = self.bias ** 2 + self.bias if dist.get_rank() == 0 else 0.0
        return super().loss(z) + extra


def _loose_grad_worker(rank, world, init_file, out):
    import datetime
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    recipe = _RankBiasSimCSE(_mlp(seed=3))
    local = [b[rank * 10:(rank + 1) * 10] for b in _batches(n=2)]
    T.Trainer(recipe, local, _cfg(steps=2), torch.optim.SGD(recipe.parameters(), lr=0.1)).train()
    torch.save(recipe.bias.detach(), f"{out}{rank}.pt")
    dist.barrier()
    os._exit(0)  # as in _ddp_worker


def test_ddp_loss_parameter_with_a_gradient_on_some_ranks(tmp_path):
    """Every rank joins the loss parameters' all-reduce, even one without a gradient, and all
    ranks apply the same averaged update (a rank that skipped the collective hung the others)."""
    mp.spawn(_loose_grad_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "b")), nprocs=2, join=True)
    b0, b1 = (torch.load(tmp_path / f"b{r}.pt") for r in range(2))
    # d(b^2 + b)/db = 1 at b = 0 on rank 0 only: the average is 0.5, one SGD step of lr 0.1 -> -0.05;
    # the second step: (2 * -0.05 + 1) / 2 = 0.45 -> -0.05 - 0.045
    assert float(b0) == float(b1) == pytest.approx(-0.095, abs=1e-12)
