"""CI's plumbing: .ci/run runs the README's test command, and the disk check that guards the
multi-GB installs (scripts/pip_lib.sh) refuses with its numbers instead of dying half-way."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    return open(os.path.join(ROOT, *parts), encoding="utf-8").read()


def test_ci_runs_the_readme_test_command():
    quick = re.search(r"## Quick start.*?```\w*\n(.*?)```", _read("README.md"), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in quick.splitlines() if line.strip()]
    assert len(commands) == 2, commands             # the main job and the tests, nothing else
    test_cmd = next(c for c in commands if "test" in c)
    ci = [line.strip() for line in _read(".ci", "run").splitlines()]
    assert any(line.endswith(test_cmd) and not line.startswith("#") for line in ci), (test_cmd, ci)


def test_every_big_install_checks_the_disk_first():
    for script in ("build_cuda.sh", "test_min_torch.sh"):
        text = _read("scripts", script)
        assert ". scripts/pip_lib.sh" in text and "need_disk" in text, script
        assert 'P="$VENV/bin/python -m pip' not in text, script    # no pip line of its own
    assert "--no-cache-dir" in _read("scripts", "pip_lib.sh")          # no second copy in a cache


@pytest.mark.parametrize("gb, ok", [(0, True), (1 << 30, False)])
def test_need_disk(tmp_path, gb, ok):
    cmd = f'VENV="{tmp_path}"; . scripts/pip_lib.sh; need_disk {gb} "a test install"'
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True)
    assert (r.returncode == 0) == ok, r.stderr
    if not ok:
        assert "not enough disk for a test install" in r.stderr and "MiB free in" in r.stderr
