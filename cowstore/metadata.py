"""The store's metadata in SQLite: settings, the snapshot table and map pages.

One database, one transaction per durable step (WAL, synchronous=FULL): a snapshot row and
the pages its map names can never drift apart after a crash. Every map page and every map
directory carries a CRC-32 of its own, checked when the store opens, so a damaged
reference is caught before it sends a read to the wrong chunk.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType

from .errors import Corruption, Error, InvalidArgument, NoSpace

FORMAT = "cowstore"
_SQLITE_FULL = 13
"""SQLite's result code for a full disk: `sqlite3.SQLITE_FULL` and the exceptions'
`sqlite_errorcode` are new in Python 3.11, so on 3.10 the message says it instead."""
FORMAT_VERSION = 2
"""The newest format this code reads. A store is created at version 1 and moves to
`GROWN_VERSION` on its first resize of a child: versions differ only in what they allow."""
CREATED_VERSION = 1
GROWN_VERSION = 2
"""Snapshots may be larger than their parent (`Store.resize`): a release that reads version
1 only would call such a store damaged, so it is refused by its version instead."""

_SCHEMA = """
CREATE TABLE settings (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent INTEGER REFERENCES snapshots(id),
    labels TEXT NOT NULL,
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    size INTEGER NOT NULL,
    directory BLOB NOT NULL,
    directory_crc INTEGER NOT NULL
);
CREATE TABLE pages (id INTEGER PRIMARY KEY, entries BLOB NOT NULL, crc INTEGER NOT NULL);
"""


@dataclass
class Row:
    """One snapshot as stored."""

    id: int
    key: str
    kind: str
    parent: int | None
    labels: dict[str, str]
    created: int
    updated: int
    size: int
    directory: bytes


class Metadata:
    """The SQLite side of one store; callers serialise access."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        try:
            if readonly:
                # A read-only connection cannot keep the WAL index in heap memory: it reads
                # through SQLite's -shm file (and leaves it, and an empty -wal, behind).
                uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
                return
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # The store's flock already makes this process the only user: exclusive locking
            # keeps the WAL index in memory (no -shm file to mmap) and skips lock calls.
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            raise Corruption(f"{path}: not a readable SQLite database: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def create(self, settings: dict[str, int]) -> None:
        with self.transaction() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.executemany(
                "INSERT INTO settings VALUES (?, ?)",
                [("format", FORMAT), ("version", CREATED_VERSION), *settings.items()],
            )

    def settings(self, where: str) -> dict[str, int]:
        """The store's fixed settings; refuses what is not a cowstore store we can read."""
        try:
            rows = dict(self._db.execute("SELECT name, value FROM settings"))
        except sqlite3.DatabaseError as exc:
            raise Corruption(f"{where}: the metadata database is damaged or foreign: {exc}") from exc
        if rows.get("format") != FORMAT:
            raise Corruption(f"{where}: the metadata database is not a cowstore store")
        version = rows.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InvalidArgument(
                f"{where}: store format version {version} is newer than this cowstore reads "
                f"({FORMAT_VERSION})"
            )
        return rows

    def set_setting(self, name: str, value: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (name, value))

    def snapshots(self) -> list[Row]:
        """Every snapshot row, parents before children; damaged rows raise `Corruption`."""
        rows = []
        for row, problem in self.scan_snapshots():
            if problem is not None:
                raise Corruption(problem)
            rows.append(row)
        return rows

    def scan_snapshots(self) -> list[tuple[Row, str | None]]:
        """Every snapshot row, parents before children, each with what is damaged in it (or
        None). A damaged row is given as far as it reads: labels it cannot read are empty, a
        directory that fails its checksum is empty."""
        with _damage("snapshot table"):
            found = list(
                self._db.execute(
                    "SELECT id, key, kind, parent, labels, created, updated, size, directory, directory_crc "
                    "FROM snapshots ORDER BY id"
                )
            )
        result: list[tuple[Row, str | None]] = []
        for r in found:
            key = r[1] if isinstance(r[1], str) else repr(r[1])
            problem = None
            directory = r[8]
            if not isinstance(directory, bytes) or zlib.crc32(directory) != r[9]:
                problem = f"the map directory of snapshot {key!r} fails its checksum"
                directory = b""
            try:
                labels = json.loads(r[4])
            except (TypeError, ValueError):
                labels = None
            if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
            ):
                problem = problem or f"the labels of snapshot {key!r} are damaged"
                labels = {}
            if r[2] not in ("active", "view", "committed") or not all(isinstance(v, int) for v in r[5:8]):
                problem = problem or f"the row of snapshot {key!r} is damaged"
            result.append((Row(r[0], key, r[2], r[3], labels, r[5], r[6], r[7], directory), problem))
        return result

    def pages(self) -> Iterator[tuple[int, bytes]]:
        """Every map page; one that fails its checksum raises `Corruption`."""
        for page_id, entries, problem in self.scan_pages():
            if problem is not None:
                raise Corruption(problem)
            yield page_id, entries

    def scan_pages(self) -> Iterator[tuple[int, bytes, str | None]]:
        """Every map page, each with what is damaged in it (or None)."""
        with _damage("page table"):
            for page_id, entries, crc in self._db.execute("SELECT id, entries, crc FROM pages"):
                if not isinstance(entries, bytes) or zlib.crc32(entries) != crc:
                    yield page_id, b"", f"map page {page_id} fails its checksum"
                else:
                    yield page_id, entries, None

    def transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def check_integrity(self) -> list[str]:
        with _damage("integrity check"):
            return [r[0] for r in self._db.execute("PRAGMA integrity_check") if r[0] != "ok"]


class _damage:
    """Turns SQLite's errors while reading into `Corruption` naming what was being read."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if (
            kind is not None
            and issubclass(kind, (sqlite3.DatabaseError, ValueError, TypeError))
            and not issubclass(kind, Error)
        ):
            raise Corruption(f"the metadata database is damaged ({self._what}): {value}") from value


class _Transaction:
    """`with` block that commits on success and rolls back on error; a full disk is `NoSpace`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error as exc:
                kind, value = type(exc), exc
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if issubclass(kind, sqlite3.Error):
            code = getattr(value, "sqlite_errorcode", None)
            if code == _SQLITE_FULL or (code is None and "database or disk is full" in str(value)):
                raise NoSpace(f"the metadata database cannot grow: {value}") from value
            raise Error(f"the metadata database failed: {value}") from value


def insert_snapshot(db: sqlite3.Connection, row: Row) -> None:
    db.execute(
        "INSERT INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            row.id,
            row.key,
            row.kind,
            row.parent,
            json.dumps(row.labels),
            row.created,
            row.updated,
            row.size,
            row.directory,
            zlib.crc32(row.directory),
        ),
    )


def delete_snapshot(db: sqlite3.Connection, snapshot_id: int) -> None:
    db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))


def rename_snapshot(db: sqlite3.Connection, snapshot_id: int, key: str, updated: int) -> None:
    db.execute("UPDATE snapshots SET key = ?, updated = ? WHERE id = ?", (key, updated, snapshot_id))


def update_labels(db: sqlite3.Connection, snapshot_id: int, labels: dict[str, str], updated: int) -> None:
    db.execute(
        "UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
        (json.dumps(labels), updated, snapshot_id),
    )


def resize_snapshot(db: sqlite3.Connection, snapshot_id: int, size: int, updated: int) -> None:
    db.execute("UPDATE snapshots SET size = ?, updated = ? WHERE id = ?", (size, updated, snapshot_id))


def require_version(db: sqlite3.Connection, version: int) -> None:
    """Raise the store's format version to at least `version`."""
    db.execute("UPDATE settings SET value = ? WHERE name = 'version' AND value < ?", (version, version))


def delete_pages(db: sqlite3.Connection, page_ids: Iterable[int]) -> None:
    db.executemany("DELETE FROM pages WHERE id = ?", [(i,) for i in page_ids])


def write_changes(
    db: sqlite3.Connection,
    pages: Iterable[tuple[int, bytes]],
    dead_pages: Iterable[int],
    directories: Iterable[tuple[int, bytes]],
) -> None:
    """Store an engine's `Changes`: new and changed pages, freed pages, changed directories."""
    db.executemany("INSERT OR REPLACE INTO pages VALUES (?, ?, ?)", [(i, e, zlib.crc32(e)) for i, e in pages])
    delete_pages(db, dead_pages)
    db.executemany(
        "UPDATE snapshots SET directory = ?, directory_crc = ? WHERE id = ?",
        [(d, zlib.crc32(d), i) for i, d in directories],
    )
