"""Benchmarks of pbt-server against ready-made process pools (run ``scripts/bench.py``)."""
