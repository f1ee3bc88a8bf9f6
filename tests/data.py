"""Test data: reproducible pseudo-random bytes, so a test (or a harness's parent process) can
make the same bytes again from a seed instead of keeping them."""

from __future__ import annotations

import random


def pattern(n: int, seed: int) -> bytes:
    """`n` pseudo-random bytes from `seed`; a shorter pattern is a prefix of a longer one."""
    return random.Random(seed).randbytes(n + -n % 4)[:n]
