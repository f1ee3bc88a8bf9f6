"""Plain value types shared by the store, the engines and the tools."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Kind(str, enum.Enum):
    """A snapshot's kind, as in containerd; the value is the string used in walk filters."""

    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Info:
    """What `stat` and `walk` report of one snapshot."""

    name: str
    kind: Kind
    parent: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None
    size: int = 0


@dataclass(frozen=True)
class Usage:
    """Space a snapshot holds that its parent does not: its exclusive chunks."""

    size: int
    chunks: int


@dataclass(frozen=True)
class Extent:
    """A run of bytes with one allocation state, as `qemu-img map` reports them.

    `depth` is the layer that supplies the bytes: 0 none (reads as zeros), 1 this
    snapshot, 2 its parent, and so on (qemu's allocation-depth).
    """

    offset: int
    length: int
    allocated: bool
    zero: bool
    depth: int


@dataclass(frozen=True)
class Stats:
    """Pool totals of a store (`Store.stats`)."""

    chunk_size: int
    slots: int
    used: int
    free: int
    pending: int
    disk_bytes: int
    logical_bytes: int
    snapshots: int
    max_bytes: int | None

    @property
    def sharing_ratio(self) -> float:
        """Bytes the snapshots see, over bytes the pool holds for them (1.0: nothing shared)."""
        held = self.used * self.chunk_size
        return self.logical_bytes / held if held else 0.0
