"""InfoNCE / CLIP loss over a batch split across torch.distributed ranks.

Each rank holds its local q [B_r, D] and k [N_r, D]; the global batch is the concatenation in
rank order, and batches may be uneven. Two ways to see the global negatives:

- ``gather="all_gather"``: every rank gathers all keys (and, for the CLIP loss, all queries)
  with gradient, then runs the fused op on its local rows against them. The gather's backward
  all-reduces the gradient and keeps the owner's rows. Memory O(N_total * D) per rank.
- ``gather="ring"``: key blocks travel around the ring with ``batch_isend_irecv``. The next
  block's transfer overlaps this block's compute, and the rows' (max, log-sum) statistics
  merge online. In the backward each block travels again with its dk accumulator, which lands
  back at its owner after world_size hops. Memory O(max local batch * D) per rank.

The loss family (``nt_xent_distributed``, ``dcl_distributed``, ``supcon_distributed``) gathers
every rank's views the all_gather way, this rank's first, and runs fastcl.losses' own rows on
them: the fused op's exclusions (self, partner) and labels keep their local indices.
``multiple_negatives_ranking_distributed`` is InfoNCE with each rank's positives and negatives
as its keys (its variants: fastcl.losses' mnrl_rows on the gathered blocks).
``group_whiten_distributed`` whitens with the global batch's statistics (SyncBatchNorm-like:
all-reduced mean and Gram, and their gradients in the backward).

Gradient convention (``grad_mode``):
- ``"exact"`` (default): every rank returns the GLOBAL loss value. The gradients w.r.t. its
  local q and k, and w.r.t. logit_scale (all-reduced once), equal those of the single-process
  loss on the concatenated batch.
- ``"ddp"``: for DistributedDataParallel, which AVERAGES parameter gradients over ranks. The
  local part is scaled by world_size and logit_scale's gradient is left to DDP, so that after
  DDP's averaging every parameter gets the exact gradient of the global loss, even for uneven
  batches. open_clip's ``local_loss=True, gather_with_grad=True`` equals this only when every
  rank has the same batch size (it averages per-rank means).

Every rank calls a loss collectively and runs its backward (a collective too): the loss must
need a gradient on every rank or on none (checked). Which inputs require grad may differ by
rank (a frozen tower, cached negatives): a gathered block that is a constant on some ranks
only is tied into their graph, so that its backward still takes part there (see _tied).
"""
import numbers
import warnings
import zlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _dispatch, _validation, losses, whitening
from ._common import no_autocast
from .info_nce import _impl, prepare, row_terms

__all__ = ["info_nce_distributed", "nt_xent_distributed", "dcl_distributed", "supcon_distributed",
           "multiple_negatives_ranking_distributed", "group_whiten_distributed",
           "shuffled_group_whiten_distributed", "mean_grad_over_ranks"]


def _all_ints(values, device, group):
    """Every rank's list of ints (the same length on every rank), in one all_gather."""
    t = torch.tensor(values, device=device, dtype=torch.int64)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return [x.tolist() for x in out]


def _padded(x: Tensor, rows: int) -> Tensor:
    out = x.new_zeros((rows,) + tuple(x.shape[1:]))
    out[: x.shape[0]] = x
    return out


class _AllGatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (uneven sizes allowed); backward sums and keeps ours."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        bufs = [torch.empty((max(sizes),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
                for _ in sizes]
        dist.all_gather(bufs, _padded(x, max(sizes)).contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([b[:s] for b, s in zip(bufs, sizes)])

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)  # gloo has no reduce-scatter; this is its superset
        off = sum(ctx.sizes[: ctx.rank])
        return g[off: off + ctx.sizes[ctx.rank]], None, None, None


class _SumGradOverRanks(torch.autograd.Function):
    """Identity; the gradient is summed over ranks once (logit_scale in "exact" mode), or
    averaged (mean=True)."""

    @staticmethod
    def forward(ctx, x, group, mean=False):
        ctx.group, ctx.mean = group, mean
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        if ctx.mean:
            g /= dist.get_world_size(ctx.group)
        return g, None, None


def mean_grad_over_ranks(x: Tensor, group=None) -> Tensor:
    """Identity whose backward averages x's gradient over the ranks, as DDP does for the model's
    parameters: for a parameter outside DDP (a loss module's own logit scale) fed to a
    grad_mode="ddp" loss, every rank then holds the exact gradient of the global loss. Its
    backward is an all-reduce: x must require grad on every rank or on none (unchecked here;
    fastcl.nn.ClipLoss's own scale is averaged inside the loss, where a rank that froze it
    still takes part)."""
    return _SumGradOverRanks.apply(x, group, True)


def _ring_exchange(tensors, rank, world, group):
    """Start sending `tensors` to rank+1 and receiving same-shaped ones from rank-1."""
    recv = [torch.empty_like(t) for t in tensors]
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is not None:  # P2POp's peer is a global rank; rank and world are the group's
        nxt, prv = dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in recv]
    return dist.batch_isend_irecv(ops), recv


def _block_labels(labels, off, n):
    """(rows whose positive is in the key block [off, off + n), labels within the block; -1 for
    the other rows, which the fused op reads as no positive in this block)."""
    in_b = (labels >= off) & (labels < off + n)
    return in_b, torch.where(in_b, labels - off, torch.full_like(labels, -1))


class _RingRows(torch.autograd.Function):
    """Per-row logsumexp_j S_ij - S_{i,y_i} of local rows u against keys spread over the ring."""

    @staticmethod
    def forward(ctx, u, v, scale, labels, sizes, rank, group, backend, keys_grad):
        # It calls the backend's lse_forward / lse_backward directly, outside the custom op and
        # its autocast guard: under autocast the forward's statistics came from bf16 scores and
        # the backward's recompute from fp32 ones (dq 2e-2 off), or the backward crashed.
        # keys_grad: whether v needs a gradient on some rank (the same on every rank); where it
        # does not (a frozen key tower), the dk accumulators stay home.
        ctx.keys_grad = keys_grad
        with no_autocast(u.device):
            return _RingRows._forward(ctx, u, v, scale, labels, sizes, rank, group, backend)

    @staticmethod
    def _forward(ctx, u, v, scale, labels, sizes, rank, group, backend):
        impl, world = _impl(backend), len(sizes)
        offs = [sum(sizes[:r]) for r in range(world)]
        cd, unit = scale.dtype, impl.LOG_UNIT
        # The rows' statistics merge as (max, log-sum below the max), and the positive comes
        # from its block's own tile, as in one process: the loss (max - pos) + log-sum is then
        # exact when the positive is the maximum. A merged log-sum-exp minus a positive
        # recomputed elsewhere lost every digit of nearly solved rows (their loss is below the
        # rounding of the logits). They stay in the backend's units (log2 for the kernels):
        # converting them to natural logs and back for the backward rounded the max by
        # ~|S| u, and the recomputed P no longer summed to 1 (dq 6x one process's error).
        logaddexp = torch.logaddexp if unit == 1.0 else torch.logaddexp2
        m = torch.full((u.shape[0],), float("-inf"), dtype=cd, device=u.device)
        logl = torch.zeros(u.shape[0], dtype=cd, device=u.device)
        pos = torch.zeros(u.shape[0], dtype=cd, device=u.device)
        block, owner = _padded(v, max(sizes)).contiguous(), rank
        for step in range(world):
            pending = _ring_exchange([block], rank, world, group) if step < world - 1 else None
            in_b, lab = _block_labels(labels, offs[owner], sizes[owner])
            _, _, stats, _ = impl.lse_forward(u, block[: sizes[owner]], scale, lab, False)
            mb, lb = stats[0].to(cd), stats[1].to(cd)
            m_new = torch.maximum(m, mb)
            logl = logaddexp(logl + (m - m_new), lb + (mb - m_new))
            m = m_new
            pos = torch.where(in_b, stats[2].to(cd), pos)
            if pending is not None:
                for w in pending[0]:
                    w.wait()
                block, owner = pending[1][0], (owner - 1) % world
        ctx.save_for_backward(u, v, scale, labels, m, logl, pos)
        ctx.cfg = (sizes, rank, group, backend)
        return ((m - pos) + logl) * unit

    @staticmethod
    def backward(ctx, g):
        with no_autocast(g.device):
            return _RingRows._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        u, v, scale, labels, m, logl, pos = ctx.saved_tensors
        sizes, rank, group, backend = ctx.cfg
        impl, world = _impl(backend), len(sizes)
        offs = [sum(sizes[:r]) for r in range(world)]
        # The merged statistics, in the backend's units: max, log-sum, the positive, 1 positive.
        stats = torch.stack([m, logl, pos, torch.ones_like(m)])
        stats = stats.to(torch.float32 if backend == "triton" else m.dtype).contiguous()
        g = g.contiguous()
        du = torch.zeros(u.shape, dtype=m.dtype, device=u.device)
        dscale = torch.zeros((), dtype=m.dtype, device=u.device)
        rows = max(sizes)
        block, owner = _padded(v, rows).contiguous(), rank
        dacc = torch.zeros((rows, v.shape[1]), dtype=m.dtype, device=v.device)
        for step in range(world):
            # The key block for the next step can travel while this one is computed.
            pending = _ring_exchange([block], rank, world, group) if step < world - 1 else None
            n = sizes[owner]
            if n:
                _, lab = _block_labels(labels, offs[owner], n)
                du_p, dv_p, ds_p = impl.lse_backward(u, block[:n], scale, stats, stats[:2, :0], g, g,
                                                     lab, False)
                du += du_p.to(du.dtype)
                dacc[:n] += dv_p.to(dacc.dtype)
                dscale += ds_p.to(dscale.dtype)
            # dk accumulators follow their blocks; after world_size hops each is at its owner
            # (with one rank it never leaves).
            if world > 1 and ctx.keys_grad:
                acc_pending = _ring_exchange([dacc], rank, world, group)
                for w in acc_pending[0]:
                    w.wait()
                dacc = acc_pending[1][0]
            if pending is not None:
                for w in pending[0]:
                    w.wait()
                block, owner = pending[1][0], (owner - 1) % world
        return (du.to(u.dtype), dacc[: v.shape[0]].to(v.dtype) if ctx.keys_grad else None, dscale.to(scale.dtype),
                None, None, None, None, None, None)


_GATHERS, _GRAD_MODES = ("all_gather", "ring"), ("exact", "ddp")


def _world_and_rank(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastcl's distributed losses need an initialised torch.distributed process group")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_grad_mode(grad_mode):
    if grad_mode not in _GRAD_MODES:
        raise ValueError(f"grad_mode must be 'exact' or 'ddp', got {grad_mode!r}")


def _digest(value) -> int:
    """A rank-independent int of an argument every rank must pass alike: a tensor by its kind
    and dtype (its values may differ by rank; its dtype sets the sizes of what the backward
    exchanges: a float64 logit_scale on one rank aborted gloo there), a callable by its kind, a
    number by its float value."""
    if isinstance(value, Tensor):
        value = f"tensor {value.dtype}"
    elif callable(value):
        value = "callable"
    elif isinstance(value, numbers.Real):  # 1, 1.0 and True alike, as the checks read them
        value = float(value)
    return zlib.crc32(repr(value).encode())


def _raise_together(error, x, group):
    """Raise on every rank when `error` (this rank's exception, or None) is set on any rank, in
    one all_gather: a rank that raised alone would leave its peers blocked in the next collective."""
    flags = _all_ints([int(error is not None)], x.device if isinstance(x, Tensor) else "cpu", group)
    if error is not None:
        raise error
    bad = [r for r, f in enumerate(flags) if f[0]]
    if bad:
        raise ValueError(f"invalid inputs on rank(s) {bad} (see their error)")


def _needs_grad(*xs) -> bool:
    """Whether a loss of these inputs (tensors or None) needs a gradient on this rank."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in xs)


def _tied(x, somewhere: bool, *xs):
    """x (a tensor or None), put into the autograd graph where it requires grad on some other
    rank (`somewhere`, from _grad_somewhere) and not here, while one of xs does: an empty slice
    of that input, summed, is added to it (the same values). A gathered tensor's backward is a
    collective, which every rank must run where any rank does (a frozen tower or cached
    negatives on some ranks only). Where x is a constant on every rank, it stays one: its
    gather then has no backward anywhere (no all-reduce of zeros for a frozen tower)."""
    if x is None or not somewhere or _needs_grad(x):
        return x
    src = next((t for t in xs if _needs_grad(t)), None)
    return x if src is None else x + src.reshape(-1)[:0].sum().to(x.dtype)


def _tie_where_needed(some, ts, sources, bits=None):
    """ts, each tied (_tied) where its input needs a gradient on some rank: some[bits[i]]
    (default some[i]), from _grad_somewhere; sources the tensors that may carry this rank's
    graph."""
    return [_tied(t, some[b], *sources) for t, b in zip(ts, range(len(ts)) if bits is None else bits)]


def _grad_somewhere(metas, n):
    """Per tensor of _validate_collectively's grads (n of them): whether it needs a gradient on
    some rank."""
    bits = 0
    for m in metas:
        bits |= m[8]
    return [bool(bits >> i & 1) for i in range(n)]


def _validate_collectively(validate, x, group, agree=(), grads=()):
    """(validate()'s result, every rank's metadata). validate() checks this rank's inputs and
    returns (its result, [dtype, D, B_r, N_r, labels given, gather index, grad_mode]); agree is
    ((name, value), ...) of the arguments every rank must pass alike; grads the tensor inputs
    (or None), whose loss must need a gradient on every rank or on none (meta[8]: a bit per
    input that needs one here).

    A rank that raised alone would leave its peers blocked in the next collective. In one
    all_gather, every rank learns whether any rank's inputs are bad, and whether the ranks
    agree on what the collectives exchange: the dtype and D (gloo aborted the process on a size
    mismatch; two 16-bit dtypes were silently read as one), whether labels are given (their
    range check is a collective), gather and grad_mode (ranks that differ there run different
    collectives: a hang until the timeout), and agree's (a different reduction aborted gloo, a
    different temperature returned a mix of the two losses), and whether the loss needs a
    gradient (a rank whose loss needs none runs no backward: the others waited in theirs)."""
    local_error, meta, result = None, [1, -1, -1, 0, 0, -1, -1, -1], None
    try:
        result, (dtype, d, b, n, has_labels, gather, grad_mode) = validate()
        meta = [0, _validation.FLOAT_DTYPES.index(dtype), d, b, n, int(has_labels), gather,
                _GRAD_MODES.index(grad_mode)]
    except (ValueError, TypeError, _dispatch.BackendUnavailable) as e:
        local_error = e
    meta.append(sum(1 << i for i, t in enumerate(grads) if _needs_grad(t)))
    metas = _all_ints(meta + [_digest(v) for _, v in agree], x.device if isinstance(x, Tensor) else "cpu",
                      group)
    if local_error is not None:
        raise local_error
    if any(m[0] for m in metas):
        bad = [r for r, m in enumerate(metas) if m[0]]
        raise ValueError(f"invalid inputs on rank(s) {bad} (see their error)")
    names = {1: _validation.FLOAT_DTYPES, 5: (False, True), 6: _GATHERS, 7: _GRAD_MODES}
    for i, what in ((1, "dtype"), (2, "feature dimension D"), (5, "labels (given on all ranks or none)"),
                    (6, "gather"), (7, "grad_mode")):
        if len({m[i] for m in metas}) > 1:
            got = [names[i][m[i]] if i in names else m[i] for m in metas]
            raise (TypeError if i == 1 else ValueError)(
                f"every rank must pass the same {what}; per rank: {got}")
    if len({m[8] != 0 for m in metas}) > 1:
        raise ValueError(
            f"every rank's loss must need a gradient, or none's; per rank: {[bool(m[8]) for m in metas]}. "
            "Its backward runs collectives, which would leave the ranks that run it waiting for the "
            "others (an input requires grad, with grad enabled, on some ranks only)")
    for i, (name, value) in enumerate(agree, start=9):
        if len({m[i] for m in metas}) > 1:
            raise ValueError(f"every rank must pass the same {name}; the ranks differ (this rank's: {value!r})")
    return result, metas


def _fused_backend(backend, x):
    backend = _dispatch.resolve(backend, x.device, x.dtype)
    if backend == "reference":
        raise _dispatch.BackendUnavailable("backend='reference' is not usable here: the distributed "
                                           "losses run on the fused op ('torch', 'triton' or 'cuda')")
    return backend


def _global_reduce(per, reduction, count, grad_mode, group, valid=None):
    """The global loss from this rank's per-row terms: mean over `count` rows (of all ranks),
    sum, or this rank's rows ("none"); rows where valid is False count for nothing. Its value is
    the global one on every rank, its gradient that of the local part (x world_size for DDP)."""
    world = dist.get_world_size(group)
    if valid is not None:
        per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per * world if grad_mode == "ddp" else per  # the same DDP scaling as the reductions
    local = per.sum() / (max(count, 1) if reduction == "mean" else 1)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    if grad_mode == "ddp":
        local = local * world
    return local + (total - local.detach())  # the global value; gradients of the local part


def _keys_own_first(n_local, sizes, rank, group):
    """The loss family's keys hook (fastcl.losses.local_keys across ranks): x [m * n_local, ...]
    -> every rank's rows [m * sum(sizes), ...], with gradient, this rank's first. A row's self
    and partner then keep their local indices, which the fused op's exclusions and labels use;
    the order of the other ranks' rows changes no loss."""
    def keys(x):
        m = x.shape[0] // n_local
        rows = [m * s for s in sizes]
        everyone = _AllGatherRows.apply(x.contiguous(), rows, rank, group)
        off = sum(rows[:rank])
        return torch.cat([everyone[off: off + rows[rank]], everyone[:off], everyone[off + rows[rank]:]])
    return keys


def info_nce_distributed(q: Tensor, k: Tensor, *, temperature=None, logit_scale=None,
                         labels: Optional[Tensor] = None, symmetric: bool = False,
                         normalize: bool = True, reduction: str = "mean", gather: str = "all_gather",
                         grad_mode: str = "exact", group=None, backend: str = "auto",
                         _own_scale: bool = False) -> Tensor:
    """InfoNCE / CLIP loss of the global batch, each rank passing its local q [B_r, D] and k [N_r, D].

    labels: int64 (or int32) [B_r], GLOBAL column indices (rows of the concatenated k).
    Default: as in one process, on each rank: local query i's positive is local key i, and the
    rank's keys B_r..N_r-1 are extra negatives (so every rank needs N_r >= B_r).
    symmetric: the CLIP loss (each rank needs N_r == B_r).
    reduction: "mean" (over the global batch), "sum", or "none" (this rank's rows; with
    grad_mode="ddp" these per-row values come multiplied by the world size, like their
    gradients, so that DDP's averaging over the ranks gives the exact gradient).
    gather: "all_gather" or "ring"; grad_mode: "exact" or "ddp" (see the module docstring).
    Every rank must call this collectively with the same arguments except the tensors.
    _own_scale (internal, fastcl.nn.ClipLoss): logit_scale is a parameter outside DDP, whose
    gradient is averaged over the ranks here (with grad_mode="ddp"), after the ties, so that a
    rank where it is frozen still takes part.
    """
    world, rank = _world_and_rank(group)

    def validate():
        if gather not in _GATHERS:
            raise ValueError(f"gather must be 'all_gather' or 'ring', got {gather!r}")
        _check_grad_mode(grad_mode)
        _validation.check_embeddings(q, k)
        _validation.check_reduction(reduction)
        sym = _validation.check_bool(symmetric, "symmetric")
        norm = _validation.check_bool(normalize, "normalize")
        if labels is not None:
            _validation.check_class_ids(labels, q.shape[0], q.device)
        scale = _validation.scale_tensor(temperature, logit_scale, q.device, q.dtype)
        return (sym, norm, scale, _fused_backend(backend, q)), [
            q.dtype, q.shape[1], q.shape[0], k.shape[0], labels is not None, _GATHERS.index(gather), grad_mode]

    (symmetric, normalize, scale, backend), metas = _validate_collectively(
        validate, q, group, (("temperature", temperature), ("logit_scale", logit_scale), ("symmetric", symmetric),
                             ("normalize", normalize), ("reduction", reduction)), (q, k, logit_scale))
    sizes_q, sizes_k = [m[3] for m in metas], [m[4] for m in metas]
    B, N = sum(sizes_q), sum(sizes_k)
    off_k = sum(sizes_k[:rank])
    if symmetric:
        if sizes_q != sizes_k:
            raise ValueError(f"symmetric=True needs as many keys as queries on every rank, got "
                             f"{sizes_q} and {sizes_k}")
        if labels is not None:
            raise ValueError("symmetric=True pairs row i with column i; labels are not supported with it")
    if labels is None:
        # Local key i, the global row off_k + i: each rank's [positives; hard negatives], as one
        # process takes them. (The global query index off_q + i paired a rank's queries with
        # another rank's keys wherever an earlier rank had extra keys.)
        short = [r for r in range(world) if sizes_k[r] < sizes_q[r]]
        if short:
            raise ValueError(f"rank(s) {short} have fewer keys than queries (per rank: "
                             f"{sizes_k} keys, {sizes_q} queries): without labels, query i's "
                             f"positive is its rank's key i; pass labels (global rows of k)")
        labels = torch.arange(off_k, off_k + q.shape[0], device=q.device)
    else:
        # The range needs the global N; the min/max are all-reduced so every rank agrees.
        lo_hi = torch.stack([-labels.min(), labels.max()]).long()
        dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX, group=group)
        if -int(lo_hi[0]) < 0 or int(lo_hi[1]) >= N:
            raise ValueError(f"labels must lie in [0, {N}) (the global rows of k), "
                             f"got values in [{-int(lo_hi[0])}, {int(lo_hi[1])}] across ranks")
        labels = labels.long()
    # The gathers' (and logit_scale's sum's) backward runs where the tensor needs a gradient on
    # some rank (see _tied). The ring's one autograd.Function runs it wherever the loss needs one.
    some = _grad_somewhere(metas, 3)  # (the ring's too: whether q, k need a gradient on some rank)
    q, k, scale = _tie_where_needed(some, (q, k, scale), (q, k, logit_scale))
    if logit_scale is not None and (grad_mode == "exact" or _own_scale):
        scale = _SumGradOverRanks.apply(scale, group, grad_mode == "ddp")
    u, v, scale = prepare(scale, normalize, q, k)
    diag = torch.arange(off_k, off_k + k.shape[0], device=k.device)  # key j's positive: query j
    if gather == "all_gather":
        per, _ = row_terms(u, _AllGatherRows.apply(v, sizes_k, rank, group), scale, backend, labels=labels)
        if symmetric:
            col, _ = row_terms(v, _AllGatherRows.apply(u, sizes_q, rank, group), scale, backend, labels=diag)
    else:
        per = _RingRows.apply(u, v, scale, labels, sizes_k, rank, group, backend, some[1])
        if symmetric:
            col = _RingRows.apply(v, u, scale, diag, sizes_q, rank, group, backend, some[0])
    if symmetric:
        per = 0.5 * (per + col)
    return _global_reduce(per, reduction, B, grad_mode, group)


# ----------------------------------------------------------------------------- the loss family
# NT-Xent, DCL/DCLW and SupCon across ranks: each rank's anchors against every rank's views,
# gathered with gradient (all_gather; the ring carries InfoNCE's positives only). The rows are
# fastcl.losses' own (nt_xent_rows, dcl_rows, supcon_rows) with the gathered keys: the same
# fused op, exclusions and positives as in one process.

def _pairs_setup(z1, z2, temperature, reduction, normalize, grad_mode, group, backend, min_pairs,
                 check=None, agree=(), grads=()):
    """Collective checks of two views [n_r, D] per rank, and check()'s of the loss's own
    arguments (agree: those every rank must pass alike; grads: its tensors besides the views):
    (world, rank, scale, normalize, sizes, backend, z1, z2), each view tied into the graph
    where it needs a gradient on some rank (see _tied)."""
    world, rank = _world_and_rank(group)

    def validate():
        _check_grad_mode(grad_mode)
        losses.check_views(z1, z2)
        if check is not None:
            check()
        return (losses.settings(z1, temperature, reduction, normalize) + (_fused_backend(backend, z1),),
                [z1.dtype, z1.shape[1], z1.shape[0], z1.shape[0], False, 0, grad_mode])

    (scale, normalize, backend), metas = _validate_collectively(
        validate, z1, group, (("temperature", temperature), ("normalize", normalize), ("reduction", reduction))
        + tuple(agree), (z1, z2) + tuple(grads))
    sizes = [m[3] for m in metas]
    if sum(sizes) < min_pairs:
        raise ValueError(f"this loss needs at least {min_pairs} pairs over all ranks (its negatives "
                         f"would be empty), got {sizes} per rank")
    z1, z2 = _tie_where_needed(_grad_somewhere(metas, 2), (z1, z2), (z1, z2) + tuple(grads))
    return world, rank, scale, normalize, sizes, backend, z1, z2


def nt_xent_distributed(z1: Tensor, z2: Tensor, *, temperature: float = 0.5, normalize: bool = True,
                        reduction: str = "mean", grad_mode: str = "exact", group=None,
                        backend: str = "auto") -> Tensor:
    """SimCLR's NT-Xent over the global batch, each rank passing its two views z1, z2 [n_r, D].

    Every anchor's negatives are the 2N - 2 other views of all ranks (N = sum of n_r; uneven
    n_r allowed), its positive its other view: :func:`fastcl.functional.nt_xent` of the
    concatenated views. reduction: "mean" (over the 2N anchors), "sum", or "none" (this rank's
    [2 n_r], z1's rows first; x world_size with grad_mode="ddp", like their gradients).
    grad_mode: "exact" or "ddp", as in :func:`info_nce_distributed`. Every rank calls this
    collectively, with at least one pair and the same arguments except the tensors (checked:
    an error is raised on every rank rather than a hang).
    lightly's ``NTXentLoss(gather_distributed=True)`` has ddp's gradients for equal n_r, but
    returns each rank's local mean as the value; this returns the global one.
    """
    world, rank, scale, normalize, sizes, backend, z1, z2 = _pairs_setup(
        z1, z2, temperature, reduction, normalize, grad_mode, group, backend, 1)
    u, scale = prepare(scale, normalize, torch.cat([z1, z2]))
    per = losses.nt_xent_rows(u, scale, backend, _keys_own_first(z1.shape[0], sizes, rank, group))
    return _global_reduce(per, reduction, 2 * sum(sizes), grad_mode, group)


def dcl_distributed(z1: Tensor, z2: Tensor, *, temperature: float = 0.1, weight=None, sigma: float = 0.5,
                    detach_weight: bool = True, negatives: str = "joint", normalize: bool = True,
                    reduction: str = "mean", grad_mode: str = "exact", group=None,
                    backend: str = "auto") -> Tensor:
    """DCL / DCLW (:func:`fastcl.functional.dcl`) over the global batch, each rank passing its
    two views z1, z2 [n_r, D] (at least 2 pairs over all ranks).

    weight: None; "vmf" (DCLW), whose softmax runs over the global batch, so that the loss and
    its gradients equal one process's on the concatenated views (lightly's DCLW under
    ``gather_distributed=True`` takes it over each rank's batch); a tensor [n_r] (this rank's
    pairs); or a callable, called on this rank's normalised views, as lightly calls it.
    Other arguments, and the collective call, as in :func:`fastcl.functional.dcl` and
    :func:`nt_xent_distributed`. Whether the loss needs a gradient (on every rank or on none)
    is read from the views and a tensor weight with detach_weight=False; a callable's own
    parameters are not seen (with detach_weight=False and views that need no gradient on some
    ranks, the ranks are told they disagree).
    """
    def check():
        if negatives not in ("joint", "split"):
            raise ValueError(f"negatives must be 'joint' or 'split', got {negatives!r}")
        if isinstance(z1, Tensor):
            losses.check_dcl_weight(weight, sigma, detach_weight, z1.shape[0], z1.device)

    world, rank, scale, normalize, sizes, backend, z1, z2 = _pairs_setup(
        z1, z2, temperature, reduction, normalize, grad_mode, group, backend, 2, check,
        (("weight", weight), ("sigma", sigma), ("detach_weight", detach_weight), ("negatives", negatives)),
        (None if detach_weight else weight,))  # a detached weight takes no gradient
    keys = _keys_own_first(z1.shape[0], sizes, rank, group)
    u1, u2, scale = prepare(scale, normalize, z1, z2)
    # A vmf weight's softmax gathers the pairs' similarities (a collective of its own). A
    # callable runs the user's code on this rank's views: its error (or a result of the wrong
    # shape) is raised on every rank, which would otherwise wait in the next collective.
    if callable(weight) and not isinstance(weight, Tensor):
        error, w = None, (None, None)
        try:
            w = losses.dcl_weights_for(u1, u2, weight, sigma, detach_weight, keys)
        except Exception as e:  # re-raised below, on this rank
            error = e
        _raise_together(error, z1, group)
        w1, w2 = w
    else:
        w1, w2 = losses.dcl_weights_for(u1, u2, weight, sigma, detach_weight, keys)
    per = losses.dcl_rows(u1, u2, scale, backend, negatives, w1, w2, keys)
    return _global_reduce(per, reduction, 2 * sum(sizes), grad_mode, group)


def supcon_distributed(features: Tensor, labels: Optional[Tensor] = None, *, temperature: float = 0.1,
                       normalize: bool = True, reduction: str = "mean", grad_mode: str = "exact",
                       group=None, backend: str = "auto") -> Tensor:
    """SupCon (:func:`fastcl.functional.supcon`) over the global batch, each rank passing its
    features [b_r, D] or [b_r, V, D] and class ids labels [b_r].

    An anchor's positives are the other vectors of its class on every rank; without labels,
    the other views of its sample. reduction: "mean" over the anchors of all ranks that have a
    positive, "sum", or "none" (this rank's [b_r * V], view by view, 0 for anchors without a
    positive; x world_size with grad_mode="ddp"). grad_mode and the collective call: as in
    :func:`nt_xent_distributed`.
    """
    world, rank = _world_and_rank(group)

    def validate():
        _check_grad_mode(grad_mode)
        flat, ids, views = losses.supcon_inputs(features, labels)
        scale, norm = losses.settings(flat, temperature, reduction, normalize)
        return ((flat, ids, views, scale, norm, _fused_backend(backend, flat)),
                [flat.dtype, flat.shape[1], features.shape[0], flat.shape[0], labels is not None, 0, grad_mode])

    (flat, ids, views, scale, normalize, backend), metas = _validate_collectively(
        validate, features, group, (("temperature", temperature), ("normalize", normalize), ("reduction", reduction)),
        (features,))
    # int64 on every rank: the ids are gathered, and gloo aborts on an int32 / int64 mix
    ids = ids.long()
    if labels is None:  # sample ids, unique over the ranks
        ids = ids + sum(m[3] for m in metas[:rank])
    u, scale = prepare(scale, normalize, flat)
    per, has_positive = losses.supcon_rows(u, ids.repeat(views), scale, backend,
                                           _keys_own_first(flat.shape[0], [m[4] for m in metas], rank, group))
    count = has_positive.sum().reshape(1)
    dist.all_reduce(count, group=group)
    return _global_reduce(per, reduction, int(count), grad_mode, group, valid=has_positive)


def multiple_negatives_ranking_distributed(anchor: Tensor, positive: Tensor, negatives: Optional[Tensor] = None,
                                           *, scale: float = 20.0, directions=("query_to_doc",),
                                           partition_mode: str = "joint", hardness_mode: Optional[str] = None,
                                           hardness_strength: float = 0.0, reduction: str = "mean",
                                           grad_mode: str = "exact", group=None,
                                           backend: str = "auto") -> Tensor:
    """sentence-transformers' MNRL (:func:`fastcl.functional.multiple_negatives_ranking`) over
    the global batch, each rank passing its anchor, positive [b_r, D] and negatives (None,
    [b_r, M, D] hard negatives or a pool [P_r, D]).

    Every anchor is scored against the positives and negatives of all ranks, its target its
    own positive: one process's loss on the concatenated batch (uneven b_r allowed). The plain
    loss is :func:`info_nce_distributed` with each rank's [positives; negatives] as its keys;
    ranks may differ in M, P_r, or None there. The variants (``directions``,
    ``partition_mode``, hardness) also gather every rank's queries, block by block: the ranks
    pass the same kind of negatives, hard ones with one M, or pools (of any size; None on some
    ranks). reduction, grad_mode and the collective call: as in :func:`info_nce_distributed`.
    sentence-transformers' ``gather_across_devices=True`` has ddp's gradients for equal b_r,
    but returns each rank's local mean; this returns the global one.
    """
    _, rank = _world_and_rank(group)
    if not isinstance(directions, str) and hasattr(directions, "__iter__"):
        directions = tuple(directions)  # a generator is read once
    # The options as they act, which the ranks must agree on (a list or another order of the
    # same directions, a mode without strength: the same loss). Bad ones are raised in validate.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # validate warns, once
        try:
            acting = losses.mnrl_options(directions, partition_mode, hardness_mode, hardness_strength)
            # one direction: per_direction is joint
            acting = (acting[0], acting[1] if len(acting[0]) > 1 else "joint", *acting[2:])
        except (TypeError, ValueError):
            acting = None

    def validate():
        _check_grad_mode(grad_mode)
        opts = losses.mnrl_options(directions, partition_mode, hardness_mode, hardness_strength)
        hard, pool = losses.mnrl_inputs(anchor, positive, negatives)
        s = losses.check_mnrl_scale(scale, opts[3], anchor.dtype)
        _validation.check_reduction(reduction)
        fused = _fused_backend(backend, anchor)  # here: a backend missing on one rank fails them all
        n = anchor.shape[0] + (0 if hard is None else hard.shape[0] * hard.shape[1]) + \
            (0 if pool is None else pool.shape[0])
        return (opts, hard, pool, s, fused), [anchor.dtype, anchor.shape[1], anchor.shape[0], n, False, 0,
                                              grad_mode]

    plain = acting is None or (acting[0] == ("query_to_doc",) and not acting[3])
    # The variants gather block by block: every rank needs the same number of blocks.
    layout = None if plain else (negatives.shape[1] if isinstance(negatives, Tensor) and negatives.dim() == 3
                                 else "pool")
    named = acting or (directions, partition_mode, hardness_mode, hardness_strength)
    (opts, hard, pool, s, fused), metas = _validate_collectively(
        validate, anchor, group, (("scale", scale), ("reduction", reduction), ("directions", named[0]),
                                  ("partition_mode", named[1]), ("hardness_mode", named[2]),
                                  ("hardness_strength", named[3]),
                                  ("kind of negatives (hard [b, M, D] with one M, or pools)", layout)),
        (anchor, positive, negatives))
    sizes = [m[3] for m in metas]
    pool_sizes = [m[4] - m[3] for m in metas]  # a pool rank's candidates: b_r positives, then its pool
    # the same answer on every rank: the layout and the sizes are every rank's
    symmetric = False if plain else losses.mnrl_as_info_nce(opts, layout != "pool", sum(pool_sizes) > 0)
    if symmetric is not None:
        return info_nce_distributed(anchor, losses.mnrl_candidates(positive, hard, pool), temperature=1.0 / s,
                                    symmetric=symmetric, reduction=reduction, grad_mode=grad_mode, group=group,
                                    backend=backend)
    sc, sp = losses.mnrl_scales(s, opts[3], anchor.device, anchor.dtype)
    q, p, hard, pool = losses.mnrl_normalized(anchor, positive, hard, pool)
    if layout == "pool":  # every rank gathers the pools, one empty or not
        pool = (q.detach()[:0] if pool is None else pool) if sum(pool_sizes) else None
    # The gathered blocks (positives, hard negatives, the pool, the anchors for query_to_query)
    # need a backward on every rank where they need one on some rank (see _tied).
    # (hard and pool share the third input's bit: both are candidates)
    q, p, hard, pool = _tie_where_needed(_grad_somewhere(metas, 3), (q, p, hard, pool), (q, p, hard, pool),
                                         (0, 1, 2, 2))
    per = losses.mnrl_rows(q, p, hard, pool, sc, sp, opts, fused, _keys_own_first(q.shape[0], sizes, rank, group),
                           lambda x: _AllGatherRows.apply(x.contiguous(), pool_sizes, rank, group))
    return _global_reduce(per, reduction, sum(sizes), grad_mode, group)


# ----------------------------------------------------------------------------- group whitening
def _allsum(group):
    def allsum(t):
        t = t.contiguous().clone()
        dist.all_reduce(t, group=group)
        return t
    return allsum


@torch.compiler.disable  # collectives in an autograd.Function: run eagerly (a graph break)
def group_whiten_distributed(x: Tensor, num_groups: int, *, eps: float = 1e-5, method: str = "zca",
                             iters: Optional[int] = None, perm: Optional[Tensor] = None, ddof: int = 0,
                             detach_stats: bool = False, group=None, backend: str = "auto",
                             return_matrix: bool = False):
    """Group whitening (:func:`fastcl.functional.group_whiten`) with the statistics of the
    global batch, like SyncBatchNorm: each rank passes its x [n_r, D] (uneven n_r, 0 included)
    and gets its rows of one process's output on the concatenated batch.

    The mean and the centred Gram are all-reduced (two passes, as in one process), so every
    rank computes the same W [G, g, g]. The backward all-reduces W's and the mean's gradients:
    each rank's x gets the gradient of the sum of every rank's loss: one process's gradient
    for a global loss (grad_mode="exact"), world_size x it for DDP's scaled one (grad_mode="ddp",
    whose average over the ranks DDP takes), as the loss's own gradients are.
    Arguments as in group_whiten (perm: the same on every rank), with the backends' analytic
    backward ("torch", and the Newton-Schulz kernels of "triton" / "cuda"; not "reference").
    Every rank calls this collectively with the same arguments except x (checked), and, like
    SyncBatchNorm, every rank must run the backward too (its all-reduces): x must require grad
    on every rank or on none (checked), and a backward on some ranks only leaves the others waiting.
    """
    _world_and_rank(group)
    iters_ = whitening.DEFAULT_NS_ITERS if iters is None else iters

    def validate():
        whitening.check_input(x, num_groups, eps, ddof, method, iters, perm)
        d = _validation.check_bool(detach_stats, "detach_stats")
        r = _validation.check_bool(return_matrix, "return_matrix")
        b = whitening.resolve_backend(backend, x, method, x.shape[1] // num_groups)
        if b == "reference":
            raise _dispatch.BackendUnavailable("backend='reference' is not usable here: the distributed "
                                               "whitening runs the analytic backward ('torch', 'triton' or 'cuda')")
        return (d, r, b), [x.dtype, x.shape[1], x.shape[0], x.shape[0], False, 0, "exact"]

    try:  # outside validate(): an error here must not leave the other ranks waiting
        perm_key = perm.tolist() if isinstance(perm, Tensor) and perm.dim() == 1 else perm
    except Exception:  # e.g. a meta tensor: validate() says what is wrong with it
        perm_key = "unreadable"
    (detach, want_w, backend), metas = _validate_collectively(
        validate, x, group, (("num_groups", num_groups), ("eps", eps), ("method", method), ("iters", iters_),
                             ("ddof", ddof), ("detach_stats", detach_stats), ("perm", perm_key)), (x,))
    n = sum(m[3] for m in metas)
    whitening.check_samples(n, x.shape[1] // num_groups, eps, ddof)  # the same verdict on every rank
    with no_autocast(x.device):
        y, W = whitening._whiten(x, num_groups, eps, ddof, method, iters_, perm, detach, backend,
                                 over=(_allsum(group), n))
    return (y, W) if want_w else y


def shuffled_group_whiten_distributed(x: Tensor, num_groups: int, k: int = 3, *, generator=None, group=None,
                                      **kwargs) -> Tensor:
    """:func:`fastcl.functional.shuffled_group_whiten` with global statistics: k views [k, n_r, D]
    of this rank's x ([n_r, D], or [k, n_r, D]), each whitened by :func:`group_whiten_distributed`
    with its own channel permutation. The permutations are rank 0's (drawn from its generator
    and broadcast), so that every rank whitens the same channel groups."""
    _world_and_rank(group)
    error, views, perms = None, None, None
    try:
        views, perms = whitening.shuffled_views(x, k, generator, kwargs)
    except (ValueError, TypeError) as e:
        error = e
    _raise_together(error, x, group)
    # k and D must agree before the broadcast, whose sizes they set
    metas = _all_ints([k, x.shape[-1]], x.device, group)
    if len({tuple(m) for m in metas}) > 1:
        raise ValueError(f"every rank must pass the same k and D; per rank: {metas}")
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(perms, src=src, group=group)
    return torch.stack([group_whiten_distributed(v, num_groups, perm=p, group=group, **kwargs)
                        for v, p in zip(views, perms)])
