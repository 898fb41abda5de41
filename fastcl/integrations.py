"""Drop-in losses for other libraries' training loops."""
import torch
from torch import nn

from . import _validation, losses
from .nn import _mnrl_call

__all__ = ["MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss"]


def _is_cosine(fn) -> bool:
    """Whether fn(a [n, d], b [m, d]) is the [n, m] cosine-similarity matrix, asked of its values
    (a name can lie: a dot product named cos_sim, or cosine under another name)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), 4 * torch.randn(4, 5, generator=g)
    try:
        got = fn(a, b)
    except Exception:  # e.g. a function of other arguments: not cosine as this loss needs it
        return False
    want = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and torch.allclose(got.detach().float(), want, atol=1e-2))  # a 16-bit cosine passes


class MultipleNegativesRankingLoss(nn.Module):
    """Fused drop-in for ``sentence_transformers.losses.MultipleNegativesRankingLoss``.

    Same constructor and forward as sentence-transformers' loss, so it plugs into
    ``SentenceTransformerTrainer``; ``similarity_fct`` must be cosine (the default).
    ``forward(sentence_features, labels)`` embeds each column (anchor, positive, negative_1,
    ...) with ``model(features)["sentence_embedding"]``. It then scores every anchor against all
    positives and negatives of the batch (cosine x scale) without building the [B, B*(1+k)]
    score matrix. ``directions``, ``partition_mode``, ``hardness_mode`` and
    ``hardness_strength`` select sentence-transformers' variants (see
    :func:`fastcl.functional.multiple_negatives_ranking`); row i of each negative column is
    anchor i's own hard negative, as there. ``gather_across_devices=True`` takes the candidates
    of every rank, as in :class:`fastcl.nn.MultipleNegativesRankingLoss` (the global loss as
    the value; gradients as sentence-transformers' under DDP).
    """

    def __init__(self, model, scale: float = 20.0, similarity_fct=None, gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode: str = "joint", hardness_mode=None,
                 hardness_strength: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        if similarity_fct is not None and not _is_cosine(similarity_fct):
            raise NotImplementedError(f"only cosine similarity (the default, util.cos_sim) is fused; "
                                      f"similarity_fct={similarity_fct!r} is not cosine")
        self.model, self.backend = model, backend
        self.gather_across_devices = _validation.check_bool(gather_across_devices, "gather_across_devices")
        self.directions, self.partition_mode, _, alpha = losses.mnrl_options(
            directions, partition_mode, hardness_mode, hardness_strength)
        self.scale = losses.check_mnrl_scale(scale, alpha)
        self.hardness_mode, self.hardness_strength = hardness_mode, hardness_strength  # as given

    def forward(self, sentence_features, labels=None):
        reps = [self.model(f)["sentence_embedding"] for f in sentence_features]
        if len(reps) < 2:
            raise ValueError("need at least (anchor, positive) columns")
        anchor, positive, *negatives = reps
        # [B, M, D]: negative column m's row i is anchor i's own (doc_to_doc and the hardness
        # modes tell them from the other anchors' documents)
        neg = torch.stack(negatives, dim=1) if negatives else None
        return _mnrl_call(self, anchor, positive, neg)

    def get_config_dict(self):
        return {"scale": self.scale, "similarity_fct": "cos_sim",
                "gather_across_devices": self.gather_across_devices, "directions": self.directions,
                "partition_mode": self.partition_mode, "hardness_mode": self.hardness_mode,
                "hardness_strength": self.hardness_strength}


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """Fused drop-in for sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``:
    :class:`MultipleNegativesRankingLoss` with ``directions=("query_to_doc", "doc_to_query")``
    and ``partition_mode="per_direction"``, as sentence-transformers defines it."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=None, gather_across_devices: bool = False,
                 *, backend: str = "auto"):
        super().__init__(model, scale, similarity_fct, gather_across_devices,
                         directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                         backend=backend)
