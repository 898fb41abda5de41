"""When and how setup.py builds the CUDA extension (fastcl/_build.py): FASTCL_BUILD_CUDA, the
toolkit checks, and auto mode's fall-back to a pure-Python install when the build fails."""
import importlib.util
import os
import stat

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def build():
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


def test_auto_mode_leaves_a_failed_extension_out(build, capsys):
    class Distribution:
        ext_modules = ["fastcl._C"]

    class Failing:  # stands in for torch's BuildExtension
        def __init__(self):
            self.extensions, self.distribution = ["fastcl._C"], Distribution()

        def build_extensions(self):
            raise RuntimeError("Error compiling objects for extension")

    cmd = build.best_effort(Failing)()
    cmd.build_extensions()
    assert cmd.extensions == [] and cmd.distribution.ext_modules == []
    err = capsys.readouterr().err
    assert "failed to build (RuntimeError: Error compiling objects" in err and "FASTCL_BUILD_CUDA=1" in err


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
