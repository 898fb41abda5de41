"""fastcl benchmark suite: ``python -m benchmarks`` (see README)."""
