"""The offline digits demo runs end to end (tiny size here; the full run is in the README)."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
def test_digits_demo_smoke(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import digits_demo
    finally:
        sys.path.pop(0)
    rows = digits_demo.main(["--steps", "3", "--batch-size", "64", "--out", str(tmp_path / "plot.png")])
    assert [r[0].split(" ")[0] for r in rows] == ["untrained", "info_nce", "dcl", "dclw"]
    assert all(0.0 <= r[1] <= 1.0 and 0.0 <= r[2] <= 1.0 for r in rows)
