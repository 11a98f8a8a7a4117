"""Benchmarks and table-reproduction scripts (run with python -m scripts.NAME)."""
