"""An audit of a store's stored state, independent of the engine: like thin_check and qemu-img check.

It reads the metadata as SQLite holds it and the data file as the disk holds it, derives
what must be true (every page named exists, every slot named is inside the pool, the
snapshot tree has no dangling parent or cycle, slot refcounts equal the references, one
slot has one checksum), and compares the engine's refcounts with the derived ones. An
engine refcount below the references would let a write land in place in a chunk that a
committed snapshot still reads: that is why they must agree. With `data=True` it reads
every referenced chunk back and checks the sums computed at commit (a scrub).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from .engines import format
from .engines.format import MAX_SLOT, PARTIAL, chunk_sum
from .errors import Corruption
from .metadata import Metadata, Row


@dataclass(frozen=True)
class Problem:
    """One thing found wrong: what, and where (a snapshot, page or slot)."""

    what: str
    where: str


@dataclass
class CheckReport:
    """The result of `Store.check`. `ok` is false when anything is corrupted; leaks alone keep it true.

    Slot refcounts are derived from the maps, so a slot no map names is free, not leaked:
    `reclaimable_slots` are the free slots that still hold data in the data file (`compact`
    and `repair` give that space back). `leaked_pages` are stored pages no map names."""

    problems: list[Problem] = field(default_factory=list)
    reclaimable_slots: list[int] = field(default_factory=list)
    leaked_pages: list[int] = field(default_factory=list)
    snapshots: int = 0
    pages: int = 0
    slots: int = 0
    referenced_slots: int = 0
    chunks_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def leaks(self) -> int:
        return len(self.leaked_pages)


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending slots as runs of (first, count)."""
    runs: list[tuple[int, int]] = []
    for slot in slots:
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((slot, 1))
    return runs


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Byte ranges of the data file that hold data (not holes)."""
    extents, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end))
        pos = end
    return extents


def audit(
    meta: Metadata,
    data_fd: int,
    chunk_size: int,
    page_entries: int,
    engine_refs: bytes | None,
    *,
    data: bool = False,
) -> CheckReport:
    report = CheckReport()
    bad = report.problems
    for message in meta.check_integrity():
        bad.append(Problem(f"SQLite integrity: {message}", "metadata"))
    file_size = os.fstat(data_fd).st_size
    nslots = -(-file_size // chunk_size)
    report.slots = nslots

    try:
        scanned = meta.scan_snapshots()
        scanned_pages = list(meta.scan_pages())
    except Corruption as exc:
        bad.append(Problem(str(exc), "metadata"))
        return report
    rows = {row.id: row for row, _ in scanned}
    unread = set()
    for row, problem in scanned:
        if problem is not None:
            bad.append(Problem(problem, f"snapshot {row.key!r}"))
            if not row.directory:
                unread.add(row.id)
    pages = {page_id: blob for page_id, blob, problem in scanned_pages if problem is None}
    damaged_pages = set()
    for page_id, _, problem in scanned_pages:
        if problem is not None:
            bad.append(Problem(problem, f"page {page_id}"))
            damaged_pages.add(page_id)
    report.snapshots, report.pages = len(rows), len(scanned_pages)
    for row in rows.values():
        where = f"snapshot {row.key!r}"
        if row.parent is not None:
            parent = rows.get(row.parent)
            if parent is None:
                bad.append(Problem(f"parent id {row.parent} does not exist", where))
            elif parent.kind != "committed":
                bad.append(Problem(f"parent {parent.key!r} is {parent.kind}, not committed", where))
            elif parent.size > row.size:
                bad.append(Problem(f"size {row.size} is smaller than its parent's {parent.size}", where))
        seen: set[int] = set()
        s: Row | None = row
        while s is not None and s.parent is not None:
            if s.id in seen:
                bad.append(Problem("the parent chain has a cycle", where))
                break
            seen.add(s.id)
            s = rows.get(s.parent)

    page_refs: dict[int, int] = {}

    def npages_of(size: int) -> int:
        return format.directory_pages(-(-size // chunk_size), page_entries)

    for row in rows.values():
        where = f"snapshot {row.key!r}"
        if row.id in unread:
            continue
        if len(row.directory) % 8:
            bad.append(Problem("map directory length is not a multiple of 8", where))
            continue
        ids = format.decode_directory(row.directory)
        if len(ids) != npages_of(row.size):
            bad.append(Problem(f"map directory has {len(ids)} pages, expected {npages_of(row.size)}", where))
        for page_id in ids:
            if page_id == 0:
                continue
            if page_id not in pages:
                state = "is damaged" if page_id in damaged_pages else "does not exist"
                bad.append(Problem(f"map names page {page_id}, which {state}", where))
                continue
            page_refs[page_id] = page_refs.get(page_id, 0) + 1

    refs = array("I", bytes(4 * (nslots + 1)))
    sums: dict[int, tuple[int, int]] = {}
    for page_id, blob in pages.items():
        if page_id not in page_refs:
            report.leaked_pages.append(page_id)
            continue
        where = f"page {page_id}"
        try:
            entries, page_sums = format.decode_page(blob, page_entries)
        except ValueError as exc:
            bad.append(Problem(str(exc), where))
            continue
        for entry, crc in zip(entries, page_sums, strict=True):
            slot = entry & MAX_SLOT
            if slot == 0:
                continue
            if entry & PARTIAL:
                crc = 0  # the field holds which sub-blocks the slot has, not a sum
            if slot > nslots:
                bad.append(
                    Problem(f"names slot {slot}, past the end of the data file ({nslots} slots)", where)
                )
                continue
            refs[slot] += 1
            if crc:
                known = sums.setdefault(slot, (crc, page_id))
                if known[0] != crc:
                    bad.append(
                        Problem(
                            f"slot {slot} has sum {crc:#x} here but {known[0]:#x} in page {known[1]}", where
                        )
                    )
    report.referenced_slots = sum(1 for r in refs if r)

    if engine_refs is not None:
        held = format.from_le("I", engine_refs)
        for slot in range(1, max(len(held), len(refs))):
            want = refs[slot] if slot < len(refs) else 0
            have = held[slot] if slot < len(held) else 0
            if want != have:
                bad.append(
                    Problem(
                        f"refcount is {have} in memory but the maps reference it {want} times", f"slot {slot}"
                    )
                )

    for start, end in _data_extents(data_fd, file_size):
        for slot in range(start // chunk_size + 1, -(-end // chunk_size) + 1):
            if slot <= nslots and refs[slot] == 0:
                report.reclaimable_slots.append(slot)

    if data:
        buf = bytearray(chunk_size)
        for slot in range(1, nslots + 1):
            if refs[slot]:
                got = os.preadv(data_fd, [buf], (slot - 1) * chunk_size)
                report.chunks_read += 1
                if got != chunk_size and slot * chunk_size <= file_size:
                    bad.append(Problem(f"short read: {got} of {chunk_size} bytes", f"slot {slot}"))
                elif slot in sums and chunk_sum(buf) != sums[slot][0]:
                    bad.append(
                        Problem(f"chunk fails its checksum (named by page {sums[slot][1]})", f"slot {slot}")
                    )
    return report
