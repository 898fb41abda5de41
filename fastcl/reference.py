"""Naive, materialised reference implementations: the test oracle (use float64 inputs).

Written independently of the fused path (plain logits + F.cross_entropy) so that the tests
compare two different computations, not one with itself.
"""
import torch
import torch.nn.functional as F

from ._common import reduce


def info_nce_reference(q, k, *, temperature=None, logit_scale=None, labels=None, symmetric=False,
                       normalize=True, reduction="mean", label_smoothing=0.0):
    """InfoNCE on the full [B, N] logits matrix; differentiable through torch autograd."""
    if normalize:
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
    if logit_scale is not None:
        scale = logit_scale.reshape(()).exp().to(q.dtype)
    else:
        scale = 1.0 / float(0.07 if temperature is None else temperature)  # not a NumPy float16's 1/t
    logits = scale * (q @ k.T)
    B = q.shape[0]
    labels = torch.arange(B, device=q.device) if labels is None else labels.long()
    ls = label_smoothing
    if not symmetric:
        return F.cross_entropy(logits, labels, reduction=reduction, label_smoothing=ls)
    per = 0.5 * (F.cross_entropy(logits, labels, reduction="none", label_smoothing=ls)
                 + F.cross_entropy(logits.T, labels, reduction="none", label_smoothing=ls))
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]


def _off_diagonal(logits):
    eye = torch.eye(logits.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill(eye, float("-inf")), eye


def nt_xent_reference(z1, z2, *, temperature=0.5, normalize=True, reduction="mean"):
    """SimCLR NT-Xent over the 2N views: each view's negatives are the 2N-2 others."""
    z = torch.cat([z1, z2])
    if normalize:
        z = F.normalize(z, dim=-1)
    logits, _ = _off_diagonal(z @ z.T / temperature)
    n = z1.shape[0]
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner, reduction=reduction)


def vmf_weights(u1, u2, sigma=0.5):
    """DCLW's negative von Mises-Fisher weights w_i = 2 - N softmax(<u1_i, u2_i> / sigma)_i."""
    return vmf_weights_of((u1 * u2).sum(-1), sigma)


def vmf_weights_of(similarity, sigma=0.5):
    """vmf_weights from the pairs' similarities <u1_i, u2_i> [N]."""
    return 2 - similarity.shape[0] * torch.softmax(similarity / sigma, dim=0)


def dcl_reference(z1, z2, *, temperature=0.1, weight=None, negatives="joint", normalize=True,
                  reduction="mean"):
    """DCL with positive weights `weight` ([N] for both views, [2N] per anchor, None: 1).
    'joint': one log-sum-exp over the 2N-2 negatives (the paper); 'split': within-view plus
    cross-view log-sum-exps (lightly)."""
    if normalize:
        z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    n = z1.shape[0]
    w = torch.ones(n, dtype=z1.dtype, device=z1.device) if weight is None else weight
    w = w.repeat(2) if w.shape[0] == n else w
    per = []
    for (a, b), w in zip(((z1, z2), (z2, z1)), (w[:n], w[n:])):
        pos = (a * b).sum(-1) / temperature
        same, _ = _off_diagonal(a @ a.T / temperature)
        cross, _ = _off_diagonal(a @ b.T / temperature)
        if negatives == "joint":
            neg = torch.logsumexp(torch.cat([same, cross], dim=1), dim=1)
        else:
            neg = torch.logsumexp(same, dim=1) + torch.logsumexp(cross, dim=1)
        per.append(neg - w * pos)
    return reduce(torch.cat(per), reduction)


def supcon_reference(features, labels, *, temperature=0.1, normalize=True, reduction="mean"):
    """SupCon (Khosla et al.) on [M, D] features with class ids [M]; anchors without a
    positive are left out of the mean."""
    if normalize:
        features = F.normalize(features, dim=-1)
    logits, eye = _off_diagonal(features @ features.T / temperature)
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    cnt = positive.sum(1)
    per = -torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / cnt.clamp_min(1)
    return reduce(per, reduction, cnt > 0)


def mnrl_reference(anchor, positive, negatives=None, *, scale=20.0, directions=("query_to_doc",),
                   partition_mode="joint", hardness_mode=None, hardness_strength=0.0, reduction="mean"):
    """sentence-transformers' MNRL with its variants on materialised score matrices.
    negatives: None, hard negatives [B, M, D] (row i anchor i's own) or a pool [P, D] (nobody's)."""
    q, p = F.normalize(anchor, dim=-1), F.normalize(positive, dim=-1)
    B = q.shape[0]
    docs, owner = [p], [torch.arange(B)]
    if negatives is not None and negatives.dim() == 3:
        for m in range(negatives.shape[1]):
            docs.append(F.normalize(negatives[:, m], dim=-1))
            owner.append(torch.arange(B))
    elif negatives is not None:
        docs.append(F.normalize(negatives, dim=-1))
        owner.append(torch.full((negatives.shape[0],), -1))
    is_pos = torch.cat([torch.arange(B) if k == 0 else torch.full_like(o, -1) for k, o in enumerate(owner)])
    docs, owner = torch.cat(docs), torch.cat(owner)
    rows = torch.arange(B)[:, None]
    own = (owner[None, :] == rows).to(q.device)  # [B, n_docs]: anchor i's own documents
    positive_col = (is_pos[None, :] == rows).to(q.device)
    cos_qd = q @ docs.T
    penalty = {None: torch.zeros_like(own), "in_batch_negatives": ~own,
               "hard_negatives": own & ~positive_col, "all_negatives": ~positive_col}[hardness_mode]
    if hardness_strength == 0.0:
        penalty = torch.zeros_like(own)
    scores = {"query_to_doc": scale * cos_qd + hardness_strength * torch.where(penalty, cos_qd.detach(), 0.0)}
    eye = torch.eye(B, dtype=torch.bool, device=q.device)
    if "query_to_query" in directions:
        scores["query_to_query"] = (scale * q @ q.T).masked_fill(eye, float("-inf"))
    if "doc_to_query" in directions:
        scores["doc_to_query"] = scale * p @ q.T
    if "doc_to_doc" in directions:
        scores["doc_to_doc"] = (scale * p @ docs.T).masked_fill(own, float("-inf"))
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(scores.values()), dim=1), dim=1)
    else:
        log_z = sum(torch.logsumexp(v, dim=1) for v in scores.values()) / len(scores)
    per = log_z - scores["query_to_doc"].gather(1, rows.to(q.device))[:, 0]  # column i: p_i
    return reduce(per, reduction)
