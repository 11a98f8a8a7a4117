"""Benchmarks and table-reproduction scripts (run with python -m scripts.NAME)."""

import experiments  # noqa: F401  (TensorFlow's console environment, set before it loads)
