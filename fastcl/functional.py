"""Functional API: ``import fastcl.functional as FCL; FCL.info_nce(q, k, temperature=0.07)``."""
from .info_nce import info_nce
from .losses import dcl, dcl_weights, multiple_negatives_ranking, nt_xent, supcon
from .whitening import group_whiten, shuffled_group_whiten

__all__ = ["info_nce", "nt_xent", "dcl", "dcl_weights", "supcon", "multiple_negatives_ranking",
           "group_whiten", "shuffled_group_whiten"]
