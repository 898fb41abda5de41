"""fastcl: fused, memory-bounded contrastive losses for PyTorch."""
import os as _os
import sys as _sys

# Installed, kernels/ is the subpackage fastcl.kernels. In a source checkout (on sys.path, or
# installed editable) it sits beside this folder: load that folder, and only it, as
# fastcl.kernels. (Appending the checkout's root to __path__ made every top-level folder a
# fastcl submodule: `import fastcl.setup` ran setup.py.)
_here = _os.path.dirname(__file__)
_kernels = _os.path.join(_here, _os.pardir, "kernels")
if "fastcl.kernels" not in _sys.modules and not _os.path.isdir(_os.path.join(_here, "kernels")) \
        and _os.path.isfile(_os.path.join(_kernels, "info_nce.py")):
    import importlib.util as _ilu
    _spec = _ilu.spec_from_file_location("fastcl.kernels", _os.path.join(_kernels, "__init__.py"),
                                         submodule_search_locations=[_os.path.abspath(_kernels)])
    kernels = _ilu.module_from_spec(_spec)
    _sys.modules["fastcl.kernels"] = kernels
    _spec.loader.exec_module(kernels)
from . import functional, nn
from ._dispatch import BackendUnavailable, available_backends
from .reference import info_nce_reference

__version__ = "0.1.0"
__all__ = ["functional", "nn", "BackendUnavailable", "available_backends", "info_nce_reference",
           "__version__"]
