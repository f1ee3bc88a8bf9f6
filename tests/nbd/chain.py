"""The snapshot chain the NBD tests serve, with a model of the bytes each snapshot holds."""

from __future__ import annotations

import cowstore
from tests.data import pattern

CHUNK = 64 * 1024


class Chain:
    """base (data in chunks 0-1) <- mid (chunk 2) <- top, active (chunk 4); and midview, a view of mid.

    `model` maps each snapshot key to the bytes it reads as; `view` adds more views.
    """

    def __init__(self, store: cowstore.Store, size: int) -> None:
        self.store = store
        v = store.prepare("b", size=size)
        v.pwrite(pattern(2 * CHUNK, 1), 0)
        v.close()
        store.commit("base", "b")
        v = store.prepare("m", "base")
        v.pwrite(pattern(CHUNK, 2), 2 * CHUNK)
        v.close()
        store.commit("mid", "m")
        store.prepare("top", "mid").pwrite(pattern(CHUNK, 3), 4 * CHUNK)
        base = bytearray(size)
        base[: 2 * CHUNK] = pattern(2 * CHUNK, 1)
        mid = bytearray(base)
        mid[2 * CHUNK : 3 * CHUNK] = pattern(CHUNK, 2)
        top = bytearray(mid)
        top[4 * CHUNK : 5 * CHUNK] = pattern(CHUNK, 3)
        self.model = {"base": base, "mid": mid, "top": top}
        self.view("midview", "mid")

    def view(self, key: str, parent: str) -> None:
        """A view `key` of the committed snapshot `parent`."""
        self.store.view(key, parent)
        self.model[key] = bytearray(self.model[parent])

    def content(self, key: str) -> bytes:
        """What snapshot `key` reads as now."""
        volume = self.store.mounts(key)
        try:
            return volume.pread(volume.size, 0)
        finally:
            volume.close()
