"""cowstore: a copy-on-write, block-level storage engine for container images and containers.

A store holds a pool of fixed-size chunks shared between snapshots (containerd's active,
committed and view kinds); every snapshot is a virtual block device, handed out as a
`Volume`. See README.md for the tour.
"""

from __future__ import annotations

from . import errors
from .engines import DEFAULT as engine
from .errors import Error
from .layout import memory, open
from .store import Store
from .types import Extent, Info, Kind, Usage
from .volume import Volume, VolumeFile

__version__ = "0.1.0"

__all__ = [
    "Error",
    "Extent",
    "Info",
    "Kind",
    "Store",
    "Usage",
    "Volume",
    "VolumeFile",
    "engine",
    "errors",
    "memory",
    "open",
]
