"""Benchmarks for infscaled; run them all with `python -m benchmarks.run_all` (see BENCHMARKS.md)."""
