"""Everything but the optional CUDA extension and the license is declared in pyproject.toml; see
fastcl/_build.py for when and how fastcl._C is built (FASTCL_BUILD_CUDA, TORCH_CUDA_ARCH_LIST,
MAX_JOBS)."""
import importlib.util
import os

import setuptools
from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "fastcl_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastcl", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

ext_modules, cmdclass = _build.ext_modules()
# pyproject's license table is deprecated from setuptools 77 (unsupported after 2027-02-18) and its
# SPDX string is refused before 77; builds use both (a GPU image's own setuptools builds in place).
if int(setuptools.__version__.split(".")[0]) >= 77:
    license_ = {"license_expression": "Apache-2.0"}
else:
    license_ = {"license": "Apache-2.0"}
setup(ext_modules=ext_modules, cmdclass=cmdclass, **license_)
