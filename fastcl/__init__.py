"""fastcl: fused, memory-bounded contrastive losses for PyTorch."""
from . import functional, nn
from ._dispatch import BackendUnavailable, available_backends
from .reference import info_nce_reference

__version__ = "0.1.0"
__all__ = ["functional", "nn", "BackendUnavailable", "available_backends", "info_nce_reference",
           "__version__"]
