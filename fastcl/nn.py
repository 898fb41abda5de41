"""Drop-in loss modules."""
import math
import numbers

import torch
from torch import nn

from . import _dispatch, _validation, losses, whitening
from ._common import no_autocast
from .chunked import compute_dtype
from .info_nce import info_nce

__all__ = ["InfoNCELoss", "ClipLoss", "NTXentLoss", "DCLLoss", "DCLWLoss", "SupConLoss",
           "MultipleNegativesRankingLoss", "GroupWhitening", "learnable_logit_scale", "clamp_logit_scale_"]


def _check_settings(backend, *bools, reduction="mean", label_smoothing=0.0, **positive):
    """A loss module's settings, checked when it is built (as GroupWhitening's and ClipLoss's
    are): the error then points at the line that made the module, not at its first forward."""
    _dispatch.check_name(backend)
    for name, value in bools:
        _validation.check_bool(value, name)
    _validation.check_reduction(reduction)
    _validation.smoothing(label_smoothing)
    for name, value in positive.items():
        _validation.positive_number(value, name)


class InfoNCELoss(nn.Module):
    """InfoNCE with a fixed temperature; ``forward(q [B, D], k [N, D], labels=None)``.

    Replaces ``F.cross_entropy(F.normalize(q) @ F.normalize(k).T / t, arange(B))`` without
    materialising the [B, N] logits. See :func:`fastcl.functional.info_nce` for the arguments.
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = False, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", label_smoothing: float = 0.0):
        super().__init__()
        if isinstance(temperature, torch.Tensor):
            raise TypeError("temperature must be a Python float; for a learnable scale use "
                            "fastcl.nn.ClipLoss(init_temperature=...) or "
                            "fastcl.functional.info_nce(q, k, logit_scale=...)")
        temperature = 0.07 if temperature is None else temperature  # None: info_nce's default
        _check_settings(backend, ("symmetric", symmetric), ("normalize", normalize), reduction=reduction,
                        label_smoothing=label_smoothing, temperature=temperature)
        self.temperature, self.symmetric, self.normalize = temperature, symmetric, normalize
        self.reduction, self.backend, self.label_smoothing = reduction, backend, label_smoothing

    def forward(self, q, k, labels=None):
        return info_nce(q, k, temperature=self.temperature, labels=labels, symmetric=self.symmetric,
                        normalize=self.normalize, reduction=self.reduction,
                        label_smoothing=self.label_smoothing, backend=self.backend)

    def extra_repr(self):
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, normalize={self.normalize}, "
                f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"backend={self.backend!r}")


def learnable_logit_scale(init_temperature, max_scale):
    """(nn.Parameter log(1/init_temperature), log(max_scale)) for CLIP's learnable scale."""
    max_log_scale = math.log(_validation.positive_number(max_scale, "max_scale"))
    t = _validation.positive_number(init_temperature, "init_temperature")
    if math.log(1.0 / t) > max_log_scale:
        raise ValueError(f"init_temperature={t} is below 1/max_scale = {1 / max_scale:g}: "
                         f"the scale would start clamped")
    return nn.Parameter(torch.tensor(math.log(1.0 / t))), max_log_scale


def clamp_logit_scale_(logit_scale: nn.Parameter, max_log_scale: float) -> nn.Parameter:
    """Clamps the parameter itself to <= max_log_scale, in place, as open_clip's training loop
    does after each step, and returns it. A clamp inside the graph instead would zero the
    gradient at the cap, and a scale an optimiser step pushed past it would stay frozen.

    Through ``.data``, so that the parameter's version counter is left alone: a graph that saved
    the parameter earlier in the step (a regulariser on it, a second loss) still runs its
    backward, where ``clamp_`` on the parameter made autograd refuse it. The value changes only
    above the cap, as open_clip's loop would have changed it right after the optimiser step.
    While torch.compile or torch.export traces it, a plain in-place clamp (export refuses the
    ``.data`` tensor; the traced graph handles the mutation itself)."""
    if torch.compiler.is_compiling():
        with torch.no_grad():
            logit_scale.clamp_(max=max_log_scale)
    else:
        logit_scale.data.clamp_(max=max_log_scale)
    return logit_scale


def _check_logit_bias(logit_bias):
    """open_clip's logit_bias, one number for every logit: None, a 1-element tensor (returned as
    a 0-dim one) or a finite number (None: it changes nothing)."""
    if logit_bias is None:
        return None
    if isinstance(logit_bias, torch.Tensor):
        if logit_bias.numel() != 1 or not logit_bias.is_floating_point():
            raise ValueError(f"logit_bias must be one number added to every logit (a 1-element float "
                             f"tensor), got shape {tuple(logit_bias.shape)} and dtype {logit_bias.dtype}: "
                             f"a per-logit bias is not a CLIP loss's")
        return logit_bias.reshape(())
    # (comparisons, not math.isfinite: Dynamo keeps a changing float symbolic, and can compare it)
    if isinstance(logit_bias, bool) or not isinstance(logit_bias, numbers.Real) \
            or not -math.inf < logit_bias < math.inf:
        raise ValueError(f"logit_bias must be None, a 1-element tensor or a finite number, got {logit_bias!r}")
    return None


class ClipLoss(nn.Module):
    """Symmetric CLIP loss with open_clip's ``ClipLoss`` signature.

    ``forward(image_features [B, D], text_features [B, D], logit_scale=None, logit_bias=None,
    output_dict=False)``.
    As in open_clip, ``logit_scale`` is the logit MULTIPLIER (the model's ``logit_scale.exp()``,
    so > 0: the loss takes its log; a negative tensor gives a NaN loss, 0 a NaN gradient) and
    the features are used as given (open_clip's models normalise them; pass ``normalize=True``
    to do it here). ``output_dict=True`` returns ``{"contrastive_loss": loss}``. ``logit_bias``
    (open_clip models built with ``init_logit_bias`` return one, and its trainer passes it on) is
    one number added to every logit, as open_clip adds it: a softmax does not see it, so the loss
    is the same and the bias's gradient is 0 (NaN where it is not finite, as open_clip's).

    With ``world_size > 1`` the loss sees every rank's pairs through
    :func:`fastcl.distributed.info_nce_distributed`, with gradients scaled for DDP (see its
    docstring; the ``local_loss`` / ``gather_with_grad`` flags are accepted for compatibility,
    the result is the exact global loss either way). After DDP averages them, the gradients are
    those of the global loss. open_clip's gradients equal those with ``gather_with_grad=True``
    (and ``local_loss=True`` only for equal local batches); its defaults (both False) give
    1/world_size of the features' gradients (``logit_scale``'s is the same), and
    ``local_loss=True, gather_with_grad=False`` an approximation. So a learning rate tuned for
    the model's weights with open_clip's defaults under plain SGD is world_size times too large
    here. ``world_size`` must be the default process group's size; each rank's place
    in the global batch comes from the group (``rank`` is only checked to be in range).
    ``cache_labels`` is accepted and ignored (no label tensor is built); horovod is not
    supported.

    fastcl extension: ``init_temperature=t`` gives the module its own learnable
    ``logit_scale`` parameter (log(1/t)), used when forward gets no ``logit_scale``. Each forward
    first clamps the parameter itself to at most log(max_scale), in place, as open_clip's training
    loop does after each step: its gradient keeps flowing at the cap (a clamp inside the graph
    would zero it there, and a scale pushed past the cap would stay frozen). With
    ``world_size > 1`` its gradient is averaged over the ranks in the backward (it is not in the
    model's DDP), so every rank holds the exact gradient and the ranks' scales stay equal.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 init_temperature=None, max_scale: float = 100.0, normalize: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("horovod is not supported; use torch.distributed")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        if not _validation.is_int(world_size) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if not _validation.is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
        self.rank, self.world_size = int(rank), int(world_size)
        _check_settings(backend, ("normalize", normalize))
        self.normalize, self.backend = normalize, backend
        if init_temperature is not None:
            self.logit_scale, self.max_log_scale = learnable_logit_scale(init_temperature, max_scale)
        else:
            self.logit_scale = None
            self.max_log_scale = math.log(_validation.positive_number(max_scale, "max_scale"))

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None,
                output_dict: bool = False):
        bias = _check_logit_bias(logit_bias)
        if self.world_size > 1:
            self._check_process_group()
        else:
            # Checked first: before the features' device is read, and before the scale is
            # clamped. Across ranks info_nce_distributed checks them on every rank together:
            # a rank that raised here alone would leave the others waiting in a collective.
            _validation.check_embeddings(image_features, text_features, "image_features", "text_features")
        # not getattr(x, "device", default): torch 2.4's Dynamo cannot trace hasattr on a tensor
        is_tensor = isinstance(image_features, torch.Tensor)  # a list only across ranks (checked there)
        device = image_features.device if is_tensor else torch.device("cpu")
        if logit_scale is None:
            if self.logit_scale is None:
                raise ValueError("pass logit_scale (the multiplier, as open_clip does) or build "
                                 "ClipLoss(init_temperature=...) for a learnable one")
            log_scale = clamp_logit_scale_(self.logit_scale, self.max_log_scale).to(device)
        else:
            if not isinstance(logit_scale, torch.Tensor):
                # fp64 features get an fp64 multiplier: its log and exp in fp32 would cost ~1e-7.
                value = _validation.positive_number(logit_scale, "logit_scale")
                logit_scale = _validation.float_tensor(
                    value, device, compute_dtype(image_features.dtype if is_tensor else torch.float32))
            if logit_scale.numel() != 1:
                raise ValueError(f"logit_scale (the multiplier) must have one element, got shape "
                                 f"{tuple(logit_scale.shape)}")
            # open_clip passes exp(logit_scale) (> 0); a tensor multiplier <= 0 gives NaN here
            # (no host sync to check it).
            # log in fp32 at least: a 16-bit round trip through log and exp turned a bf16
            # multiplier of 100 into 99.0 (1% off the loss)
            log_scale = logit_scale.reshape(()).to(compute_dtype(logit_scale.dtype)).log()
        kw = dict(logit_scale=log_scale, symmetric=True, normalize=self.normalize, backend=self.backend)
        if self.world_size > 1:
            from .distributed import info_nce_distributed
            # Its own scale is in no DDP: the loss averages its gradient over the ranks (where it
            # is frozen on some ranks only, those still take part in the average's all-reduce).
            loss = info_nce_distributed(image_features, text_features, grad_mode="ddp",
                                        _own_scale=logit_scale is None, **kw)
        else:
            loss = info_nce(image_features, text_features, **kw)
        if bias is not None:  # softmax is shift-invariant: the same loss, a gradient of 0 for the bias
            loss = loss + 0 * bias.to(loss.device, loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def _check_process_group(self):
        """world_size must be the process group's: a world_size the group does not have gave
        the loss of the ranks that exist, silently. Every rank sees the same group size, so all
        raise together (none waits in a collective). ``rank`` is not checked against it: the
        loss takes each rank's place from the group, as open_clip's rank only says."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"ClipLoss(world_size={self.world_size}) needs an initialised "
                               f"torch.distributed process group (init_process_group); for one "
                               f"process use world_size=1")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ClipLoss(world_size={self.world_size}), but the process group has "
                             f"{dist.get_world_size()} ranks")

    def extra_repr(self):
        return (f"world_size={self.world_size}, learnable={self.logit_scale is not None}, "
                f"max_scale={math.exp(self.max_log_scale):g}, normalize={self.normalize}, "
                f"backend={self.backend!r}")


def _gathering(gather_distributed) -> bool:
    """lightly's rule: gather_distributed=True takes every rank's views as negatives where a
    process group of more than one rank exists, and is the local loss elsewhere."""
    import torch.distributed as dist
    return gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class NTXentLoss(nn.Module):
    """SimCLR NT-Xent with lightly's signature; ``forward(out0 [N, D], out1 [N, D])``.

    Equal to ``lightly.loss.NTXentLoss`` and pytorch-metric-learning's ``NTXentLoss`` (with
    labels marking the pairs) on the same inputs. See :func:`fastcl.functional.nt_xent`.
    ``gather_distributed=True`` (under torch.distributed with more than one rank) takes every
    rank's views as negatives, with gradients scaled for DDP's averaging, as lightly's are
    (:func:`fastcl.distributed.nt_xent_distributed`, grad_mode="ddp"; uneven local batches
    allowed). The value returned is the global loss, where lightly returns each rank's own mean.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0,
                 gather_distributed: bool = False, backend: str = "auto"):
        super().__init__()
        # lightly's size is an int or (size, dim); a size of 0 is no memory bank
        bank = memory_bank_size[0] if isinstance(memory_bank_size, (tuple, list)) and memory_bank_size \
            else memory_bank_size
        if bank:
            raise NotImplementedError("a memory bank is not supported; pass the negatives as extra "
                                      "keys to fastcl.functional.info_nce instead")
        _check_settings(backend, temperature=temperature)
        self.temperature, self.backend = temperature, backend
        self.gather_distributed = _validation.check_bool(gather_distributed, "gather_distributed")

    def forward(self, out0, out1):
        if _gathering(self.gather_distributed):
            from .distributed import nt_xent_distributed
            return nt_xent_distributed(out0, out1, temperature=self.temperature, grad_mode="ddp",
                                       backend=self.backend)
        return losses.nt_xent(out0, out1, temperature=self.temperature, backend=self.backend)

    def extra_repr(self):
        return (f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, "
                f"backend={self.backend!r}")


class DCLLoss(nn.Module):
    """DCL with lightly's signature; ``forward(out0 [N, D], out1 [N, D])``.

    One log-sum-exp over all 2N-2 negatives, as in the paper and in ``lightly.loss.DCLLoss``
    1.6 (checked equal); older lightly releases added separate same-view and cross-view
    log-sum-exps, which :func:`fastcl.functional.dcl` offers as ``negatives="split"``.
    ``weight_fn(out0n, out1n) -> [N]`` is called on the normalised views and multiplies the
    positive term as is, gradient included, as in lightly (whose DCLW weight function detaches
    its own inputs; so does :class:`DCLWLoss`). ``gather_distributed=True``: every rank's views
    are negatives, as in :class:`NTXentLoss` (:func:`fastcl.distributed.dcl_distributed`);
    ``weight_fn`` is called on the rank's own views, as lightly calls it.
    """

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False,
                 backend: str = "auto"):
        super().__init__()
        _check_settings(backend, temperature=temperature)
        if not (weight_fn is None or isinstance(weight_fn, torch.Tensor) or callable(weight_fn)
                or (isinstance(weight_fn, str) and weight_fn == "vmf")):  # what losses.dcl's weight takes
            raise TypeError(f"weight_fn must be a callable (out0n, out1n) -> [N] (or 'vmf' or a [N] "
                            f"tensor, as fastcl.functional.dcl's weight), got {weight_fn!r}")
        self.temperature, self.weight_fn, self.backend = temperature, weight_fn, backend
        self.gather_distributed = _validation.check_bool(gather_distributed, "gather_distributed")

    def _dcl(self, out0, out1, **kw):
        if _gathering(self.gather_distributed):
            from .distributed import dcl_distributed
            return dcl_distributed(out0, out1, temperature=self.temperature, grad_mode="ddp",
                                   backend=self.backend, **kw)
        return losses.dcl(out0, out1, temperature=self.temperature, backend=self.backend, **kw)

    def forward(self, out0, out1):
        return self._dcl(out0, out1, weight=self.weight_fn, detach_weight=False)

    def extra_repr(self):
        return (f"temperature={self.temperature}, weight_fn={self.weight_fn!r}, "
                f"gather_distributed={self.gather_distributed}, backend={self.backend!r}")


class DCLWLoss(DCLLoss):
    """DCLW with lightly's signature, ``forward(out0 [N, D], out1 [N, D])``: DCL with the
    positive term weighted by w = 2 - N softmax(<z1_i, z2_i> / sigma) (detached; see
    :func:`fastcl.functional.dcl_weights`). With ``gather_distributed=True`` the softmax runs
    over the global batch, so that the loss is one process's on the concatenated views;
    lightly's runs over each rank's batch."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False,
                 backend: str = "auto"):
        super().__init__(temperature, None, gather_distributed, backend)
        _check_settings(backend, sigma=sigma)
        self.sigma = sigma

    def forward(self, out0, out1):
        return self._dcl(out0, out1, weight="vmf", sigma=self.sigma)

    def extra_repr(self):
        return (f"temperature={self.temperature}, sigma={self.sigma}, "
                f"gather_distributed={self.gather_distributed}, backend={self.backend!r}")


class SupConLoss(nn.Module):
    """Supervised contrastive loss; ``forward(features [B, D] or [B, V, D], labels [B] = None)``.

    Without labels, the positives are the other views of the same sample (needs V >= 2). With
    labels, every other vector of the anchor's class; an anchor with none is left out of the
    mean (all labels distinct with V = 1 gives a loss of 0). See
    :func:`fastcl.functional.supcon`. ``gather_distributed=True`` (under torch.distributed with
    more than one rank): every rank's vectors are positives (same class) or negatives, with
    gradients scaled for DDP's averaging (:func:`fastcl.distributed.supcon_distributed`,
    grad_mode="ddp"); the value returned is the global loss.
    """

    def __init__(self, temperature: float = 0.1, backend: str = "auto", gather_distributed: bool = False):
        super().__init__()
        _check_settings(backend, temperature=temperature)
        self.temperature, self.backend = temperature, backend
        self.gather_distributed = _validation.check_bool(gather_distributed, "gather_distributed")

    def forward(self, features, labels=None):
        if _gathering(self.gather_distributed):
            from .distributed import supcon_distributed
            return supcon_distributed(features, labels, temperature=self.temperature, grad_mode="ddp",
                                      backend=self.backend)
        return losses.supcon(features, labels, temperature=self.temperature, backend=self.backend)

    def extra_repr(self):
        return (f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, "
                f"backend={self.backend!r}")


class MultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' MNRL on tensors: ``forward(anchor, positive, *negatives)``, each
    negative [B, D] (a column: row i is anchor i's own hard negative, as in
    sentence-transformers), or one [B, M, D] tensor, or one shared pool [P, D] with P != B
    (a pool of exactly B rows: :func:`fastcl.functional.multiple_negatives_ranking`). Cosine
    similarity x ``scale``.

    ``directions``, ``partition_mode``, ``hardness_mode`` and ``hardness_strength`` select
    sentence-transformers' variants, as in
    :func:`fastcl.functional.multiple_negatives_ranking`.
    ``gather_across_devices=True`` (sentence-transformers' name; under torch.distributed with
    more than one rank): every rank's queries, positives and negatives are candidates, with
    gradients scaled for DDP's averaging, as sentence-transformers' are for equal local batches
    (:func:`fastcl.distributed.multiple_negatives_ranking_distributed`, grad_mode="ddp"). The
    value returned is the global loss, where sentence-transformers returns each rank's mean.
    """

    def __init__(self, scale: float = 20.0, backend: str = "auto", gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode: str = "joint", hardness_mode=None,
                 hardness_strength: float = 0.0):
        super().__init__()
        _check_settings(backend)
        self.backend = backend
        self.gather_across_devices = _validation.check_bool(gather_across_devices, "gather_across_devices")
        self.directions, self.partition_mode, _, alpha = losses.mnrl_options(
            directions, partition_mode, hardness_mode, hardness_strength)
        self.scale = losses.check_mnrl_scale(scale, alpha)
        self.hardness_mode, self.hardness_strength = hardness_mode, hardness_strength  # as given

    def forward(self, anchor, positive, *negatives):
        neg = None
        if len(negatives) == 1:
            neg = negatives[0]
            if isinstance(neg, torch.Tensor) and isinstance(anchor, torch.Tensor) and neg.dim() == 2 \
                    and neg.shape[0] == anchor.shape[0]:
                neg = neg[:, None]  # one column of hard negatives, anchor i's own in row i
        elif negatives:
            want = tuple(anchor.shape) if isinstance(anchor, torch.Tensor) else None
            shapes = [tuple(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__ for n in negatives]
            if want is not None and any(sh != want for sh in shapes):  # else torch.stack's bare error
                raise ValueError(f"with several negatives, each must be [B, D] like anchor "
                                 f"{want}; got {shapes}")
            neg = torch.stack(negatives, dim=1)  # [B, M, D]
        return _mnrl_call(self, anchor, positive, neg)

    def extra_repr(self):
        return (f"scale={self.scale}, gather_across_devices={self.gather_across_devices}, "
                f"directions={self.directions}, partition_mode={self.partition_mode!r}, "
                f"hardness_mode={self.hardness_mode!r}, hardness_strength={self.hardness_strength}, "
                f"backend={self.backend!r}")


def _mnrl_call(module, anchor, positive, negatives):
    """The MNRL of a module holding its options (this one, or the sentence-transformers
    drop-in), gathered across ranks where it asks for it."""
    # as they act: the constructor warned once if only one of them was given
    mode, alpha = losses.mnrl_penalty(module.hardness_mode, module.hardness_strength)
    kw = dict(scale=module.scale, directions=module.directions, partition_mode=module.partition_mode,
              hardness_mode=mode, hardness_strength=alpha, backend=module.backend)
    if _gathering(module.gather_across_devices):
        from .distributed import multiple_negatives_ranking_distributed
        return multiple_negatives_ranking_distributed(anchor, positive, negatives, grad_mode="ddp", **kw)
    return losses.multiple_negatives_ranking(anchor, positive, negatives, **kw)


class _ApplyRunningWhitening(torch.autograd.Function):
    """xc [G, N, g] @ W [G, g, g] (a constant: the running matrix), with its backward g @ W^T
    outside autocast too, for compiled graphs. Compiled under autocast, a plain matmul's
    backward was traced with autocast on, although its forward ran in a no_autocast region:
    bf16 gradients (1.6e-3 off)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(xc, W):
        return xc @ W

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        W, = ctx.saved_tensors
        with no_autocast(grad.device):
            return grad @ W.transpose(-1, -2), None


class GroupWhitening(nn.Module):
    """Group whitening layer with running statistics, like BatchNorm.

    ``forward(x [N, D]) -> [N, D]``. In training mode it whitens with the batch's statistics
    (see :func:`fastcl.functional.group_whiten`) and updates ``running_mean`` [D] and
    ``running_whitening`` [G, g, g] with ``momentum``; in eval mode it applies those:
    y = (x - running_mean) @ running_whitening, group by group.
    """

    def __init__(self, num_features: int, num_groups: int, eps: float = 1e-5, method: str = "zca",
                 iters=None, momentum: float = 0.1, ddof: int = 0, detach_stats: bool = False,
                 track_running_stats: bool = True, backend: str = "auto"):
        super().__init__()
        whitening.check_options(num_features, num_groups, eps, ddof, method, iters)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r} (a cumulative "
                             f"average, BatchNorm's momentum=None, is not supported)")
        _validation.check_bool(detach_stats, "detach_stats")
        _validation.check_bool(track_running_stats, "track_running_stats")
        num_features, num_groups = int(num_features), int(num_groups)
        g = num_features // num_groups
        whitening.check_backend(method, backend, g)
        self.num_features, self.num_groups = num_features, num_groups
        self.kw = dict(eps=eps, method=method, iters=iters, ddof=ddof, detach_stats=detach_stats,
                       backend=backend)
        self.momentum, self.track_running_stats = float(momentum), track_running_stats
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_whitening", torch.eye(g).repeat(num_groups, 1, 1))

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected [N, {self.num_features}], got {tuple(x.shape)}")
        g = self.num_features // self.num_groups
        if self.training and self.track_running_stats and x.shape[0] <= g:
            # BatchNorm refuses N = 1 in training. Here N - 1 < g centred samples leave the
            # covariance singular: W has entries ~ eps^-1/2, and blending it into the running
            # matrix spoils eval mode (its output variance 1e4 after one 1-sample batch).
            raise ValueError(f"GroupWhitening in training mode needs more samples than channels "
                             f"per group to update its running whitening matrix: N = {x.shape[0]} <= "
                             f"g = {g}. Use larger batches (or drop_last=True), fewer channels per "
                             f"group, or track_running_stats=False (batch statistics in eval too)")
        if self.training or not self.track_running_stats:
            y, W = whitening.group_whiten(x, self.num_groups, return_matrix=True, **self.kw)
            if self.training and self.track_running_stats:
                with torch.no_grad():  # the batch's own W: no second eigh / iteration
                    # The mean in fp32 (fp64): a 16-bit mean of data at 30 +- 1 is off by ~0.06.
                    mean = x.detach().mean(0, dtype=compute_dtype(x.dtype))
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                    self.running_whitening.lerp_(W.to(self.running_whitening.dtype), self.momentum)
            return y
        # In fp32 (fp64 for fp64 input), as training mode computes: x - mean in 16 bits would
        # lose the digits that remain after centring.
        N, G, cd = x.shape[0], self.num_groups, compute_dtype(x.dtype)
        with no_autocast(x.device):
            xc = (x.to(cd) - self.running_mean.to(cd)).reshape(N, G, g).transpose(0, 1)
            W = self.running_whitening.to(cd)
            # (eager autograd runs no backward under the forward's autocast: a plain matmul, which
            # torch.func's jvp also takes)
            y = _ApplyRunningWhitening.apply(xc, W) if _validation._compiling() else xc @ W
            return y.transpose(0, 1).reshape(N, G * g).to(x.dtype)

    def extra_repr(self):
        kw = ", ".join(f"{k}={v!r}" for k, v in self.kw.items())
        return (f"{self.num_features}, num_groups={self.num_groups}, {kw}, momentum={self.momentum}, "
                f"track_running_stats={self.track_running_stats}")
