"""When and how setup.py builds the CUDA extension (fastcl/_build.py): FASTCL_BUILD_CUDA, the
toolkit checks, and auto mode's fall-back to a pure-Python install when the build fails."""
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def build(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", os.environ.get("CUDA_HOME", ""))  # _build sets it when unset: undone
    # loaded by path, as setup.py does (it must not import fastcl)
    spec = importlib.util.spec_from_file_location("fastcl_build", os.path.join(ROOT, "fastcl", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("value,mode", [("1", "force"), ("On", "force"), ("0", "skip"), ("no", "skip"),
                                        ("", "auto"), (None, "auto"), ("maybe", "auto")])
def test_mode(build, monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv("FASTCL_BUILD_CUDA", raising=False)
    else:
        monkeypatch.setenv("FASTCL_BUILD_CUDA", value)
    assert build.mode() == mode


def test_jobs_bounded_by_cpus(build):
    assert 1 <= build.memory_bounded_jobs() <= (os.cpu_count() or 1)


def _fake_nvcc(tmp_path, text):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"#!/bin/sh\necho '{text}'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


def test_nvcc_version(build, tmp_path):
    home = _fake_nvcc(tmp_path, "Cuda compilation tools, release 13.0, V13.0.88")
    assert build.nvcc_version(home) == (13, 0)
    assert build.nvcc_version(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("torch_cuda,nvcc,ok", [("12.1", "13.0", False), ("13.0", "13.0", True),
                                                ("12.1", "12.8", True), (None, "13.0", False)])
def test_why_not_buildable(build, monkeypatch, tmp_path, torch_cuda, nvcc, ok):
    """A CUDA torch and an nvcc of the same major version (torch refuses to build across
    majors: on a machine with nvcc 13 and torch 2.4.1+cu121 `pip install .` used to fail)."""
    import torch
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_nvcc(tmp_path, f"release {nvcc}, V{nvcc}.1"))
    reason = build.why_not_buildable()
    assert (reason is None) == ok, reason
    if torch_cuda == "12.1" and not ok:
        assert "CUDA 13.0" in reason and "CUDA 12.1" in reason and "12.x toolkit" in reason
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert build.why_not_buildable() is not None


SETUP = """
import importlib.util, sys
from setuptools import setup, Extension
from setuptools.command.build_ext import build_ext
spec = importlib.util.spec_from_file_location("fastcl_build", sys.argv.pop(1))
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
setup(name="pkg", version="0", packages=["pkg"], ext_modules=[Extension("pkg._C", ["c.c"])],
      cmdclass={"build_ext": b.best_effort(build_ext)})
"""


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler")
def test_auto_mode_leaves_a_failed_extension_out(build, tmp_path):
    """A real setuptools build of an extension that does not compile: the install goes on
    without it, and an earlier build's binary is removed rather than shipped in its place."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "setup.py").write_text(SETUP)
    (tmp_path / "c.c").write_text("#include <Python.h>\nPyMODINIT_FUNC PyInit__C(void) { return NULL; }\n")

    def build_inplace():
        return subprocess.run([sys.executable, "setup.py", os.path.join(ROOT, "fastcl", "_build.py"), "build_ext",
                               "--inplace"], cwd=tmp_path, capture_output=True, text=True, timeout=300)

    r = build_inplace()
    assert r.returncode == 0, r.stderr
    built = list((tmp_path / "pkg").glob("_C*"))
    assert built, r.stdout + r.stderr  # the good build's binary
    (tmp_path / "c.c").write_text("this is not C\n")
    # Older setuptools (65) compare whole-second mtimes: a source rewritten within the second of
    # the build would count as not newer, and nothing would be rebuilt.
    t = max(p.stat().st_mtime for p in built) + 2
    os.utime(tmp_path / "c.c", (t, t))
    r = build_inplace()
    assert r.returncode == 0, r.stderr
    assert "fastcl: WARNING: the CUDA extension fastcl._C failed to build" in r.stderr
    assert not list((tmp_path / "pkg").glob("_C*")), "the earlier build's binary is still there"


def test_forced_or_skipped(build, monkeypatch):
    import torch
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU torch
    monkeypatch.setenv("FASTCL_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="FASTCL_BUILD_CUDA=1 but the CUDA extension cannot be built: torch"):
        build.ext_modules()
    monkeypatch.setenv("FASTCL_BUILD_CUDA", "0")
    assert build.ext_modules() == ([], {})
    monkeypatch.delenv("FASTCL_BUILD_CUDA")
    assert build.ext_modules() == ([], {})


def test_auto_mode_builds_best_effort_forced_mode_fails(build, monkeypatch):
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        pytest.skip("no CUDA toolkit: CUDAExtension needs its include paths")
    monkeypatch.setattr(build, "why_not_buildable", lambda: None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")  # ext_modules sets defaults for these
    monkeypatch.setenv("MAX_JOBS", "1")
    monkeypatch.delenv("FASTCL_BUILD_CUDA", raising=False)
    exts, cmd = build.ext_modules()
    assert [e.name for e in exts] == ["fastcl._C"]
    assert issubclass(cmd["build_ext"], cpp_extension.BuildExtension)
    assert cmd["build_ext"] is not cpp_extension.BuildExtension
    monkeypatch.setenv("FASTCL_BUILD_CUDA", "1")
    assert build.ext_modules()[1]["build_ext"] is cpp_extension.BuildExtension


def test_license_metadata_without_a_deprecation(tmp_path):
    """The license reaches the wheel's metadata in the form the building setuptools takes, and
    no deprecation is warned about it (pyproject's table form is deprecated from setuptools 77 and
    unsupported after 2027-02-18)."""
    code = "import setuptools.build_meta as b, sys; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-W", "always", "-c", code, str(tmp_path)], cwd=ROOT,
                       env=dict(os.environ, FASTCL_BUILD_CUDA="0"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = (tmp_path / r.stdout.split()[-1] / "METADATA").read_text()
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", meta, re.M), meta
    assert re.search(r"^License-File: LICENSE$", meta, re.M), meta
    warned = [line for line in r.stderr.splitlines() if "Deprecat" in line]
    assert not [line for line in warned if "license" in line.lower()], r.stderr
