"""The store: a containerd-style snapshotter over one engine, one data file and one SQLite file.

Policy lives here (keys, kinds, labels, parents, errors, durability order); the engine
does the chunk work. Every snapshotter call is durable when it returns.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from . import engines, fallocate, metadata
from .check import CheckReport, audit, slot_runs
from .engines import format
from .engines.format import Changes
from .errors import (
    AlreadyExists,
    Closed,
    Corruption,
    Error,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    NotFound,
    ReadOnly,
    Unavailable,
)
from .filters import compile_filters
from .types import Extent, Info, Kind, Stats, Usage
from .units import GiB, KiB, MiB
from .volume import Volume, volume_class

if TYPE_CHECKING:
    import sqlite3

    from .layout import Backing

DEFAULT_CHUNK_SIZE = 64 * KiB
DEFAULT_SIZE = 10 * GiB
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 4 * KiB, 1 * MiB
MAX_SIZE = 1 << 50
PAGE_ENTRIES = 1024
MAX_MAP_PAGES = 1 << 22
"""A snapshot's map directory stays within 32 MiB (SQLite keeps it as one blob): with 4 KiB
chunks a snapshot holds up to 16 TiB, with 64 KiB chunks 256 TiB."""
MAX_KEY_LENGTH = 4096
MAX_LABEL_LENGTH = 4096
"""As containerd: a key, and a label's key and value together, hold at most 4096 bytes."""
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Control characters, refused in keys and label keys: a newline would break every table."""
PREALLOCATE = 64 * MiB
"""A store in a directory reserves data-file blocks ahead of its growing pool, as much as
the pool holds up to this much (as XFS does for a growing file): a first write into a new
chunk then skips the file system's block allocation, a large part of a small write's cost.
`close` gives back what is left unused."""

IMPORTING = "cowstore.importing/"
"""Imports in progress write under a key that starts with this, and give the snapshot its
name only once complete; opening a store removes those a crash left behind."""


@dataclass(slots=True, eq=False, repr=False)
class _Snapshot:
    """One snapshot in memory. `id` is also its map's id in the engine; `dead` once removed."""

    id: int
    key: str
    kind: Kind
    parent: _Snapshot | None
    labels: dict[str, str]
    created: int
    updated: int
    size: int
    dead: bool = False

    def chain(self) -> list[int]:
        """Map ids from this snapshot down to its base."""
        ids: list[int] = []
        s: _Snapshot | None = self
        while s is not None:
            ids.append(s.id)
            s = s.parent
        return ids

    def info(self) -> Info:
        return Info(
            name=self.key,
            kind=self.kind,
            parent=self.parent.key if self.parent else None,
            labels=dict(self.labels),
            created=_datetime(self.created),
            updated=_datetime(self.updated),
            size=self.size,
        )

    def row(self, directory: bytes = b"") -> metadata.Row:
        return metadata.Row(
            self.id,
            self.key,
            self.kind.value,
            self.parent.id if self.parent else None,
            self.labels,
            self.created,
            self.updated,
            self.size,
            directory,
        )


def _now() -> int:
    now = datetime.now(timezone.utc)
    return int(now.timestamp()) * 1_000_000 + now.microsecond


def _datetime(micros: int) -> datetime:
    seconds, micro = divmod(micros, 1_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=micro)


def _check_key(key: object, what: str = "key") -> str:
    if not isinstance(key, str):
        raise InvalidArgument(f"{what} must be a str, not {type(key).__name__}")
    if not key:
        raise InvalidArgument(f"{what} must not be empty")
    if _CONTROL.search(key):
        raise InvalidArgument(f"{what} {key!r} contains a control character")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_KEY_LENGTH} bytes")
    return key


def _check_labels(labels: object) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidArgument(f"labels must be a mapping of str to str, not {type(labels).__name__}")
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"label {k!r}={v!r}: labels must map str to str")
        if not k or _CONTROL.search(k) or "\0" in v:
            raise InvalidArgument(
                f"label {k!r}: keys must be non-empty without control characters, and values without NUL"
            )
        if (
            len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
            > MAX_LABEL_LENGTH
        ):
            raise InvalidArgument(
                f"label {k!r}: key and value together are longer than {MAX_LABEL_LENGTH} bytes"
            )
    return dict(labels)


def _check_size(size: object, chunk_size: int, what: str = "size") -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise InvalidArgument(f"{what} must be an int, not {type(size).__name__}")
    limit = min(MAX_SIZE, chunk_size * PAGE_ENTRIES * MAX_MAP_PAGES)
    if not 0 < size <= limit:
        raise InvalidArgument(f"{what} {size} is out of range (1 to {limit} bytes, {chunk_size}-byte chunks)")
    return size


def _check_chunk_size(chunk_size: object) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise InvalidArgument(f"chunk_size must be an int, not {type(chunk_size).__name__}")
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgument(
            f"chunk_size {chunk_size} must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )
    return chunk_size


class Store:
    """A snapshotter: containerd's calls, over copy-on-write chunk maps.

    Made by `cowstore.open` or `cowstore.memory`. Thread-safe; a context manager.
    """

    def __init__(
        self,
        backing: Backing,
        settings: Mapping[str, int],
        *,
        engine: str | None,
        verify_reads: bool = False,
        readonly: bool = False,
    ) -> None:
        self._where = backing.where
        self.readonly: bool = readonly
        self.created: bool = False
        """Whether the call that opened this store also created it."""
        self._damaged: dict[str, str] = {}
        self._meta = backing.meta
        self._data_fd = backing.data_fd
        self._lock_fd = backing.lock_fd
        self._durable = backing.durable
        self._lock = threading.RLock()
        self._closed = False
        self._broken: BaseException | None = None
        self._unsaved: Changes | None = None
        self._synced_writes = 0
        self.chunk_size: int = settings["chunk_size"]
        self.default_size: int = settings["default_size"]
        module = engines.engine_module(engine)
        self._engine = module.Engine(self._data_fd, self.chunk_size, settings["page_entries"])
        self._volume = volume_class(module)
        self._engine.set_verify(verify_reads)
        if self._durable:
            self._engine.set_preallocate(PREALLOCATE)
        self.verify_reads: bool = bool(verify_reads)
        self.engine: str = "cython" if module.__name__.endswith("_cengine") else "python"
        self._snapshots: dict[str, _Snapshot] = {}
        self._children: dict[int, int] = {}
        self._next_id = 1
        self.max_bytes: int | None = None
        self._set_max_bytes(settings.get("max_bytes") or None)
        if readonly:
            self._salvage()
        else:
            self._load()
            for key in [k for k, s in self._snapshots.items() if k.startswith(IMPORTING)]:
                if self._snapshots[key].kind is Kind.ACTIVE:
                    self.remove(key)

    def __repr__(self) -> str:
        return f"<cowstore.Store {self._where} chunk_size={self.chunk_size} engine={self.engine}>"

    def _load(self) -> None:
        eng = self._engine
        try:
            for page_id, entries in self._meta.pages():
                eng.load_page(page_id, entries)
            by_id: dict[int, _Snapshot] = {}
            rows = self._meta.snapshots()
            for row in rows:
                parent = None
                if row.parent is not None:
                    parent = by_id.get(row.parent)
                    if parent is None:
                        raise Corruption(f"{self._where}: snapshot {row.key!r} names a missing parent")
                s = _Snapshot(
                    row.id, row.key, Kind(row.kind), parent, row.labels, row.created, row.updated, row.size
                )
                eng.load_map(row.id, -(-row.size // self.chunk_size), row.directory, row.parent)
                by_id[row.id] = s
                self._snapshots[row.key] = s
                if parent is not None:
                    self._children[parent.id] = self._children.get(parent.id, 0) + 1
                self._next_id = max(self._next_id, row.id + 1)
            eng.finish_load(-(-os.fstat(self._data_fd).st_size // self.chunk_size))
        except ValueError as exc:
            raise Corruption(f"{self._where}: the store's maps are damaged: {exc}") from exc

    def _salvage(self) -> None:
        """Load what is intact of a store, for a read-only open: pages that pass their sum
        and name slots inside the data file, and snapshots whose row, pages and parent are
        intact. A damaged snapshot whose row reads stays listed, and refuses its data by name."""
        eng, pe = self._engine, self._engine.page_entries
        nslots = -(-os.fstat(self._data_fd).st_size // self.chunk_size)
        intact = set()
        for page_id, blob, problem in self._meta.scan_pages():
            if problem is None and len(blob) == format.page_size(pe):
                entries, _ = format.decode_page(blob, pe)
                if all(e & format.MAX_SLOT <= nslots for e in entries):
                    eng.load_page(page_id, blob)
                    intact.add(page_id)
        by_id: dict[int, _Snapshot] = {}
        for row, problem in self._meta.scan_snapshots():
            parent = by_id.get(row.parent) if row.parent is not None else None
            nchunks = -(-row.size // self.chunk_size) if isinstance(row.size, int) else 0
            if problem is None:
                problem = self._salvage_problem(row, parent, nchunks, intact)
            kind = Kind(row.kind) if row.kind in ("active", "view", "committed") else Kind.ACTIVE
            s = _Snapshot(row.id, row.key, kind, parent, row.labels, row.created, row.updated, row.size)
            by_id[row.id] = s
            self._snapshots[row.key] = s
            self._next_id = max(self._next_id, row.id + 1)
            if problem is not None:
                self._damaged[row.key] = problem
                continue
            eng.load_map(row.id, nchunks, row.directory, row.parent)
            if parent is not None:
                self._children[parent.id] = self._children.get(parent.id, 0) + 1
        eng.finish_load(nslots)

    def _salvage_problem(
        self, row: metadata.Row, parent: _Snapshot | None, nchunks: int, intact: set[int]
    ) -> str | None:
        """Why a readable row's snapshot cannot be served, or None."""
        if row.parent is not None and parent is None:
            return f"its parent (id {row.parent}) is missing"
        if parent is not None and parent.key in self._damaged:
            return f"its parent {parent.key!r} is damaged"
        if len(row.directory) % 8:
            return "its map directory is damaged"
        ids = format.decode_directory(row.directory)
        if len(ids) != format.directory_pages(nchunks, self._engine.page_entries):
            return "its map directory has the wrong length"
        missing = next((i for i in ids if i and i not in intact), None)
        if missing is not None:
            return f"its map names page {missing}, which is damaged or missing"
        return None

    # -- containerd's snapshotter -------------------------------------------

    def prepare(
        self,
        key: str,
        parent: str | None = None,
        *,
        size: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Volume:
        """Create an active (read-write) snapshot on `parent`, or empty of `size` bytes."""
        return self._create(Kind.ACTIVE, key, parent, size, labels)

    def view(self, key: str, parent: str | None = None, *, labels: Mapping[str, str] | None = None) -> Volume:
        """Create a read-only view of the committed snapshot `parent`."""
        return self._create(Kind.VIEW, key, parent, None, labels)

    def _create(
        self, kind: Kind, key: str, parent: str | None, size: int | None, labels: Mapping[str, str] | None
    ) -> Volume:
        _check_key(key)
        labels = _check_labels(labels)
        if parent is not None:
            _check_key(parent, "parent")
            if size is not None:
                raise InvalidArgument(
                    "size applies only to a snapshot without a parent: a child has its parent's size"
                )
        with self._lock:
            self._check_writable()
            if key in self._snapshots:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            base = None
            if parent is not None:
                base = self._snapshots.get(parent)
                if base is None:
                    raise NotFound(f"parent snapshot {parent!r} does not exist")
                if base.kind is not Kind.COMMITTED:
                    raise InvalidArgument(f"parent {parent!r} is {base.kind.value}, not committed")
                size = base.size
            else:
                size = self.default_size if size is None else _check_size(size, self.chunk_size)
            now = _now()
            s = _Snapshot(self._next_id, key, kind, base, labels, now, now, size)
            self._next_id += 1
            if base is None:
                self._engine.create_map(s.id, -(-size // self.chunk_size))
            else:
                self._engine.clone_map(s.id, base.id, child=True)
            self._snapshots[key] = s
            if base is not None:
                self._children[base.id] = self._children.get(base.id, 0) + 1

            def undo() -> None:
                self._forget(s)
                self._engine.drop_map(s.id)

            self._persist(lambda db: metadata.insert_snapshot(db, s.row()), undo)
            return self._volume(self, s)

    def commit(self, name: str, key: str, *, labels: Mapping[str, str] | None = None) -> None:
        """Turn the active snapshot `key` into the committed snapshot `name`; `key` is gone."""
        _check_key(name, "name")
        _check_key(key)
        labels = _check_labels(labels)
        with self._lock:
            self._check_writable()
            s = self._get(key)
            if name in self._snapshots:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            if s.kind is not Kind.ACTIVE:
                raise FailedPrecondition(
                    f"snapshot {key!r} is {s.kind.value}: only an active snapshot commits"
                )
            now = _now()
            c = _Snapshot(self._next_id, name, Kind.COMMITTED, s.parent, labels, now, now, s.size)
            self._next_id += 1
            self._engine.seal(s.id)
            # A new map id cuts off writes still in flight on handles of `key`.
            self._engine.clone_map(c.id, s.id)
            self._engine.drop_map(s.id)
            s.dead = True
            del self._snapshots[key]
            self._snapshots[name] = c

            def rows(db: sqlite3.Connection) -> None:
                metadata.delete_snapshot(db, s.id)
                metadata.insert_snapshot(db, c.row())

            def undo() -> None:
                self._engine.clone_map(s.id, c.id)
                self._engine.drop_map(c.id)
                del self._snapshots[name]
                self._snapshots[key] = s
                s.dead = False

            self._persist(rows, undo)

    def remove(self, key: str) -> None:
        """Remove a snapshot of any kind; one with children cannot be removed."""
        _check_key(key)
        with self._lock:
            self._check_writable()
            s = self._get(key)
            if self._children.get(s.id):
                raise FailedPrecondition(f"cannot remove snapshot {key!r} with children")
            self._forget(s)

            def undo() -> None:
                self._snapshots[key] = s
                s.dead = False
                if s.parent is not None:
                    self._children[s.parent.id] = self._children.get(s.parent.id, 0) + 1

            # The map goes once its row is gone for good; a crash in between leaves pages
            # that no row names, which the next open frees.
            self._persist(lambda db: metadata.delete_snapshot(db, s.id), undo)
            self._engine.drop_map(s.id)

    def rename(self, key: str, new_key: str) -> None:
        """Give an active snapshot or a view the key `new_key`. Volumes already open keep
        working (under the old key in messages). Committed snapshots keep their names:
        children and containerd refer to them."""
        _check_key(key)
        _check_key(new_key, "new key")
        with self._lock:
            self._check_writable()
            s = self._get(key)
            if s.kind is Kind.COMMITTED:
                raise FailedPrecondition(
                    f"snapshot {key!r} is committed: only active snapshots and views rename"
                )
            if new_key in self._snapshots:
                raise AlreadyExists(f"snapshot {new_key!r} already exists")
            before = s.updated
            del self._snapshots[key]
            s.key, s.updated = new_key, _now()
            self._snapshots[new_key] = s

            def undo() -> None:
                del self._snapshots[new_key]
                s.key, s.updated = key, before
                self._snapshots[key] = s

            self._persist(lambda db: metadata.rename_snapshot(db, s.id, new_key, s.updated), undo)

    def resize(self, key: str, size: int) -> None:
        """Grow the active snapshot `key` to `size` bytes; the new bytes read as zeros.

        Only the map's directory grows (by empty pages), so the cost is the new pages, not
        the size. Shrinking is refused (`InvalidArgument`: the bytes past the new end may be
        in use), and so are committed snapshots and views (`FailedPrecondition`: children
        and containerd rely on their size). Volumes already open keep their old size; new
        handles (`mounts`) see the new one, and so does a child once it is committed.
        """
        _check_key(key)
        size = _check_size(size, self.chunk_size)
        with self._lock:
            self._check_writable()
            s = self._intact(key)
            if s.kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is {s.kind.value}: only an active snapshot grows")
            if size < s.size:
                raise InvalidArgument(f"snapshot {key!r} has {s.size} bytes: it cannot shrink to {size}")
            if size == s.size:
                return
            cs = self.chunk_size
            old_chunks, new_chunks = -(-s.size // cs), -(-size // cs)
            self._zero_tail(s, min(size, old_chunks * cs))
            self._engine.grow_map(s.id, new_chunks)
            before = s.size, s.updated
            s.size, s.updated = size, _now()

            def rows(db: sqlite3.Connection) -> None:
                metadata.resize_snapshot(db, s.id, s.size, s.updated)
                if s.parent is not None:
                    # A child larger than its parent is what older releases cannot read.
                    metadata.require_version(db, metadata.GROWN_VERSION)

            def undo() -> None:
                s.size, s.updated = before
                self._engine.grow_map(s.id, old_chunks)

            self._persist(rows, undo)

    def _zero_tail(self, s: _Snapshot, end: int) -> None:
        """Zero the bytes of the last chunk past the snapshot's end (up to `end`) before a grow
        shows them. Volumes never write there, so this normally only reads them (less than a
        chunk) and writes nothing."""
        if end > s.size and any(self._engine.pread(s.id, end - s.size, s.size)):
            self._engine.zero(s.id, s.size, end - s.size)

    def exists(self, key: str) -> bool:
        """Whether a snapshot of any kind has this key (or name)."""
        _check_key(key)
        with self._lock:
            self._check_open()
            return key in self._snapshots

    def stat(self, key: str) -> Info:
        _check_key(key)
        with self._lock:
            self._check_open()
            return self._get(key).info()

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change labels only: all of them (no paths, or "labels") or one ("labels.<key>")."""
        if not isinstance(info, Info):
            raise InvalidArgument(f"update takes an Info, not {type(info).__name__}")
        _check_key(info.name, "info.name")
        new_labels = _check_labels(info.labels)
        with self._lock:
            self._check_writable()
            s = self._get(info.name)
            labels = dict(s.labels)
            for path in fieldpaths or ("labels",):
                if path == "labels":
                    labels = dict(new_labels)
                elif isinstance(path, str) and path.startswith("labels.") and len(path) > 7:
                    k = path[7:]
                    if new_labels.get(k):
                        labels[k] = new_labels[k]
                    else:
                        labels.pop(k, None)
                else:
                    raise InvalidArgument(
                        f"cannot update field {path!r}: only labels and labels.<key> change"
                    )
            before = s.labels, s.updated
            s.labels, s.updated = labels, _now()

            def undo() -> None:
                s.labels, s.updated = before

            self._persist(lambda db: metadata.update_labels(db, s.id, labels, s.updated), undo)
            return s.info()

    def usage(self, key: str) -> Usage:
        """Bytes of chunks this snapshot holds that its parent does not."""
        _check_key(key)
        with self._lock:
            self._check_open()
            s = self._intact(key)
            chunks = self._engine.exclusive_chunks(s.id, s.parent.id if s.parent else None)
            return Usage(size=chunks * self.chunk_size, chunks=chunks)

    def mounts(self, key: str) -> Volume:
        """A new handle on an active or view snapshot."""
        _check_key(key)
        with self._lock:
            self._check_open()
            s = self._intact(key)
            if s.kind is Kind.COMMITTED:
                raise FailedPrecondition(
                    f"snapshot {key!r} is committed: prepare or view a child to mount it"
                )
            return self._volume(self, s, readonly=self.readonly)

    def map(self, key: str, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Extents of any snapshot, committed ones too, like `qemu-img map`."""
        _check_key(key)
        with self._lock:
            self._check_open()
            s = self._intact(key)
            if length is None:
                length = s.size - offset if isinstance(offset, int) else 0
            if (
                not isinstance(offset, int)
                or not isinstance(length, int)
                or offset < 0
                or length < 0
                or offset + length > s.size
            ):
                raise InvalidArgument(f"range {offset}+{length} is outside the snapshot of {s.size} bytes")
            return self._extents(s, offset, length)

    def diff(self, a: str, b: str) -> list[tuple[int, int]]:
        """Byte ranges (offset, length) whose chunks differ between two snapshots, like thin_delta."""
        _check_key(a)
        _check_key(b)
        with self._lock:
            self._check_open()
            sa, sb = self._intact(a), self._intact(b)
            cs = self.chunk_size
            return [(first * cs, count * cs) for first, count in self._engine.diff_runs(sa.id, sb.id)]

    def reader(self, key: str) -> Volume:
        """A read-only handle on a snapshot of any kind, committed ones too; it writes no metadata."""
        _check_key(key)
        with self._lock:
            self._check_open()
            return self._volume(self, self._intact(key), readonly=True)

    def walk(self, *filters: str) -> Iterator[Info]:
        """Every snapshot matching any filter (containerd syntax), in key order."""
        match = compile_filters(filters)
        with self._lock:
            self._check_open()
            infos = [s.info() for _, s in sorted(self._snapshots.items())]
        for info in infos:
            fields = {
                "name": info.name,
                "kind": info.kind.value,
                "parent": info.parent or "",
                "labels": info.labels,
            }
            if match(fields):
                yield info

    def stats(self) -> Stats:
        """Pool totals: slots in use, free and pending, bytes on disk, logical bytes, sharing."""
        with self._lock:
            self._check_open()
            e = self._engine.stats()
            logical = sum(self._engine.exclusive_chunks(s.id, None) for s in self._snapshots.values())
            return Stats(
                chunk_size=self.chunk_size,
                slots=e["slots"],
                used=e["used"],
                free=e["free"],
                pending=e["pending"],
                disk_bytes=os.fstat(self._data_fd).st_blocks * 512,
                logical_bytes=logical * self.chunk_size,
                snapshots=len(self._snapshots),
                max_bytes=self.max_bytes,
            )

    def check(self, *, data: bool = False) -> CheckReport:
        """Audit the stored metadata and pool (and with `data=True`, read every used chunk)."""
        with self._lock:
            self._check_open()
            # The refcounts of the moment the durable maps were taken: writers may go on
            # meanwhile, but nothing else becomes durable while the store's lock is held. A
            # read-only store audits what is stored alone.
            refcounts = None if self.readonly else self._persist(refcounts=True).refcounts
            return audit(
                self._meta, self._data_fd, self.chunk_size, self._engine.page_entries, refcounts, data=data
            )

    def repair(self) -> CheckReport:
        """Free leaked pages and give back free space (`compact`); refuses (`Corruption`)
        damage it cannot fix safely.

        It scrubs first (`check(data=True)`): a store whose data fails its checksums is
        beyond repair, and is left exactly as it is.
        """
        with self._lock:
            report = self.check(data=True)
            if not report.ok:
                raise Corruption(
                    f"{self._where}: {len(report.problems)} problems need more than a repair can safely do; "
                    f"first: {report.problems[0].what} ({report.problems[0].where})"
                )
            if report.leaked_pages:
                with self._meta.transaction() as db:
                    metadata.delete_pages(db, report.leaked_pages)
            self.compact()
            return self.check()

    def compact(self) -> int:
        """Give free space back: truncate the pool's free tail, punch holes for free slots
        (slots freed since the last durable step are made free first).

        Returns the bytes of the data file's apparent size that are now holes or gone.
        """
        with self._lock:
            self._check_writable()
            if self._engine.stats()["pending"]:
                self._persist(None)
            before = os.fstat(self._data_fd).st_size
            slots = self._engine.trim_free_tail()
            freed = before - os.fstat(self._data_fd).st_size
            free = self._engine.take_free()
            try:
                for first, count in slot_runs(free):
                    if first <= slots and fallocate.punch_hole(
                        self._data_fd, (first - 1) * self.chunk_size, count * self.chunk_size
                    ):
                        freed += count * self.chunk_size
            finally:
                self._engine.release(free)
            return freed

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Limit the pool to `max_bytes` (None or 0: no limit), kept in the store. A limit is
        at least one chunk and not below what the pool holds now."""
        with self._lock:
            self._check_writable()
            before = self.max_bytes
            self._set_max_bytes(max_bytes or None)
            held = self._engine.stats()["used"] * self.chunk_size
            if max_bytes and max_bytes < held:
                self._set_max_bytes(before)
                raise InvalidArgument(f"max_bytes {max_bytes} is below the {held} bytes the pool holds now")
            try:
                self._meta.set_setting("max_bytes", max_bytes or 0)
            except BaseException:
                self._set_max_bytes(before)
                raise

    def _set_max_bytes(self, max_bytes: int | None) -> None:
        if max_bytes is not None:
            if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < self.chunk_size:
                raise InvalidArgument(f"max_bytes must be an int of at least one chunk ({self.chunk_size})")
            self._engine.set_max_slots(max_bytes // self.chunk_size)
        self.max_bytes = max_bytes

    def _reclaim(self) -> bool:
        """After `NoSpace`: make pending frees durable and give back the blocks reserved
        ahead of the pool; true if that made room, so the write may retry once."""
        with self._lock:
            self._check_open()
            made_room = False
            if self._engine.stats()["pending"]:
                self._persist(None)
                made_room = True
            if self._durable:
                before = os.fstat(self._data_fd).st_blocks
                self._engine.trim_free_tail()
                made_room = made_room or os.fstat(self._data_fd).st_blocks < before
            return made_room

    def set_verify_reads(self, verify: bool) -> None:
        """Check (or stop checking) the sum of every committed chunk read, from now on."""
        with self._lock:
            self._check_open()
            self._engine.set_verify(verify)
            self.verify_reads = bool(verify)

    def flush(self) -> None:
        """Make every write before this call durable (nothing to do when read-only)."""
        with self._lock:
            self._check_open()
            if not self.readonly:
                self._persist(None)

    def close(self) -> None:
        """Flush and release the store; closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._broken is None and not self.readonly:
                    self._persist(None)
                    if self._durable:
                        self.compact()
            finally:
                self._closed = True
                self._engine.close()
                self._meta.close()
                os.close(self._data_fd)
                if self._lock_fd is not None:
                    os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------

    def _extents(self, s: _Snapshot, offset: int, length: int) -> list[Extent]:
        with self._lock:
            self._check_open()
        if length == 0:
            return []
        cs = self.chunk_size
        first = offset // cs
        count = (offset + length - 1) // cs - first + 1
        extents = []
        chunk, end = first, offset + length
        for run, depth, allocated in self._engine.depth_runs(s.chain(), first, count):
            start = max(chunk * cs, offset)
            stop = min((chunk + run) * cs, end)
            extents.append(Extent(start, stop - start, allocated, not allocated, depth))
            chunk += run
        return extents

    def _forget(self, s: _Snapshot) -> None:
        """Take a snapshot out of the tables: its handles stop working."""
        s.dead = True
        del self._snapshots[s.key]
        if s.parent is not None:
            self._children[s.parent.id] -= 1

    def _intact(self, key: str) -> _Snapshot:
        """The snapshot `key`, whose data can be read: a damaged one is `Corruption`."""
        s = self._get(key)
        if key in self._damaged:
            raise Corruption(f"snapshot {key!r} is damaged: {self._damaged[key]}")
        return s

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnly(f"store {self._where} is open read-only: it cannot change")

    def _get(self, key: str) -> _Snapshot:
        s = self._snapshots.get(key)
        if s is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return s

    def _check_open(self) -> None:
        if self._closed:
            raise Closed(f"store {self._where} is closed")
        if self._broken is not None:
            raise self._unavailable()

    def _unavailable(self) -> Unavailable:
        return Unavailable(f"store {self._where} failed to persist and must be reopened: {self._broken}")

    def _persist(
        self,
        rows: Callable[[sqlite3.Connection], object] | None = None,
        undo: Callable[[], None] | None = None,
        *,
        refcounts: bool = False,
    ) -> Changes:
        """One durable step: data first, then the metadata naming it, in one transaction.

        Freed slots become reusable only after the transaction that frees them commits. A
        step that finds the disk full, or is interrupted (Ctrl-C, SIGTERM), changes nothing
        durable and leaves the store usable: the engine's changes wait for the next step,
        `undo` puts back what the caller changed in memory, and the error is raised
        (`NoSpace` for a full disk). A failed fsync of the data or a failing database may
        have lost what the engine handed over: the store is then broken (`Unavailable`
        now and for every later call), to be reopened.
        Data written since the last step began is synced first; a step with no rows and no
        changes either syncs nothing: a file system flushing twice in a row costs no fsync.
        Returns the changes made durable.
        """
        writes = self._engine.writes
        changes = self._engine.take_changes(refcounts)
        if self._unsaved is not None:
            changes = _merged(self._unsaved, changes)
        elif (
            rows is None
            and writes == self._synced_writes
            and not (changes.pages or changes.dead_pages or changes.maps or changes.freed or refcounts)
        ):
            return changes
        try:
            if self._durable and writes != self._synced_writes:
                self._engine.flush_data()
            try:
                self._commit(changes, rows)
            except NoSpace:
                # The blocks reserved ahead of the pool may be what SQLite needs.
                self._engine.trim_free_tail()
                self._commit(changes, rows)
        except BaseException as exc:
            if isinstance(exc, (OSError, Error)) and not isinstance(exc, NoSpace):
                self._broken = exc
                raise self._unavailable() from exc
            self._unsaved = changes
            if undo is not None:
                undo()
            if isinstance(exc, NoSpace):
                raise NoSpace(f"{self._where}: no space left to make changes durable ({exc})") from exc
            raise
        self._unsaved = None
        self._synced_writes = writes
        self._engine.release(changes.freed)
        return changes

    def _commit(self, changes: Changes, rows: Callable[[sqlite3.Connection], object] | None) -> None:
        if rows is None and not (changes.pages or changes.dead_pages or changes.maps):
            return  # data only: no transaction to write
        with self._meta.transaction() as db:
            if rows is not None:
                rows(db)
            metadata.write_changes(db, changes.pages, changes.dead_pages, changes.maps)


def _merged(old: Changes, new: Changes) -> Changes:
    """Changes a failed step held back, followed by later ones: the later state of a page or
    directory wins, and a page that died since is not written again."""
    dead = set(new.dead_pages)
    pages = {i: blob for i, blob in old.pages if i not in dead}
    pages.update(new.pages)
    maps = dict(old.maps)
    maps.update(new.maps)
    return Changes(
        list(pages.items()),
        old.dead_pages + new.dead_pages,
        list(maps.items()),
        old.freed + new.freed,
        new.refcounts,
    )


def stored_settings(rows: Mapping[str, object], where: str) -> dict[str, int]:
    """A store's settings as read back, checked as at creation: damage is `Corruption`."""
    try:
        chunk_size = _check_chunk_size(rows.get("chunk_size"))
        _check_size(rows.get("default_size"), chunk_size, "default_size")
        if rows.get("page_entries") != PAGE_ENTRIES:
            raise InvalidArgument(f"page_entries {rows.get('page_entries')!r} is not {PAGE_ENTRIES}")
        max_bytes = rows.get("max_bytes")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise InvalidArgument(f"max_bytes {max_bytes!r} is not a byte count")
    except InvalidArgument as exc:
        raise Corruption(f"{where}: a stored setting is damaged: {exc}") from None
    return {k: v for k, v in rows.items() if isinstance(v, int)}


def initial_settings(chunk_size: int | None, default_size: int | None) -> dict[str, int]:
    """A new store's fixed settings from the caller's choices (None: the default), checked."""
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else _check_chunk_size(chunk_size)
    if default_size is not None:
        _check_size(default_size, chunk_size, "default_size")
    return {
        "chunk_size": chunk_size,
        "default_size": DEFAULT_SIZE if default_size is None else default_size,
        "page_entries": PAGE_ENTRIES,
    }
