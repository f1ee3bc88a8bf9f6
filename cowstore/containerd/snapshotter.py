"""The snapshotter containerd sees: every snapshot an ext4 file system on a cowstore volume.

devmapper's model over cowstore: the first Prepare without a parent formats an empty ext4
once (the template, one per size) and commits it under an internal name; every Prepare
without a parent is then a child of it, and every Prepare with a parent a child of that
parent, both O(1) and sharing every chunk. A Prepare whose size label asks for more than
its parent has grows the child (`Store.resize`) and then its ext4 (`resize2fs`); a smaller
size than the parent's is ignored: a child is at least as large as its parent. The kernel
reaches a snapshot through its file in the daemon's FUSE mount point and a loop device on
it, which the snapshotter attaches at the first `Mounts` and holds until the snapshot is
committed or removed (`loop.attach`): every mount of it (ctr's, then the shim's) is then a
plain ext4 mount of that device.

Internal snapshots (templates, and one being formatted) live in the same store under
`INTERNAL`; containerd never sees them: they are missing from Stat and List, a child of
one reports no parent, and their names cannot be used as keys. `Cleanup` (which containerd
calls after each collection) removes a template once no snapshot is its child.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..errors import FailedPrecondition, InvalidArgument, NotFound
from ..filters import compile_filters
from ..fuse import file_name
from ..store import Store
from ..types import Info, Kind, Usage
from ..units import parse_size
from . import ext4, loop

log = logging.getLogger(__name__)

INTERNAL = "cowstore.containerd/"
"""Prefix of the snapshots this module keeps for itself."""
SIZE_LABEL = "containerd.io/snapshot/cowstore.size"
"""Label that sets a new snapshot's size (bytes, or with a binary suffix: 20G)."""
CLEANUP_SLACK = 256 << 20
"""Bytes the data file may hold beyond the chunks in use before Cleanup gives them back to
the disk. Containers that come and go then reuse blocks already written: a chunk written
into a punched hole costs the host file system an allocation, and the flush after it a
journal commit."""


@dataclass(frozen=True)
class Mount:
    """One mount as containerd performs it (`containerd.types.Mount`)."""

    type: str
    source: str
    options: list[str] = field(default_factory=list)


def is_internal(key: str) -> bool:
    """Whether `key` names a snapshot this module keeps for itself."""
    return key.startswith(INTERNAL)


class Snapshotter:
    """containerd's snapshotter calls over `store`, whose files the FUSE mount at `files`
    shows (the same process serves it)."""

    def __init__(self, store: Store, files: str) -> None:
        self.store = store
        self.files = os.path.realpath(files)
        self._template_lock = threading.Lock()
        self._loops: dict[str, loop.Held] = {}
        self._loops_lock = threading.Lock()
        self._helpers = loop.Helpers()
        self._drop_unfinished()

    def _drop_unfinished(self) -> None:
        """Remove templates whose formatting a crash interrupted (still active)."""
        for info in self.store.walk("kind==active"):
            if is_internal(info.name):
                log.info("removing %s, an unfinished template", info.name)
                self.store.remove(info.name)

    # -- names -----------------------------------------------------------------

    def file(self, key: str) -> str:
        """The path of snapshot `key`'s file in the FUSE mount point."""
        return os.path.join(self.files, file_name(key))

    def _public(self, key: str, what: str = "snapshot") -> str:
        """`key` if containerd may name it; an internal name is as if missing."""
        if is_internal(key):
            raise NotFound(f"{what} {key!r} does not exist")
        return key

    def _new_key(self, key: str) -> str:
        if is_internal(key):
            raise InvalidArgument(f"key {key!r}: the prefix {INTERNAL!r} is reserved by cowstore")
        return key

    def _visible(self, info: Info) -> Info:
        """`info` as containerd sees it: a child of a template has no parent."""
        if info.parent is not None and is_internal(info.parent):
            return replace(info, parent=None)
        return info

    # -- templates ---------------------------------------------------------------

    def _size(self, labels: Mapping[str, str]) -> int | None:
        text = labels.get(SIZE_LABEL)
        if text is None:
            return None
        try:
            return parse_size(text)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"label {SIZE_LABEL}={text!r}: not a size ({exc})") from None

    def _template(self, size: int | None) -> str:
        """The committed empty ext4 of `size` bytes (default: the store's), made if missing.
        The caller holds `_template_lock` until it has made its child (see `cleanup`)."""
        size = self.store.default_size if size is None else size
        name = f"{INTERNAL}ext4-{size}"
        if self.store.exists(name):
            return name
        building = f"{INTERNAL}formatting-ext4-{size}"
        if self.store.exists(building):
            self.store.remove(building)
        self.store.prepare(building, size=size).close()
        try:
            ext4.format_empty(self.file(building))
            self.store.commit(name, building)
        except BaseException:
            self.store.remove(building)
            raise
        log.info("formatted the ext4 template %s", name)
        return name

    def _drop_unused_templates(self) -> None:
        """Remove the templates no snapshot is a child of any more."""
        with self._template_lock:
            for info in list(self.store.walk("kind==committed")):
                if not is_internal(info.name):
                    continue
                try:
                    self.store.remove(info.name)
                except FailedPrecondition:
                    continue  # it has children
                log.info("removed the unused template %s", info.name)

    # -- containerd's calls ------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """A new active snapshot: a child of `parent`, or of the empty template."""
        self._new_key(key)
        size = self._size(labels)
        if parent:
            self._public(parent, "parent snapshot")
            self.store.prepare(key, parent, labels=labels).close()
        else:
            with self._template_lock:
                self.store.prepare(key, self._template(size), labels=labels).close()
        if parent and size is not None and size > self.store.stat(key).size:
            self._grow(key, size)
        return self.mounts(key)

    def _grow(self, key: str, size: int) -> None:
        """Grow the new child `key` to `size` bytes, then its ext4 to fill them, before
        containerd sees it (no loop device is on its file yet); on failure it goes."""
        try:
            self.store.resize(key, size)
            ext4.grow(self.file(key))
        except BaseException:
            self.store.remove(key)
            raise

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """A new read-only view of `parent` (or of an empty file system)."""
        self._new_key(key)
        if parent:
            self.store.view(key, self._public(parent, "parent snapshot"), labels=labels).close()
        else:
            size = self._size(labels)
            with self._template_lock:
                self.store.view(key, self._template(size), labels=labels).close()
        return self.mounts(key)

    def mounts(self, key: str) -> list[Mount]:
        """How to mount `key`: the loop device on its file, read-write or read-only.
        `noatime`: a read in a container writes nothing (every inode block an atime touches
        would be copied up and made durable at the next flush); `discard` gives the pool the
        chunks of files deleted in a container at once (ext4 discards freed blocks through
        the loop device, which punches them out of the file); `noload` lets a committed file
        system mount read-only without a journal replay."""
        info = self.store.stat(self._public(key))
        if info.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"snapshot {key!r} is committed: prepare or view a child to mount it")
        readonly = info.kind is not Kind.ACTIVE
        options = ["ro", "noload"] if readonly else ["rw", "noatime", "discard"]
        return [Mount("ext4", self._device(key, readonly), options)]

    def _device(self, key: str, readonly: bool) -> str:
        """The loop device held on `key`'s file, attached first if there is none (or it was
        detached from outside)."""
        path = self.file(key)
        with self._loops_lock:
            held = self._loops.get(key)
            if held is not None and loop.attached(held, path):
                return held.path
            if held is not None:
                del self._loops[key]
                self._helpers.release(held)
            held = self._loops[key] = self._helpers.attach(path, readonly=readonly)
            return held.path

    def _release(self, key: str) -> None:
        """Stop holding `key`'s loop device (it detaches once nothing mounts it), without
        waiting for the detach: a Remove is in the way of containerd's next Prepare."""
        with self._loops_lock:
            held = self._loops.pop(key, None)
        if held is not None:
            self._helpers.release(held, wait=False)

    def close(self) -> None:
        """Release every loop device held: those not mounted detach now."""
        with self._loops_lock:
            held, self._loops = list(self._loops.values()), {}
        self._helpers.release(*held)
        self._helpers.close()

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Commit `key` as `name`. If its file system is mounted (through a loop device on
        its file), it is frozen meanwhile, so the committed layer is a clean file system."""
        self._new_key(name)
        self._public(key)
        with self._helpers.frozen(loop.mount_points(loop.backed_by(self.file(key)))):
            self.store.commit(name, key, labels=labels)
        self._release(key)

    def remove(self, key: str) -> None:
        """Remove `key`; refused while its file system is mounted, or it has children."""
        self._public(key)
        points = loop.mount_points(loop.backed_by(self.file(key)))
        if points:
            raise FailedPrecondition(f"cannot remove snapshot {key!r}: it is mounted at {points[0]}")
        self._release(key)
        self.store.remove(key)

    def stat(self, key: str) -> Info:
        return self._visible(self.store.stat(self._public(key)))

    def update(self, info: Info, paths: Sequence[str]) -> Info:
        """Change labels (all, or those `labels.K` names); nothing else changes."""
        self._public(info.name)
        return self._visible(self.store.update(info, *paths))

    def walk(self, filters: Sequence[str]) -> Iterator[Info]:
        """Every snapshot containerd may see that matches any of `filters`."""
        match = compile_filters(filters)
        for info in self.store.walk():
            if is_internal(info.name):
                continue
            info = self._visible(info)
            fields = {
                "name": info.name,
                "kind": info.kind.value,
                "parent": info.parent or "",
                "labels": info.labels,
            }
            if match(fields):
                yield info

    def usage(self, key: str) -> Usage:
        """Bytes `key` holds that its parent does not."""
        return self.store.usage(self._public(key))

    def cleanup(self) -> None:
        """Remove templates without children (so an empty containerd leaves an empty store),
        then give free space back to the host file system once there is more than
        `CLEANUP_SLACK` of it (containerd calls Cleanup after every collection)."""
        self._drop_unused_templates()
        stats = self.store.stats()
        if stats.disk_bytes - stats.used * stats.chunk_size > CLEANUP_SLACK:
            self.store.compact()
