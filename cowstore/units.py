"""Byte sizes as people write them: "64K", "1.5GiB" in (`parse_size`), "64 KiB" out (`format_size`).

Every suffix is a binary multiple, as in qemu-img, so "64K", "64KiB" and "64KB" are all 65536.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

KiB, MiB, GiB, TiB, PiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50

_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": PiB}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(i?b)?|(b))?", re.IGNORECASE)
_NAMES = ((PiB, "PiB"), (TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB"))


def parse_size(text: str) -> int:
    """Bytes from "4096", "64K", "1.5GiB", "10G"...; ValueError for anything else."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r}: use bytes or a suffix K, M, G, T or P (also KiB, MB...)")
    unit = _UNITS[(m.group(2) or "").lower()]
    try:
        value = Decimal(m.group(1)) * unit
    except InvalidOperation:
        raise ValueError(f"invalid size {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """A byte count for people: "0 B", "512 B", "64 KiB", "1.5 GiB"."""
    for unit, name in _NAMES:
        if n >= unit:
            value = n / unit
            text = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
            return f"{text} {name}"
    return f"{n} B"
