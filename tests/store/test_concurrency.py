"""Many threads on one store: writers on their own snapshots, readers of shared parents,
others preparing and committing, all at once."""

from __future__ import annotations

import os
import random
import threading

from tests.conftest import CHUNK


def test_threads_writing_reading_and_committing_at_once_stay_consistent(store):
    base = store.prepare("base")
    image = os.urandom(64 * CHUNK)
    base.pwrite(image, 0)
    store.commit("img", "base")
    failures: list[BaseException] = []
    final: dict[str, bytearray] = {}
    stop = threading.Event()

    def writer(n: int) -> None:
        rng = random.Random(n)
        key = f"w{n}"
        vol = store.prepare(key, "img")
        model = bytearray(image) + bytearray(vol.size - len(image))
        for _ in range(150):
            off = rng.randrange(0, 80 * CHUNK)
            data = rng.randbytes(rng.randrange(1, 3 * CHUNK))
            vol.pwrite(data, off)
            model[off : off + len(data)] = data
            if rng.random() < 0.1:
                vol.flush()
        final[key] = model

    def reader(n: int) -> None:
        vol = store.view(f"r{n}", "img")
        rng = random.Random(100 + n)
        while not stop.is_set():
            off = rng.randrange(0, 60 * CHUNK)
            assert vol.pread(4 * CHUNK, off) == image[off : off + 4 * CHUNK]

    def committer(n: int) -> None:
        for i in range(20):
            vol = store.prepare(f"c{n}/{i}", "img")
            vol.pwrite(b"layer %d" % i, i * CHUNK)
            store.commit(f"l{n}/{i}", f"c{n}/{i}")
            assert list(store.walk(f"name==l{n}/{i}"))

    def guarded(fn, n):
        def run():
            try:
                fn(n)
            except BaseException as exc:
                failures.append(exc)

        return threading.Thread(target=run)

    writers = [guarded(writer, n) for n in range(3)] + [guarded(committer, n) for n in range(2)]
    readers = [guarded(reader, n) for n in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(timeout=120)
    stop.set()
    for t in readers:
        t.join(timeout=30)
    assert not failures, failures
    for key, model in final.items():
        assert store.mounts(key).pread(len(model), 0) == bytes(model)
    for n in range(2):
        for i in range(20):
            expected = b"layer %d" % i
            assert store.view(f"check{n}/{i}", f"l{n}/{i}").pread(len(expected), i * CHUNK) == expected


def test_check_and_repair_are_exact_while_another_thread_writes(disk_store):
    s = disk_store()
    s.prepare("base").pwrite(os.urandom(16 * CHUNK), 0)
    s.commit("img", "base")
    vol = s.prepare("w", "img")
    stop = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(1)
        try:
            while not stop.is_set():
                off = rng.randrange(0, 64) * CHUNK
                if rng.random() < 0.2:
                    vol.write_zeroes(off, 4 * CHUNK)
                else:
                    vol.pwrite(rng.randbytes(4 * CHUNK), off)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for i in range(40):
            report = s.repair() if i % 4 == 3 else s.check(data=i % 2 == 0)
            assert report.ok and report.leaks == 0, report.problems
    finally:
        stop.set()
        thread.join()
    assert not failures, failures
    assert s.check(data=True).ok
