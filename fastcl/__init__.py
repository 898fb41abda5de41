"""fastcl: fused, memory-bounded contrastive losses for PyTorch."""
import os as _os

# Installed, kernels/ is the subpackage fastcl.kernels. In a plain source checkout on
# sys.path (no install) it sits beside this folder: let the import system find it there.
_here = _os.path.dirname(__file__)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_here, _os.pardir, "kernels", "info_nce.py")):
    __path__.append(_os.path.join(_here, _os.pardir))  # noqa: F821 (package __path__)
from . import functional, nn
from ._dispatch import BackendUnavailable, available_backends
from .reference import info_nce_reference

__version__ = "0.1.0"
__all__ = ["functional", "nn", "BackendUnavailable", "available_backends", "info_nce_reference",
           "__version__"]
