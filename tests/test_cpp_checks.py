"""The C++ input-check messages (csrc/check.h), compiled with g++ against this torch's headers.

They are built without std::ostream because, with the GPU image's toolchain, an ostream in the
extension segfaulted formatting an integer (benchmarks/RESULTS.md). This checks that every kind of
value the launchers put in a message comes out as intended, on any machine with g++.
"""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_check_messages(tmp_path):
    from torch.utils import cpp_extension
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if shutil.which("g++") is None or not os.path.exists(os.path.join(lib, "libc10.so")):
        pytest.skip("needs g++ and torch's C++ headers and libraries")
    out = str(tmp_path / "check_messages")
    incs = [f"-I{p}" for p in cpp_extension.include_paths()]
    r = subprocess.run(["g++", "-std=c++20", "-O1", *incs, os.path.join(ROOT, "csrc", "emulate", "check_messages.cpp"),
                        "-o", out, f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = subprocess.run([out], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["u is [3, 5], shape [3, 5] on cpu, Float, 123456 bytes, H100 is 9.0, cuda:1, eps 0.250000 end",
                     "n must be 8, got 7 for [3, 5]",
                     "passing check: no throw"]
