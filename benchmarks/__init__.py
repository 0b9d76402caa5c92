"""Benchmarks of pbt-server against ready-made process pools (run ``scripts/bench.py``).

The figures are records in ``figures.py``; README.md says how to add one.
"""
