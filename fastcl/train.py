"""A small trainer for contrastive recipes on fastcl's fused losses.

    recipe = SimCLR(encoder, augment, loss="dcl", temperature=0.1)
    trainer = Trainer(recipe, batches, TrainConfig(steps=500, lr=1e-3, chunk_size=256))
    history = trainer.train()

- Recipes: SimCLR (two augmented views), SimCSE (two dropout views of the same input),
  WhitenedCSE (shuffled group-whitening views, multi-positive InfoNCE), CLIP (two towers, a
  learnable logit scale). A recipe says how a batch becomes encoder inputs and how the
  embeddings become a loss.
- ``chunk_size`` turns on GradCache-style accumulation that keeps every negative. The batch is
  embedded in chunks without a graph. Then the fused loss and the embeddings' gradients are
  computed once, on the whole batch. Then each chunk is re-encoded with a graph, and that
  gradient is backpropagated through it. The chunk's RNG state is replayed, so dropout and
  similar noise are the same in both passes.
- ``amp="bf16" | "fp16"`` runs the encoders under autocast (fp16 with a GradScaler); the loss
  runs in fp32 on the embeddings.
- Under torch.distributed (initialised by the caller), the encoders are wrapped in DDP and the
  InfoNCE/CLIP, NT-Xent and DCL/DCLW losses see the global batch (``fastcl.distributed``,
  gradients scaled for DDP); WhitenedCSE whitens with the global batch's statistics.
- ``checkpoint_path`` (its folder made when the Trainer is built) saves model, optimizer,
  scaler, history and every rank's RNG states (torch CPU, the trainer's CUDA device, Python
  ``random``, NumPy), at the end and every ``checkpoint_every`` steps; ``resume=True`` (which
  needs ``checkpoint_path``) loads it if the file exists, so that a preemptible job restarts
  with the same command, and warns and starts from step 0 if it does not. A resumed run skips
  the batches already seen, with the RNG put back after the skip. A DataLoader draws from the
  global RNG at ``iter()``: its shuffled order (without a ``generator`` of its own) and its
  workers' seeds (random augmentation in the dataset). The checkpoint keeps the states that
  the first and the latest epoch's ``iter()`` started from, and the resume's re-iteration
  starts those epochs from them (the first one matters with ``persistent_workers``). So
  resuming reproduces the uninterrupted run exactly for a list, and for a DataLoader with or
  without shuffling, workers or a seeded ``generator``; not for data that draws from the
  global RNG while it is iterated (in the main process), whose skipped batches drew apart
  from the training steps' draws.
- With ``chunk_size``, buffers that the encoders update in the forward (BatchNorm's running
  statistics) are updated once per chunk, by the first pass; the re-encoding leaves them be.
  Buffers that the recipe's loss updates (a queue, a loss head's statistics) are updated once
  per step, as without ``chunk_size``.
- Logged per step: loss, temperature, alignment and uniformity (Wang & Isola 2020) of the
  first two views' embeddings (alignment is NaN for a one-view recipe such as WhitenedCSE,
  whose whitened views are made inside its loss).
"""
import contextlib
import dataclasses
import math
import os
import random
import sys
import time
import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import _validation, functional as FCL, whitening
from .nn import clamp_logit_scale_, learnable_logit_scale

__all__ = ["Recipe", "SimCLR", "SimCSE", "WhitenedCSE", "CLIP", "TrainConfig", "Trainer",
           "alignment", "uniformity"]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------- recipes
class Recipe(nn.Module):
    """Encoders (``self.encoders``, a ModuleDict) plus the loss's own parameters."""

    def views(self, batch) -> List[Tuple[str, Tensor]]:
        """(encoder name, input) per view. Random augmentation happens here, once per step."""
        raise NotImplementedError

    def loss(self, z: Sequence[Tensor]) -> Tensor:
        """The loss from the views' embeddings (fp32, each [N, D])."""
        raise NotImplementedError

    def temperature(self) -> float:
        return float(self.tau)

    def _info_nce(self, a, b, **kw):
        if _distributed():
            from .distributed import info_nce_distributed
            return info_nce_distributed(a, b, grad_mode="ddp", **kw)
        return FCL.info_nce(a, b, **kw)


class SimCLR(Recipe):
    """Two augmented views of each sample; loss "info_nce" (symmetric), "nt_xent", "dcl" or "dclw"."""

    def __init__(self, encoder: nn.Module, augment: Callable[[Tensor], Tensor], loss: str = "info_nce",
                 temperature: float = 0.1):
        super().__init__()
        if loss not in ("info_nce", "nt_xent", "dcl", "dclw"):
            raise ValueError(f"loss must be info_nce, nt_xent, dcl or dclw, got {loss!r}")
        if not callable(augment):
            raise TypeError(f"augment must be a callable (a batch -> an augmented view), got {augment!r}")
        self.encoders = nn.ModuleDict({"encoder": encoder})
        self.augment, self.kind = augment, loss
        self.tau = _validation.positive_number(temperature, "temperature")

    def views(self, batch):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return [("encoder", self.augment(x)), ("encoder", self.augment(x))]

    def loss(self, z):
        if self.kind == "info_nce":
            return self._info_nce(z[0], z[1], temperature=self.tau, symmetric=True)
        kw = dict(temperature=self.tau)
        if self.kind != "nt_xent":
            kw["weight"] = "vmf" if self.kind == "dclw" else None
        if _distributed():  # every rank's views are negatives; gradients scaled for DDP
            from . import distributed
            fn = distributed.nt_xent_distributed if self.kind == "nt_xent" else distributed.dcl_distributed
            return fn(z[0], z[1], grad_mode="ddp", **kw)
        return (FCL.nt_xent if self.kind == "nt_xent" else FCL.dcl)(z[0], z[1], **kw)


class SimCSE(Recipe):
    """Unsupervised SimCSE: the same input twice through an encoder with dropout."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.05):
        super().__init__()
        self.encoders = nn.ModuleDict({"encoder": encoder})
        self.tau = _validation.positive_number(temperature, "temperature")

    def views(self, batch):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return [("encoder", x), ("encoder", x)]

    def loss(self, z):
        return self._info_nce(z[0], z[1], temperature=self.tau)


class WhitenedCSE(Recipe):
    """WhitenedCSE: k views from shuffled group whitening of the embeddings (each view with its
    own channel permutation), and a multi-positive InfoNCE whose positives are the other views
    of the same sample (the fused SupCon loss). Under torch.distributed the whitening takes the
    global batch's statistics (SyncBatchNorm-like; the permutations are rank 0's) and SupCon
    every rank's views, as one process on the concatenated batch."""

    def __init__(self, encoder: nn.Module, num_groups: int, k: int = 3, temperature: float = 0.05,
                 method: str = "zca", detach_stats: bool = True, eps: float = 1e-5):
        super().__init__()
        if not _validation.is_int(k) or k < 2:
            raise ValueError(f"k must be an integer >= 2 (each sample's other views are its "
                             f"positives), got {k!r}")
        # The encoder's output width D is unknown until the first step, which checks that
        # num_groups divides it; the rest fails here rather than at that step.
        if not _validation.is_int(num_groups) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer (a divisor of the encoder's "
                             f"output width), got {num_groups!r}")
        whitening.check_options(int(num_groups), num_groups, eps, 0, method, None)
        detach_stats = _validation.check_bool(detach_stats, "detach_stats")
        self.encoders = nn.ModuleDict({"encoder": encoder})
        self.num_groups, self.k = int(num_groups), int(k)
        self.tau = _validation.positive_number(temperature, "temperature")
        self.whiten_kw = dict(method=method, detach_stats=detach_stats, eps=eps)

    def views(self, batch):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return [("encoder", x)]

    def loss(self, z):
        if _distributed():  # the whitening's backward sums the ranks' gradients of W and the mean
            from . import distributed
            views = distributed.shuffled_group_whiten_distributed(z[0], self.num_groups, self.k, **self.whiten_kw)
            return distributed.supcon_distributed(views.transpose(0, 1), temperature=self.tau, grad_mode="ddp")
        views = FCL.shuffled_group_whiten(z[0], self.num_groups, self.k, **self.whiten_kw)  # [k, N, D]
        return FCL.supcon(views.transpose(0, 1), temperature=self.tau)


class CLIP(Recipe):
    """Two towers (``image`` and ``text`` encoders) and CLIP's learnable logit scale."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, init_temperature: float = 0.07,
                 max_scale: float = 100.0):
        super().__init__()
        self.encoders = nn.ModuleDict({"image": image_encoder, "text": text_encoder})
        self.logit_scale, self.max_log_scale = learnable_logit_scale(init_temperature, max_scale)

    def views(self, batch):
        images, texts = batch
        return [("image", images), ("text", texts)]

    def loss(self, z):
        log_scale = clamp_logit_scale_(self.logit_scale, self.max_log_scale)
        return self._info_nce(z[0], z[1], logit_scale=log_scale, symmetric=True)

    def temperature(self):
        return float(torch.exp(-self.logit_scale.detach().clamp(max=self.max_log_scale)))


# ----------------------------------------------------------------------------- metrics
def _check_2d(name, t):
    if not isinstance(t, Tensor) or t.ndim != 2 or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor [N, D], got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
                         f"{' ' + str(t.dtype) if isinstance(t, Tensor) else ''}")


@torch.no_grad()
def alignment(a: Tensor, b: Tensor) -> float:
    """E ||u_a - u_b||^2 over the positive pairs (rows) of a, b [N, D], normalised here (lower
    is better; 0 to 4)."""
    _check_2d("a", a)
    _check_2d("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold the same pairs (same shape), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return float((F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).square().sum(1).mean())


@torch.no_grad()
def uniformity(a: Tensor, max_n: int = 1024) -> float:
    """log E exp(-2 ||u_i - u_j||^2) over the distinct pairs of the first max_n rows of a [N, D],
    normalised here (lower is more uniform; NaN for N < 2)."""
    _check_2d("a", a)
    u = F.normalize(a[:max_n].float(), dim=-1)
    if u.shape[0] < 2:
        return float("nan")
    return float(torch.pdist(u).square().mul(-2).exp().mean().log())


# ----------------------------------------------------------------------------- trainer
@dataclasses.dataclass
class TrainConfig:
    """The Trainer's settings; checked when built and again by the Trainer."""
    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    chunk_size: Optional[int] = None       # GradCache chunk (samples per encoder pass); None: one pass
    amp: Optional[str] = None              # None | "bf16" | "fp16"
    log_every: int = 10
    checkpoint_path: Optional[str] = None
    checkpoint_every: int = 0              # 0: only at the end (if checkpoint_path is set)
    resume: bool = False                   # load checkpoint_path if it exists (warns if not)
    progress: bool = True
    device: str = "cpu"

    def __post_init__(self):
        self.check()

    def check(self):
        def count(name, low):
            v = getattr(self, name)
            if not _validation.is_int(v) or v < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")
        count("steps", 0)
        count("log_every", 1)
        count("checkpoint_every", 0)
        if self.checkpoint_every and not self.checkpoint_path:  # was silently never saved
            raise ValueError(f"TrainConfig.checkpoint_every={self.checkpoint_every} needs a checkpoint_path "
                             f"to save to, got checkpoint_path={self.checkpoint_path!r}")
        if self.chunk_size is not None:
            count("chunk_size", 1)
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"TrainConfig.amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        for name in ("resume", "progress"):
            _validation.check_bool(getattr(self, name), f"TrainConfig.{name}")
        if self.resume and not self.checkpoint_path:  # was silently a fresh run
            raise ValueError(f"TrainConfig.resume=True needs a checkpoint_path to resume from, got "
                             f"checkpoint_path={self.checkpoint_path!r}")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v!r}")


class _RngReplay:
    """Captures the RNG state before a chunk's first encoding and restores it for the second."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield


class Trainer:
    """Trains ``recipe`` on ``data`` (an iterable of batches, re-iterated for each epoch) for
    ``config.steps`` steps: ``train()`` returns the per-step log (see the module docstring).
    ``optimizer`` defaults to AdamW over every parameter of the recipe."""

    def __init__(self, recipe: Recipe, data: Iterable, config: TrainConfig,
                 optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a fastcl.train.Recipe (SimCLR, SimCSE, WhitenedCSE, "
                            f"CLIP or a subclass), got {type(recipe).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        config.check()  # again: fields may have been set after it was built
        self.config, self.device = config, torch.device(config.device)
        self.recipe = recipe.to(self.device)
        self.encoders = dict(self.recipe.encoders.items())
        self._loose = []  # the loss's own parameters (e.g. CLIP's logit scale), outside DDP
        if _distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.encoders = {k: DDP(m, device_ids=ids) for k, m in self.encoders.items()}
            wrapped = {id(p) for m in self.recipe.encoders.values() for p in m.parameters()}
            self._loose = [p for p in self.recipe.parameters() if id(p) not in wrapped and p.requires_grad]
        self.optimizer = optimizer or torch.optim.AdamW(self.recipe.parameters(), lr=config.lr,
                                                        weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.data, self._iter, self._skip = data, None, 0
        # The RNG states the first and the latest epoch's iter(data) started from, and how many
        # epochs began: a resume's re-iteration starts from them (see _new_epoch).
        self._epoch_rng, self._epochs, self._replay = (None, None), 0, None
        self.step, self.history = 0, []
        if config.checkpoint_path:  # checked by the rank that writes; its verdict raised on every rank
            error = None
            if not _distributed() or dist.get_rank() == 0:
                try:
                    _check_checkpoint_path(config.checkpoint_path)
                except ValueError as e:
                    error = e
            if _distributed():  # (a rank raising alone left the others in the loss's first collective)
                from .distributed import _raise_together
                _raise_together(error, torch.empty(0, device=self.device), None)
            elif error is not None:
                raise error
        if config.resume:  # check() made sure there is a checkpoint_path
            if os.path.exists(config.checkpoint_path):
                self.load(config.checkpoint_path)
            else:  # a preemptible job's first start: fine, but say so (a mistyped path reads the same)
                warnings.warn(f"TrainConfig.resume=True but no checkpoint was found at "
                              f"{config.checkpoint_path!r}: training starts from step 0", stacklevel=2)

    # -- one step -------------------------------------------------------------------------
    def _autocast(self):
        if self.config.amp is None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _encode(self, name, x):
        with self._autocast():
            z = self.encoders[name](x)
        # The loss runs in fp32 (or fp64): lift 16-bit autocast outputs, never lower fp64.
        return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z

    def train_step(self, batch) -> dict:
        self.recipe.train()
        views = [(name, x.to(self.device)) for name, x in self.recipe.views(_to(batch, self.device))]
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.chunk_size is None:
            z = [self._encode(name, x) for name, x in views]
            loss = self.recipe.loss(z)
            self.scaler.scale(loss).backward()
        else:
            loss, z = self._grad_cache_step(views, self.config.chunk_size)
        for p in self._loose:  # average like DDP does for the encoders' parameters
            # Every rank joins, with zeros if it has no gradient, and a count of the ranks that
            # have one: the ranks agree on whether the parameter gets a gradient at all.
            g = p.grad.detach().flatten() if p.grad is not None else p.new_zeros(p.numel())
            packed = torch.cat([g, g.new_ones(1) if p.grad is not None else g.new_zeros(1)])
            dist.all_reduce(packed)
            if packed[-1] > 0:
                p.grad = (packed[:-1] / dist.get_world_size()).view_as(p)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        zd = [t.detach() for t in z]
        return {"step": self.step, "loss": float(loss.detach()), "temperature": self.recipe.temperature(),
                "alignment": alignment(zd[0], zd[1]) if len(zd) > 1 else float("nan"),
                "uniformity": uniformity(zd[0])}

    def _grad_cache_step(self, views, chunk):
        # 1. Embed every chunk without a graph, remembering each chunk's RNG state.
        states, z = [], []
        with torch.no_grad():
            for name, x in views:
                parts = []
                for i in range(0, x.shape[0], chunk):
                    states.append(_RngReplay(self.device))
                    parts.append(self._encode(name, x[i:i + chunk]))
                z.append(torch.cat(parts).requires_grad_())
        # 2. The fused loss over the FULL batch: every negative, and the embeddings' gradients.
        loss = self.recipe.loss(z)
        self.scaler.scale(loss).backward()
        # The re-encoding below runs the forward again; keep buffers it would update a second
        # time (BatchNorm's running statistics) as the first pass left them. Snapshot after the
        # loss: what the loss updates (a queue, a loss head's running statistics) must stay.
        buffers = [(b, b.clone()) for b in self.recipe.buffers()]
        # 3. Re-encode each chunk with a graph (same RNG) and backpropagate its embedding gradient.
        # DDP all-reduces on a module's backward unless no_sync: let each encoder sync once, on
        # the last chunk that goes through it.
        k, last_of = 0, {}
        for name, x in views:
            k += math.ceil(x.shape[0] / chunk)
            last_of[name] = k - 1
        k = 0
        for (name, x), zi in zip(views, z):
            for i in range(0, x.shape[0], chunk):
                enc = self.encoders[name]
                last = k == last_of[name]
                sync = contextlib.nullcontext() if last or not hasattr(enc, "no_sync") else enc.no_sync()
                with sync, states[k].replay():
                    self._encode(name, x[i:i + chunk]).backward(zi.grad[i:i + chunk])
                k += 1
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        return loss, z

    # -- loop, logging, checkpoints ---------------------------------------------------------
    def _next_batch(self):
        if self._iter is None and self._skip:
            # After a resume, continue where the saved run stopped (epochs of a re-iterable
            # dataset replay in the same order; a one-shot iterator is simply consumed). The
            # checkpoint's RNG state already follows those batches: whatever re-iterating
            # draws (a DataLoader seeds its workers from the global RNG) must not shift it.
            skip, self._skip = self._skip, 0
            with _rng_kept(self.device):
                try:
                    for _ in range(skip):
                        self._next_batch()
                finally:
                    self._replay = None
        if self._iter is None:
            self._new_epoch()
        try:
            return next(self._iter)
        except StopIteration:  # a new epoch
            self._new_epoch()
            try:
                return next(self._iter)
            except StopIteration:
                raise ValueError("the data yielded no batches (empty, or a one-shot iterator that "
                                 "is used up: pass a re-iterable such as a list or a DataLoader)") from None

    def _new_epoch(self):
        """self._iter = iter(self.data), noting the RNG state it starts from. A DataLoader seeds
        its workers from the global RNG there: at every epoch's iter(), or at the first one only
        with persistent_workers. A resume's re-iteration (_replay: the saved run's first and
        latest states, and its number of epochs) starts those two epochs as the saved run did;
        the epochs between are skipped whole, and the skip runs inside _rng_kept."""
        self._epochs += 1
        if self._replay is not None:
            (first, latest), n = self._replay
            state = latest if self._epochs == n else first if self._epochs == 1 else None
            if state is not None:
                _set_rng_state(state, self.device)
        state = _rng_state(self.device)
        self._epoch_rng = (state if self._epochs == 1 else self._epoch_rng[0], state)
        self._iter = iter(self.data)

    def train(self) -> List[dict]:
        cfg = self.config
        main = not _distributed() or dist.get_rank() == 0
        bar = _progress(cfg.steps, self.step, cfg.progress and main, cfg.log_every)
        t0 = time.perf_counter()
        while self.step < cfg.steps:
            m = self.train_step(self._next_batch())
            m["seconds"] = time.perf_counter() - t0
            self.history.append(m)
            bar.update(m)
            if cfg.checkpoint_path and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save(cfg.checkpoint_path)
        bar.close()
        if cfg.checkpoint_path:
            self.save(cfg.checkpoint_path)
        return self.history

    def save(self, path: str):
        """Write a checkpoint. Under torch.distributed every rank must call it (each rank's RNG
        states and log are gathered: alignment and uniformity are of its own embeddings); rank 0
        writes the file."""
        # the epochs' states of a loaded checkpoint whose replay has not run yet (no step since)
        epoch_rng, epochs = self._replay if self._replay is not None else (self._epoch_rng, self._epochs)
        mine = (_rng_state(self.device), self.history, epoch_rng, epochs)
        per_rank = [mine]
        if _distributed():
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, mine)
            if dist.get_rank() != 0:
                return
        state = {"step": self.step, "recipe": self.recipe.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "history": self.history,
                 "rng_per_rank": [r[0] for r in per_rank], "history_per_rank": [r[1] for r in per_rank],
                 "epoch_rng_per_rank": [r[2] for r in per_rank], "epochs_per_rank": [r[3] for r in per_rank],
                 "config": dataclasses.asdict(self.config)}
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint

    def load(self, path: str):
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.recipe.load_state_dict(state["recipe"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], state["history"]
        rng = state["rng_per_rank"]
        rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        self._replay, self._epochs = None, 0
        if len(rng) == world:
            _set_rng_state(rng[rank], self.device)
            if "history_per_rank" in state:  # each rank's own metrics (rank 0's on every rank before)
                self.history = state["history_per_rank"][rank]
            # each rank's own count: ranks may see different numbers of batches per epoch
            epochs = state.get("epochs_per_rank", [0] * world)[rank]  # (older checkpoints lack them)
            if epochs:
                self._replay = (state["epoch_rng_per_rank"][rank], epochs)
        else:  # one rank's stream on every rank would make their augmentations alike
            warnings.warn(f"checkpoint written by {len(rng)} processes, resumed on {world}: the RNG "
                          f"states are not restored, so the run does not continue exactly", stacklevel=2)
        self._iter, self._skip = None, self.step


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    np = sys.modules.get("numpy")  # only if the user's code imported it
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def _set_rng_state(state: dict, device: torch.device):
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it; it lives on the CPU
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if "numpy" in state:
        import numpy
        numpy.random.set_state(state["numpy"])


@contextlib.contextmanager
def _rng_kept(device: torch.device):
    """Run a block without changing any RNG state that a checkpoint keeps."""
    state = _rng_state(device)
    try:
        yield
    finally:
        _set_rng_state(state, device)


def _to(batch, device):
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple (default_collate keeps it)
        return type(batch)(*(_to(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(b, device) for b in batch)
    return batch


def _check_checkpoint_path(path: str):
    """Make the checkpoint's folder, up front: a path that cannot be written failed at the
    first save, after the steps before it (the last step's, with checkpoint_every=0)."""
    if os.path.isdir(path):
        raise ValueError(f"TrainConfig.checkpoint_path must be a file's path, got the folder {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"TrainConfig.checkpoint_path {path!r}: cannot make its folder ({e})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"TrainConfig.checkpoint_path {path!r}: its folder is not writable")


class _progress:
    """tqdm when installed, else a line every log step; silent when disabled."""

    def __init__(self, total, start, enabled, every):
        self.enabled, self.bar, self.every = enabled, None, max(1, every)
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=start, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, m):
        if not self.enabled:
            return
        text = f"loss {m['loss']:.4f} tau {m['temperature']:.3f} align {m['alignment']:.3f} unif {m['uniformity']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif m["step"] % self.every == 0:
            print(f"step {m['step']}: {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
