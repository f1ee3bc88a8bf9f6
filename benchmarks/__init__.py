"""Benchmarks for cowstore: micro-benchmarks (pytest-benchmark) and the side-by-side against qemu.

`make bench` runs them all; results land in `benchmarks/results/`. They measure and
print; they never assert a time.
"""
