"""A full host file system: writes and flushes fail with `NoSpace`, nothing acknowledged is lost,
and the store goes on once space is freed (dm-thin's out-of-data-space mode, qemu's werror=enospc).

The store lives on a small ext4 file system on a loop device; a filler file takes the free
space away and gives it back."""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

import cowstore
from cowstore import errors
from tests.smallfs import fill, small_fs

KiB, MiB = 1 << 10, 1 << 20
VOLUME = 64 * MiB
WRITTEN = 24 * MiB
"""How much of the volume a test writes in all: what the file system holds once it is freed."""


@pytest.fixture
def fs(tmp_path) -> Iterator[Path]:
    with small_fs(tmp_path) as mountpoint:
        yield mountpoint


def test_a_full_file_system_fails_writes_and_flushes_with_nospace_and_loses_nothing(engine, fs):
    rng = random.Random(7)
    model = bytearray(VOLUME)
    store = cowstore.open(fs / "store", create=True, chunk_size=64 * KiB, engine=engine)
    try:
        vol = store.prepare("a", size=VOLUME)
        filler = fill(fs, leave=12 * MiB)
        refused, offset = 0, 0
        while offset < VOLUME:
            block = rng.randbytes(MiB)
            try:
                vol.pwrite(block, offset)
            except errors.NoSpace as exc:
                assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC
                refused += 1
                break
            model[offset : offset + MiB] = block
            offset += MiB
            if offset % (4 * MiB) == 0:
                try:
                    store.flush()
                except errors.NoSpace:
                    refused += 1
                    break
        assert refused, "the file system never filled up"
        assert vol.pread(offset, 0) == model[:offset], "an acknowledged write changed"
        os.unlink(filler)
        store.flush()
        while offset < WRITTEN:
            block = rng.randbytes(MiB)
            vol.pwrite(block, offset)
            model[offset : offset + MiB] = block
            offset += MiB
        store.flush()
    finally:
        store.close()
    with cowstore.open(fs / "store", engine=engine) as store:
        report = store.check(data=True)
        assert report.ok and report.leaks == 0, report.problems
        assert store.reader("a").pread(VOLUME, 0) == model


def test_a_metadata_commit_that_finds_the_disk_full_keeps_the_store_usable(engine, fs):
    store = cowstore.open(fs / "store", create=True, chunk_size=64 * KiB, engine=engine)
    try:
        vol = store.prepare("a", size=VOLUME)
        vol.pwrite(b"flushed" * 1000, 0)
        store.flush()
        vol.pwrite(b"pending" * 20000, 3 * MiB)
        filler = fill(fs)
        with pytest.raises(errors.NoSpace) as info:
            store.flush()
        assert str(fs) in str(info.value), "the message names where the space ran out"
        assert vol.pread(7000, 0) == b"flushed" * 1000
        assert vol.pread(140000, 3 * MiB) == b"pending" * 20000
        vol.pwrite(b"rewritten", 3 * MiB)
        os.unlink(filler)
        store.flush()
        store.prepare("b")
    finally:
        store.close()
    with cowstore.open(fs / "store", engine=engine) as store:
        vol = store.reader("a")
        assert vol.pread(7000, 0) == b"flushed" * 1000
        assert vol.pread(140000, 3 * MiB) == b"rewritten" + (b"pending" * 20000)[9:]
        assert store.check(data=True).ok


def test_a_snapshotter_call_that_finds_the_disk_full_fails_whole(engine, fs):
    store = cowstore.open(fs / "store", create=True, chunk_size=64 * KiB, engine=engine)
    try:
        store.prepare("a", size=VOLUME).pwrite(b"a" * MiB, 0)
        store.flush()
        filler = fill(fs)
        for call in (
            lambda: store.prepare("b", size=VOLUME),
            lambda: store.commit("c", "a"),
        ):
            with contextlib.suppress(errors.NoSpace):
                call()
        os.unlink(filler)
        keys = {i.name: i.kind for i in store.walk()}
        assert keys.get("a") in (cowstore.Kind.ACTIVE, None)
        store.flush()
    finally:
        store.close()
    with cowstore.open(fs / "store", engine=engine) as store:
        assert {i.name: i.kind for i in store.walk()} == keys
        assert store.check(data=True).ok


def test_the_pool_reserves_no_blocks_where_the_file_system_is_nearly_full(engine, fs):
    with cowstore.open(fs / "store", create=True, chunk_size=64 * KiB, engine=engine) as store:
        store.prepare("a", size=VOLUME).pwrite(b"x" * (64 * KiB), 0)
        store.flush()
        data = fs / "store" / "data"
        assert os.stat(data).st_blocks * 512 <= 64 * KiB
