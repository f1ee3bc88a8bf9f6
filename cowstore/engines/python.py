"""The pure-Python engine: the readable reference for the Cython one (`ext/`), and its fallback.

The engine owns the chunk pool (one data file, addressed by slot) and every map. A map is
resolved (it names every chunk visible in its snapshot, own and inherited) and split into
pages of `page_entries` slot numbers. Pages are shared between maps and refcounted; a
write into a shared page copies the page first. Slot refcounts count (page, entry)
references, so they are derived state, rebuilt by `finish_load`.

Every entry carries the CRC-32 of its chunk beside the slot number (as a ZFS block
pointer carries its block's checksum): `seal` computes the missing ones when a snapshot is
committed, a write that changes a chunk clears its sum, and with `set_verify(True)` every
read of a chunk with a sum checks it. A sum of 0 means "not computed"; a real CRC of 0 is
kept as 1.

A map may have a parent (`clone_map(..., child=True)`): a copy on write into a chunk whose
entry is still the parent's writes only the sub-blocks it touches, and the entry, flagged
PARTIAL, reads the others through the parent (see `SUB_BLOCKS`). A parent therefore cannot
change or be dropped while it has children. A child may be larger than its parent
(`grow_map`): past the parent's end the parent supplies zeros, and entries past a map's end
compare as unallocated.

Both engines have this exact interface and read and write the same bytes: a page is
`page_entries` little-endian uint32 slots followed by as many uint32 sums; a map directory
is little-endian uint64 page ids (0 = no page: every entry unallocated). Policy (names,
kinds, SQLite, errors) lives in the store.
"""

from __future__ import annotations

import errno
import os
import threading
import typing
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from .. import fallocate as _fs
from ..errors import Closed, Corruption, InvalidArgument, NoSpace, NotFound, ReadOnly
from .format import FULL_BITS as _FULL_BITS
from .format import MAX_SLOT, PARTIAL, SUB_BLOCKS, Changes, chunk_sum
from .format import from_le as _from_le
from .format import to_le as _to_le

if typing.TYPE_CHECKING:  # a plain name would join the engine's public names
    from _typeshed import ReadableBuffer, WriteableBuffer

_PREALLOC_MIN = 1 << 20


class _Page:
    __slots__ = ("entries", "id", "refs", "sums")

    def __init__(self, page_id: int, entries: array, sums: array) -> None:
        self.id = page_id
        self.refs = 0
        self.entries = entries
        self.sums = sums


class _Map:
    __slots__ = ("children", "id", "nchunks", "pages", "parent")

    def __init__(self, map_id: int, nchunks: int, pages: list[_Page | None], parent: _Map | None) -> None:
        self.id = map_id
        self.nchunks = nchunks
        self.pages = pages
        self.parent = parent
        self.children = 0
        if parent is not None:
            parent.children += 1


class Engine:
    """Chunk pool and maps of one store. Thread-safe: one lock guards everything."""

    def __init__(self, fd: int, chunk_size: int, page_entries: int) -> None:
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError("chunk_size must be a power of two")
        if page_entries <= 0:
            raise ValueError("page_entries must be positive")
        self._fd = fd
        self._cs = chunk_size
        self._pe = page_entries
        self._zeros = bytes(chunk_size)
        self._sub = chunk_size // SUB_BLOCKS if chunk_size >= SUB_BLOCKS else 0
        self._links: dict[int, int] = {}
        self._verify = False
        self._lock = threading.RLock()
        self._maps: dict[int, _Map] = {}
        self._loaded: dict[int, _Page] = {}
        self._refs = array("I", [0])
        self._nslots = 0
        self._max_slots = MAX_SLOT
        self._prealloc_step = 0
        self._prealloc_end = 0
        self._free: list[int] = []
        self._pending: list[int] = []
        self._next_page_id = 1
        self._dirty_pages: dict[int, _Page] = {}
        self._dirty_maps: set[int] = set()
        self._dead_pages: list[int] = []
        self._finished = False
        self._closed = False
        self._writes = 0

    @property
    def chunk_size(self) -> int:
        return self._cs

    @property
    def page_entries(self) -> int:
        return self._pe

    @property
    def writes(self) -> int:
        """Data writes so far: unchanged since a flush began, there is no data to sync."""
        return self._writes

    # -- loading -------------------------------------------------------------

    def load_page(self, page_id: int, blob: bytes) -> None:
        """Register a stored page; only valid before `finish_load`."""
        self._check_loading()
        if len(blob) != 8 * self._pe:
            raise ValueError(f"page {page_id} has {len(blob)} bytes, expected {8 * self._pe}")
        if page_id <= 0 or page_id in self._loaded:
            raise ValueError(f"page id {page_id} is invalid or repeated")
        half = 4 * self._pe
        self._loaded[page_id] = _Page(page_id, _from_le("I", blob[:half]), _from_le("I", blob[half:]))
        self._next_page_id = max(self._next_page_id, page_id + 1)

    def load_map(self, map_id: int, nchunks: int, directory: bytes, parent_id: int | None = None) -> None:
        """Register a stored map whose pages were loaded with `load_page`; `parent_id` is the
        map its partial chunks read through (linked by `finish_load`)."""
        self._check_loading()
        ids = _from_le("Q", directory)
        if len(ids) != self._npages(nchunks):
            raise ValueError(f"map {map_id} directory has {len(ids)} pages, expected {self._npages(nchunks)}")
        if map_id in self._maps:
            raise ValueError(f"map {map_id} is loaded twice")
        missing = [i for i in ids if i and i not in self._loaded]
        if missing:
            raise ValueError(f"map {map_id} names page {missing[0]}, which does not exist")
        pages = [self._loaded[i] if i else None for i in ids]
        for page in pages:
            if page is not None:
                page.refs += 1
        self._maps[map_id] = _Map(map_id, nchunks, pages, None)
        if parent_id is not None:
            self._links[map_id] = parent_id

    def finish_load(self, nslots: int) -> None:
        """Derive slot refcounts from the loaded pages; unreferenced pages become dead."""
        self._check_loading()
        if not 0 <= nslots <= self._max_slots:
            raise ValueError(f"pool of {nslots} slots is invalid or exceeds the limit")
        for map_id, parent_id in self._links.items():
            m, parent = self._maps[map_id], self._maps.get(parent_id)
            if parent is None or parent.nchunks > m.nchunks:
                raise ValueError(f"map {map_id} names parent {parent_id}: missing or larger")
            m.parent = parent
            parent.children += 1
        for m in self._maps.values():
            up, steps = m.parent, 0
            while up is not None:
                steps += 1
                if up is m or steps > len(self._maps):
                    raise ValueError(f"map {m.id} is its own ancestor")
                up = up.parent
        refs = array("I", bytes(4 * (nslots + 1)))
        for page in self._loaded.values():
            for entry in page.entries if page.refs else ():
                slot = entry & MAX_SLOT
                if slot:
                    if slot > nslots:
                        raise ValueError(f"page {page.id} names slot {slot}, beyond the pool of {nslots}")
                    refs[slot] += 1
        self._dead_pages.extend(p.id for p in self._loaded.values() if p.refs == 0)
        self._finished = True
        self._links = {}
        self._refs = refs
        self._nslots = nslots
        self._free = [s for s in range(nslots, 0, -1) if refs[s] == 0]
        self._loaded = {}

    def _check_loading(self) -> None:
        if self._finished:
            raise ValueError("the engine has finished loading")

    def set_verify(self, verify: bool) -> None:
        """Check the sum of every chunk read that has one; a mismatch raises `Corruption`."""
        self._verify = bool(verify)

    def set_preallocate(self, step: int) -> None:
        """Reserve file blocks ahead of a growing pool, up to `step` bytes at a time (as
        much as the pool holds, from 1 MiB); 0 turns it off. `trim_free_tail` gives them back."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"preallocation step {step!r} is not a byte count")
        with self._lock:
            self._prealloc_step = step

    def set_max_slots(self, max_slots: int) -> None:
        """Limit the pool: allocating beyond `max_slots` raises `NoSpace`."""
        self._max_slots = min(max_slots, MAX_SLOT)

    # -- maps ----------------------------------------------------------------

    def create_map(self, map_id: int, nchunks: int) -> None:
        with self._lock:
            if map_id in self._maps:
                raise ValueError(f"map {map_id} exists")
            if nchunks < 0:
                raise ValueError(f"map {map_id} cannot have {nchunks} chunks")
            self._maps[map_id] = _Map(map_id, nchunks, [None] * self._npages(nchunks), None)
            self._dirty_maps.add(map_id)

    def clone_map(self, map_id: int, source_id: int, child: bool = False) -> None:
        """A new map sharing every page of `source_id`: no entry or chunk is copied.

        With `child`, the source becomes the new map's parent: its partial chunks read
        through it, so it can be neither written nor dropped while it has children. Without,
        the new map takes the source's place (its parent too), as a commit does.
        """
        with self._lock:
            if map_id in self._maps:
                raise ValueError(f"map {map_id} exists")
            source = self._map(source_id)
            for page in source.pages:
                if page is not None:
                    page.refs += 1
            parent = source if child else source.parent
            self._maps[map_id] = _Map(map_id, source.nchunks, list(source.pages), parent)
            self._dirty_maps.add(map_id)

    def drop_map(self, map_id: int) -> None:
        with self._lock:
            m = self._map(map_id)
            if m.children:
                raise ValueError(f"map {map_id} has {m.children} child maps: drop them first")
            del self._maps[map_id]
            if m.parent is not None:
                m.parent.children -= 1
            for page in m.pages:
                if page is not None:
                    self._unref_page(page)
            self._dirty_maps.discard(map_id)

    def grow_map(self, map_id: int, nchunks: int) -> None:
        """Give the map `nchunks` chunks, the new ones unallocated (read as zeros): only its
        directory grows, by empty pages, so the cost is the new pages, not the size. It may
        shrink back only over unallocated chunks (a grow undone). A map with children cannot
        change; a grown map may be larger than its parent, which supplies zeros past its end."""
        with self._lock:
            m = self._map(map_id)
            if m.children:
                raise ValueError(f"map {map_id} has child maps: it cannot change")
            if nchunks < 0:
                raise ValueError(f"map {map_id} cannot have {nchunks} chunks")
            npages = self._npages(nchunks)
            if nchunks < m.nchunks and (
                any(p is not None for p in m.pages[npages:])
                or any(self._entry(m, c) for c in range(nchunks, min(m.nchunks, npages * self._pe)))
            ):
                raise ValueError(f"map {map_id} holds chunks past {nchunks}: it cannot shrink")
            del m.pages[npages:]
            m.pages.extend([None] * (npages - len(m.pages)))
            m.nchunks = nchunks
            self._dirty_maps.add(map_id)

    def has_map(self, map_id: int) -> bool:
        return map_id in self._maps

    def map_directory(self, map_id: int) -> bytes:
        with self._lock:
            return self._directory(self._map(map_id))

    # -- I/O -----------------------------------------------------------------

    def pread(self, map_id: int, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.read(map_id, buf, offset)
        return bytes(buf)

    def read(self, map_id: int, buffer: WriteableBuffer, offset: int) -> None:
        """Fill `buffer` (any writable buffer) with the map's bytes from `offset`."""
        mv = memoryview(buffer).cast("B")
        with self._lock:
            m = self._io_map(map_id)
            self._check_range(m, offset, len(mv))
            for pos, chunk, within, length in self._pieces(offset, len(mv)):
                self._read_chunk(m, chunk, within, mv[pos : pos + length])

    def write(self, map_id: int, data: ReadableBuffer, offset: int) -> None:
        """Write `data` (any buffer) at `offset`, copying shared pages and chunks first."""
        mv = memoryview(data).cast("B")
        with self._lock:
            m = self._writable_map(map_id)
            self._check_range(m, offset, len(mv))
            pieces = list(self._pieces(offset, len(mv)))
            self._reserve(sum(self._needs_slot(m, c, mv[p : p + n]) for p, c, _, n in pieces))
            for pos, chunk, within, length in pieces:
                self._write_chunk(m, chunk, within, mv[pos : pos + length])

    def zero(self, map_id: int, offset: int, length: int) -> None:
        """Make a range read as zeros; whole chunks become unallocated."""
        with self._lock:
            m = self._writable_map(map_id)
            self._check_range(m, offset, length)
            zeros = memoryview(self._zeros)
            self._reserve(
                sum(
                    self._needs_slot(m, c, zeros[:n])
                    for _, c, _, n in self._pieces(offset, length)
                    if n < self._cs
                )
            )
            for _, chunk, within, n in self._pieces(offset, length):
                if n == self._cs:
                    if self._entry(m, chunk):
                        page = self._page_for_write(m, chunk // self._pe)
                        i = chunk % self._pe
                        self._decref(page.entries[i] & MAX_SLOT)
                        page.entries[i] = 0
                        page.sums[i] = 0
                else:
                    self._write_chunk(m, chunk, within, memoryview(self._zeros)[:n])

    def seal(self, map_id: int) -> int:
        """Fill in the map's partial chunks and compute its missing chunk sums (at commit);
        returns how many sums it computed."""
        with self._lock:
            m = self._io_map(map_id)
            buf = bytearray(self._cs)
            count = 0
            for index, page in enumerate(m.pages):
                if page is None:
                    continue
                for i, entry in enumerate(page.entries):
                    slot = entry & MAX_SLOT
                    if entry & PARTIAL:
                        self._fill(m, index * self._pe + i, slot, page.sums[i])
                        page.entries[i] = slot
                        page.sums[i] = 0
                    if slot and not page.sums[i]:
                        self._pread_into(memoryview(buf), (slot - 1) * self._cs)
                        page.sums[i] = chunk_sum(buf)
                        self._dirty_pages[page.id] = page
                        count += 1
            return count

    def close(self) -> None:
        """End I/O: later reads, writes and seals raise Closed. Idempotent."""
        with self._lock:
            self._closed = True

    def flush_data(self) -> None:
        """The data file's bytes and what reading them needs (size, extents), not its times."""
        os.fdatasync(self._fd)

    # -- introspection -------------------------------------------------------

    def depth_runs(self, chain: Sequence[int], first_chunk: int, count: int) -> list[tuple[int, int, bool]]:
        """Runs of (chunks, depth, allocated) for chunks of chain[0]: depth k+1 means the
        map chain[k] supplies the chunk (its entry differs from chain[k+1]'s), 0 none."""
        with self._lock:
            if not chain:
                raise ValueError("depth_runs needs a chain of at least one map")
            maps = [self._map(i) for i in chain]
            self._check_range(maps[0], first_chunk * self._cs, count * self._cs)
            runs: list[tuple[int, int, bool]] = []
            for chunk in range(first_chunk, first_chunk + count):
                depth = 0
                for k, m in enumerate(maps):
                    below = self._entry_any(maps[k + 1], chunk) if k + 1 < len(maps) else 0
                    if self._entry_any(m, chunk) != below:
                        depth = k + 1
                        break
                allocated = self._entry(maps[0], chunk) != 0
                if runs and runs[-1][1] == depth and runs[-1][2] == allocated:
                    runs[-1] = (runs[-1][0] + 1, depth, allocated)
                else:
                    runs.append((1, depth, allocated))
            return runs

    def diff_runs(self, a_id: int, b_id: int) -> list[tuple[int, int]]:
        """Runs of (first_chunk, count) whose slots differ between two maps."""
        with self._lock:
            a, b = self._map(a_id), self._map(b_id)
            runs: list[tuple[int, int]] = []
            for chunk in range(max(a.nchunks, b.nchunks)):
                ea = self._entry(a, chunk) if chunk < a.nchunks else 0
                eb = self._entry(b, chunk) if chunk < b.nchunks else 0
                if ea != eb:
                    if runs and runs[-1][0] + runs[-1][1] == chunk:
                        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                    else:
                        runs.append((chunk, 1))
            return runs

    def exclusive_chunks(self, map_id: int, parent_id: int | None) -> int:
        """Chunks allocated in the map that its parent does not share."""
        with self._lock:
            m = self._map(map_id)
            parent = self._map(parent_id) if parent_id is not None else None
            count = 0
            for chunk in range(m.nchunks):
                slot = self._entry(m, chunk)
                if slot and (parent is None or self._entry_any(parent, chunk) != slot):
                    count += 1
            return count

    def stats(self) -> dict[str, int]:
        with self._lock:
            used = sum(1 for s in range(1, self._nslots + 1) if self._refs[s])
            return {
                "slots": self._nslots,
                "used": used,
                "free": len(self._free),
                "pending": len(self._pending),
                "maps": len(self._maps),
            }

    def refcounts(self) -> bytes:
        """Slot refcounts as little-endian uint32, index 0 unused: for `Store.check`."""
        with self._lock:
            return _to_le(self._refs)

    def take_free(self) -> list[int]:
        """Take every free slot out of circulation (to punch holes), ascending; `release` returns them."""
        with self._lock:
            free, self._free = sorted(self._free), []
            return free

    def trim_free_tail(self) -> int:
        """Shrink the pool and the data file past its last used or pending slot, and give
        back blocks reserved past the end; returns the pool size."""
        with self._lock:
            free = set(self._free)
            n = self._nslots
            while n and n in free:
                n -= 1
            # Truncating, even to the same size, also frees blocks reserved past the end,
            # this session's or those a crash left behind.
            shrinks = n < self._nslots
            os.ftruncate(self._fd, n * self._cs if shrinks else os.fstat(self._fd).st_size)
            self._prealloc_end = 0
            if shrinks:
                self._free = [s for s in self._free if s <= n]
                del self._refs[n + 1 :]
                self._nslots = n
            return n

    # -- persistence ---------------------------------------------------------

    def take_changes(self, refcounts: bool = False) -> Changes:
        """Hand over everything changed since the last call; the caller makes it durable.
        With `refcounts`, the slot refcounts of the same moment come along."""
        with self._lock:
            pages = [(p.id, _to_le(p.entries) + _to_le(p.sums)) for p in self._dirty_pages.values()]
            maps = [(i, self._directory(self._maps[i])) for i in sorted(self._dirty_maps)]
            counts = _to_le(self._refs) if refcounts else None
            changes = Changes(pages, self._dead_pages, maps, self._pending, counts)
            self._dirty_pages = {}
            self._dirty_maps = set()
            self._dead_pages = []
            self._pending = []
            return changes

    def release(self, freed: list[int]) -> None:
        """Make slots freed by durable metadata available again."""
        with self._lock:
            slots = list(freed)
            if not slots:
                return
            free = set(self._free)
            for slot in slots:
                if not 0 < slot <= self._nslots or self._refs[slot] or slot in free:
                    raise ValueError(f"slot {slot} is not a freed slot of the pool")
            if len(set(slots)) != len(slots):
                raise ValueError("release was given a slot twice")
            self._free.extend(slots)

    # -- internals -----------------------------------------------------------

    def _npages(self, nchunks: int) -> int:
        return -(-nchunks // self._pe)

    def _io_map(self, map_id: int) -> _Map:
        if self._closed:
            raise Closed("the store is closed")
        return self._map(map_id)

    def _writable_map(self, map_id: int) -> _Map:
        m = self._io_map(map_id)
        if m.children:
            raise ValueError(f"map {map_id} has child maps: it cannot change")
        return m

    def _map(self, map_id: int) -> _Map:
        try:
            return self._maps[map_id]
        except KeyError:
            raise KeyError(map_id) from None

    def _directory(self, m: _Map) -> bytes:
        return _to_le(array("Q", [p.id if p is not None else 0 for p in m.pages]))

    def _check_range(self, m: _Map, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > m.nchunks * self._cs:
            raise ValueError(f"range {offset}+{length} is outside the map")

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        pos = 0
        while pos < length:
            chunk, within = divmod(offset + pos, self._cs)
            n = min(self._cs - within, length - pos)
            yield pos, chunk, within, n
            pos += n

    def _entry(self, m: _Map, chunk: int) -> int:
        page = m.pages[chunk // self._pe]
        return 0 if page is None else page.entries[chunk % self._pe]

    def _entry_any(self, m: _Map, chunk: int) -> int:
        """The entry of any chunk: 0 past the map's end (a parent smaller than its grown child)."""
        return self._entry(m, chunk) if chunk < m.nchunks else 0

    def _sum(self, m: _Map, chunk: int) -> int:
        page = m.pages[chunk // self._pe]
        return 0 if page is None else page.sums[chunk % self._pe]

    def _new_page(self, entries: array, sums: array) -> _Page:
        page = _Page(self._next_page_id, entries, sums)
        self._next_page_id += 1
        page.refs = 1
        self._dirty_pages[page.id] = page
        return page

    def _page_for_write(self, m: _Map, index: int) -> _Page:
        """The map's page `index`, made exclusive to the map (created or copied)."""
        page = m.pages[index]
        if page is not None and page.refs == 1:
            self._dirty_pages[page.id] = page
            return page
        if page is None:
            fresh = self._new_page(array("I", bytes(4 * self._pe)), array("I", bytes(4 * self._pe)))
        else:
            fresh = self._new_page(array("I", page.entries), array("I", page.sums))
            for entry in fresh.entries:
                if entry:
                    self._refs[entry & MAX_SLOT] += 1
            page.refs -= 1
        m.pages[index] = fresh
        self._dirty_maps.add(m.id)
        return fresh

    def _unref_page(self, page: _Page) -> None:
        page.refs -= 1
        if page.refs:
            return
        for entry in page.entries:
            if entry:
                self._decref(entry & MAX_SLOT)
        self._dirty_pages.pop(page.id, None)
        self._dead_pages.append(page.id)

    def _decref(self, slot: int) -> None:
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._pending.append(slot)

    def _needs_slot(self, m: _Map, chunk: int, piece: memoryview) -> bool:
        """Whether writing `piece` into `chunk` takes a new slot (the rules of `_write_chunk`)."""
        old = self._entry(m, chunk)
        zero = piece.tobytes().count(0) == len(piece)
        if zero and (old == 0 or len(piece) == self._cs):
            return False
        return not self._in_place(m.pages[chunk // self._pe], chunk % self._pe, old)

    def _in_place(self, page: _Page | None, i: int, old: int) -> bool:
        """Whether entry `i` of `page`, naming `old`, is written in place: the page and the
        slot are this map's alone, and the chunk carries no sum. A summed chunk is never
        changed in place (a write copies it), so a durable sum always matches the durable
        bytes, even where a commit that sealed the chunk failed."""
        return (
            bool(old)
            and page is not None
            and page.refs == 1
            and self._refs[old & MAX_SLOT] == 1
            and bool(old & PARTIAL or not page.sums[i])
        )

    def _reserve(self, slots: int) -> None:
        """Refuse, before changing anything, a write that needs more new slots than the pool has."""
        left = len(self._free) + max(0, self._max_slots - self._nslots)
        if slots > left:
            need = f"the write needs {slots} new chunks of {self._cs} bytes"
            raise NoSpace(f"the pool is full: {need} and {left} are left")

    def _alloc(self) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            if self._nslots >= self._max_slots:
                raise NoSpace(f"the pool is full: {self._nslots} chunks of {self._cs} bytes in use")
            self._nslots += 1
            self._refs.append(0)
            slot = self._nslots
            if self._prealloc_step and slot * self._cs > self._prealloc_end:
                self._preallocate()
        self._refs[slot] = 1
        return slot

    def _preallocate(self) -> None:
        """Reserve blocks past the pool's new end, as much as the pool holds (from 1 MiB),
        within the step and the pool's limit: writes into them skip the file system's
        allocation. The reservation never takes the file system's last free space: it leaves
        at least the step free. A failure only means no reservation."""
        cs = self._cs
        start = max((self._nslots - 1) * cs, self._prealloc_end)
        length = min(max(start, _PREALLOC_MIN), self._prealloc_step, max(self._max_slots * cs - start, 0))
        length = -(-length // cs) * cs
        if length:
            st = os.fstatvfs(self._fd)
            if st.f_bavail * st.f_frsize - length < self._prealloc_step:
                return
            _fs.preallocate(self._fd, start, length)
        self._prealloc_end = start + length

    def _write_chunk(self, m: _Map, chunk: int, within: int, piece: memoryview) -> None:
        old = self._entry(m, chunk)
        n = len(piece)
        zero = piece.tobytes().count(0) == n
        if old == 0 and zero:
            return
        full = n == self._cs
        page = m.pages[chunk // self._pe]
        i = chunk % self._pe
        if not (full and zero) and self._in_place(page, i, old):
            self._write_in_place(m, cast(_Page, page), chunk, within, piece)
            return
        page = self._page_for_write(m, chunk // self._pe)
        old = page.entries[i]
        bits = 0
        data: memoryview | bytearray
        if full and zero:
            new = 0
        elif self._in_place(page, i, old):
            self._write_in_place(m, page, chunk, within, piece)
            return
        else:
            if full:
                lo, data = 0, piece
            elif self._sub and old == self._parent_entry(m, chunk):
                # Partial copy on write: only the sub-blocks the write touches; the parent
                # keeps supplying the others.
                lo, hi = self._span(within, n)
                data = bytearray(hi - lo)
                view = memoryview(data)
                self._read_parent(m, chunk, lo, view[: within - lo])
                self._read_parent(m, chunk, within + n, view[within + n - lo :])
                data[within - lo : within - lo + n] = piece
                bits = self._bits(lo, hi)
            else:
                lo, data = 0, bytearray(self._cs)
                self._read_chunk(m, chunk, 0, memoryview(data))
                data[within : within + n] = piece
            new = self._alloc()
            try:
                self._pwrite(data, (new - 1) * self._cs + lo)
            except BaseException:
                self._refs[new] = 0
                self._free.append(new)
                raise
        whole = bits in (0, _FULL_BITS)
        page.entries[i] = new if whole else new | PARTIAL
        page.sums[i] = 0 if whole else bits
        if old:
            self._decref(old & MAX_SLOT)

    def _write_in_place(self, m: _Map, page: _Page, chunk: int, within: int, piece: memoryview) -> None:
        i = chunk % self._pe
        entry = page.entries[i]
        base = ((entry & MAX_SLOT) - 1) * self._cs
        if entry & PARTIAL:
            n, bits = len(piece), page.sums[i]
            lo, hi = self._span(within, n)
            for start, end, k in ((lo, within, lo // self._sub), (within + n, hi, hi // self._sub - 1)):
                if start < end and not bits >> k & 1:
                    edge = bytearray(end - start)
                    self._read_parent(m, chunk, start, memoryview(edge))
                    self._pwrite(edge, base + start)
            # The entry claims the new sub-blocks only once their bytes are written.
            self._pwrite(piece, base + within)
            if bits | self._bits(lo, hi) == bits:
                return  # no new sub-block: the page is unchanged, nothing to make durable
            bits |= self._bits(lo, hi)
            whole = bits == _FULL_BITS
            page.entries[i] = entry & MAX_SLOT if whole else entry
            page.sums[i] = 0 if whole else bits
            self._dirty_pages[page.id] = page
            return
        self._pwrite(piece, base + within)

    def _span(self, within: int, n: int) -> tuple[int, int]:
        """The sub-blocks a write of `n` bytes at `within` touches, as a byte range."""
        sub = self._sub
        return within // sub * sub, -(-(within + n) // sub) * sub

    def _bits(self, lo: int, hi: int) -> int:
        """The bitmap of the sub-blocks in the sub-block-aligned range lo..hi."""
        return ((1 << ((hi - lo) // self._sub)) - 1) << (lo // self._sub)

    def _parent_entry(self, m: _Map, chunk: int) -> int:
        return self._entry_any(m.parent, chunk) if m.parent is not None else 0

    def _read_parent(self, m: _Map, chunk: int, within: int, piece: memoryview) -> None:
        """Bytes of the chunk as the parent map holds them (zeros without a parent)."""
        if not len(piece):
            return
        if m.parent is None or chunk >= m.parent.nchunks:
            piece[:] = self._zeros[: len(piece)]
        else:
            self._read_chunk(m.parent, chunk, within, piece)

    def _read_chunk(self, m: _Map, chunk: int, within: int, piece: memoryview) -> None:
        """Bytes of one chunk of the map: unallocated, partial (own sub-blocks, the rest from
        the parent), or a whole chunk (its sum checked when reads verify)."""
        entry = self._entry(m, chunk)
        slot = entry & MAX_SLOT
        length = len(piece)
        if slot == 0:
            piece[:] = self._zeros[:length]
        elif entry & PARTIAL:
            bits, sub = self._sum(m, chunk), self._sub
            pos = within
            while pos < within + length:
                own = bits >> (pos // sub) & 1
                end = (pos // sub + 1) * sub
                while end < within + length and (bits >> (end // sub) & 1) == own:
                    end += sub
                end = min(end, within + length)
                part = piece[pos - within : end - within]
                if own:
                    self._pread_into(part, (slot - 1) * self._cs + pos)
                else:
                    self._read_parent(m, chunk, pos, part)
                pos = end
        elif self._verify and self._sum(m, chunk):
            whole = bytearray(self._cs)
            self._pread_into(memoryview(whole), (slot - 1) * self._cs)
            if chunk_sum(whole) != self._sum(m, chunk):
                raise Corruption(f"chunk {chunk} (slot {slot}) of map {m.id} fails its checksum")
            piece[:] = whole[within : within + length]
        else:
            self._pread_into(piece, (slot - 1) * self._cs + within)

    def _fill(self, m: _Map, chunk: int, slot: int, bits: int) -> None:
        """Copy a partial chunk's missing sub-blocks from the parent into its slot."""
        sub = self._sub
        for k in range(SUB_BLOCKS):
            if not bits >> k & 1:
                part = bytearray(sub)
                self._read_parent(m, chunk, k * sub, memoryview(part))
                self._pwrite(part, (slot - 1) * self._cs + k * sub)

    def _pwrite(self, data: ReadableBuffer, offset: int) -> None:
        self._writes += 1
        mv = memoryview(data)
        while len(mv):
            try:
                done = os.pwrite(self._fd, mv, offset)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(f"the file system holding the data file is full: {exc.strerror}") from None
                raise
            mv = mv[done:]
            offset += done

    def _pread_into(self, piece: memoryview, offset: int) -> None:
        got = os.preadv(self._fd, [piece], offset)
        if got != len(piece):
            raise Corruption(f"short read at data offset {offset}: the data file is truncated")


MAX_IO = 1 << 30


class VolumeBase:
    """The hot half of `cowstore.Volume`: argument checks and I/O on one map.

    `cowstore.volume.Volume` adds the rest (flush, extents, a file object) and `_reclaim`,
    which makes room when the pool is full so that a write retries once.
    """

    __slots__ = ("_closed", "_engine", "_key", "_map_id", "_readonly", "_size")

    def _attach(self, engine: Engine, map_id: int, key: str, size: int, readonly: bool) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"expected an Engine, not {type(engine).__name__}")
        self._engine = engine
        self._map_id = map_id
        self._key = key
        self._size = size
        self._readonly = bool(readonly)
        self._closed = False

    @property
    def key(self) -> str:
        return self._key

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def _reclaim(self) -> bool:
        return False

    def _check_range(self, offset: int, length: int, max_length: int = MAX_IO) -> None:
        """The checks every call makes, for the methods that live in Python."""
        if self._closed:
            raise Closed(f"volume {self._key!r} is closed")
        if not isinstance(offset, int) or not isinstance(length, int) or bool in (type(offset), type(length)):
            raise InvalidArgument("offset and length must be ints")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise InvalidArgument(f"range {offset}+{length} is outside the volume of {self._size} bytes")
        if length > max_length:
            raise InvalidArgument(f"length {length} is over the maximum of {max_length} bytes per call")

    def _check_writable(self) -> None:
        if self._readonly:
            raise ReadOnly(f"snapshot {self._key!r} is read-only here: it cannot be written")

    def _gone(self) -> NotFound:
        return NotFound(f"snapshot {self._key!r} was committed or removed")

    def _read(self, buffer: memoryview, offset: int) -> None:
        try:
            self._engine.read(self._map_id, buffer, offset)
        except KeyError:
            raise self._gone() from None
        except Corruption as exc:
            where = f"snapshot {self._key!r}, read of {len(buffer)} bytes at offset {offset}"
            raise Corruption(f"{where}: {exc}") from None

    def _write(self, call: Callable[..., object], *args: object) -> None:
        try:
            try:
                call(self._map_id, *args)
            except NoSpace:
                if not self._reclaim():
                    raise
                call(self._map_id, *args)
        except KeyError:
            raise self._gone() from None

    def pread(self, length: int, offset: int) -> bytes:
        """`length` bytes from `offset`."""
        self._check_range(offset, length)
        buf = bytearray(length)
        self._read(memoryview(buf), offset)
        return bytes(buf)

    def preadinto(self, buffer: WriteableBuffer, offset: int) -> int:
        """Fill `buffer` (any writable buffer) from `offset`; returns its length in bytes."""
        try:
            view = memoryview(buffer)
        except TypeError:
            raise InvalidArgument(f"preadinto needs a writable buffer, not {type(buffer).__name__}") from None
        if view.readonly:
            raise InvalidArgument("preadinto needs a writable buffer")
        if not view.c_contiguous:
            raise InvalidArgument(
                "preadinto needs a contiguous buffer: a strided view cannot be filled in place"
            )
        view = view.cast("B")
        self._check_range(offset, view.nbytes)
        self._read(view, offset)
        return view.nbytes

    def pwrite(self, data: ReadableBuffer, offset: int) -> int:
        """Write `data` (any buffer) at `offset`; returns its length in bytes."""
        try:
            view = memoryview(data)
        except TypeError:
            raise InvalidArgument(f"pwrite needs a bytes-like object, not {type(data).__name__}") from None
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        view = view.cast("B")
        self._check_range(offset, view.nbytes)
        self._check_writable()
        self._write(self._engine.write, view, offset)
        return view.nbytes

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zeros without allocating space for them."""
        self._check_range(offset, length)
        self._check_writable()
        self._write(self._engine.zero, offset, length)
