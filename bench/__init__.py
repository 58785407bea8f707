"""Benchmarks: `python -m bench` (`make bench`) runs them all; each is also `python -m bench.NAME`."""
