"""Functional API: ``import fastcl.functional as FCL; FCL.info_nce(q, k, temperature=0.07)``."""
from .info_nce import info_nce

__all__ = ["info_nce"]
