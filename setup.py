"""Everything but the optional CUDA extension is declared in pyproject.toml; see fastcl/_build.py
for when and how fastcl._C is built (FASTCL_BUILD_CUDA, TORCH_CUDA_ARCH_LIST, MAX_JOBS)."""
import importlib.util
import os

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "fastcl_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastcl", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

ext_modules, cmdclass = _build.ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
