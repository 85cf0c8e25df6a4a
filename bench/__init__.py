"""Benchmarks of batchd against minimal direct-SDK / direct-SQLite baselines.

`python -m bench.run` (full, minutes) or `python -m bench.run --quick` (scaled down, under a minute).
Each benchmark runs batchd's real code path and a baseline in the same command, interleaved round by
round, each side in its own process so that peak RSS and CPU are attributable, and reports medians.
"""
