"""The on-disk format of a store's maps, described once: both engines, `check` and tools use it.

A map is split into pages of `page_entries` entries. A stored page is `page_entries`
little-endian uint32 entries followed by as many little-endian uint32 sums. An entry is a
slot number (0: unallocated, reads as zeros; else the chunk at `(slot - 1) * chunk_size` in
the data file), possibly flagged `PARTIAL`. A sum is the chunk's `chunk_sum` (0: not
computed yet); in a partial entry it is the bitmap of the sub-blocks present instead. A map
directory is little-endian uint64 page ids, one per page (0: no page, every entry
unallocated). The C engine mirrors these values in one enum (`ext/core/format.pxi`).
"""

from __future__ import annotations

import sys
import zlib
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

PARTIAL = 1 << 31
"""Flag in a page entry: the chunk is partial (see `SUB_BLOCKS`)."""
MAX_SLOT = PARTIAL - 1
"""The largest slot number; also the mask that takes the slot out of an entry."""
SUB_BLOCKS = 32
"""A copy on write into a chunk that the parent map holds writes only the sub-blocks (1/32 of
a chunk) the write touches, as qcow2's subclusters do: the entry is flagged PARTIAL, its sum
field holds the bitmap of the sub-blocks present, and the others read through the parent.
`seal` fills them in, so committed maps hold whole chunks with sums."""
FULL_BITS = (1 << SUB_BLOCKS) - 1
"""The sub-block bitmap of a chunk that has every sub-block."""


class Changes(NamedTuple):
    """What changed since the last `take_changes`: to be made durable, then `release`d.

    `refcounts`, when asked for, are the slot refcounts at the same moment (little-endian
    uint32, index 0 unused): what the maps being made durable reference, for `check`."""

    pages: list[tuple[int, bytes]]
    dead_pages: list[int]
    maps: list[tuple[int, bytes]]
    freed: list[int]
    refcounts: bytes | None = None


def chunk_sum(data: ReadableBuffer) -> int:
    """The checksum kept for a chunk: CRC-32, with 0 (meaning "none yet") kept as 1."""
    return zlib.crc32(data) or 1


def to_le(a: array) -> bytes:
    """An array's items as little-endian bytes."""
    if sys.byteorder == "little":
        return a.tobytes()
    b = array(a.typecode, a)
    b.byteswap()
    return b.tobytes()


def from_le(typecode: str, blob: bytes) -> array:
    """Little-endian bytes as an array of `typecode` items."""
    a = array(typecode)
    a.frombytes(blob)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def page_size(page_entries: int) -> int:
    """Bytes in a stored page."""
    return 8 * page_entries


def encode_page(entries: array, sums: array) -> bytes:
    """A stored page from its entries and sums (uint32 arrays of `page_entries` items)."""
    return to_le(entries) + to_le(sums)


def decode_page(blob: bytes, page_entries: int) -> tuple[array, array]:
    """A stored page's entries and sums; ValueError if it has the wrong size."""
    if len(blob) != page_size(page_entries):
        raise ValueError(f"page has {len(blob)} bytes, expected {page_size(page_entries)}")
    half = 4 * page_entries
    return from_le("I", blob[:half]), from_le("I", blob[half:])


def encode_directory(page_ids: Iterable[int]) -> bytes:
    """A stored map directory from its page ids (0: no page)."""
    return to_le(array("Q", page_ids))


def decode_directory(blob: bytes) -> array:
    """A stored map directory's page ids."""
    return from_le("Q", blob)


def directory_pages(nchunks: int, page_entries: int) -> int:
    """Pages in the directory of a map of `nchunks` chunks."""
    return -(-nchunks // page_entries)
