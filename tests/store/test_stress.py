"""Eight threads for a bounded time: mixed reads, writes, prepares, commits and removes on one
store; afterwards `check()` is clean and every snapshot equals its model."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from cowstore import errors
from tests.conftest import CHUNK


def _stress(store, seconds: float, nthreads: int = 8) -> None:
    size = store.default_size
    lock = threading.Lock()
    committed: dict[str, bytes] = {}
    final: dict[str, bytearray] = {}
    failures: list[BaseException] = []
    deadline = time.monotonic() + seconds

    def worker(n: int) -> None:
        rng = random.Random(n)
        step = 0
        while time.monotonic() < deadline:
            step += 1
            with lock:
                parents = sorted(committed)
            parent = rng.choice(parents) if parents and rng.random() < 0.7 else None
            with lock:
                base = committed.get(parent) if parent else bytes(size)
            if base is None:
                continue
            key = f"t{n}/{step}"
            try:
                vol = store.prepare(key, parent)
            except errors.NotFound:
                continue
            model = bytearray(base)
            for _ in range(rng.randrange(1, 12)):
                op = rng.random()
                off = rng.randrange(size)
                length = min(rng.randrange(1, 3 * CHUNK), size - off)
                if op < 0.6:
                    data = rng.randbytes(length)
                    vol.pwrite(data, off)
                    model[off : off + length] = data
                elif op < 0.75:
                    vol.discard(off, length)
                    model[off : off + length] = bytes(length)
                else:
                    assert vol.pread(length, off) == model[off : off + length]
            fate = rng.random()
            if fate < 0.4:
                name = f"c{n}/{step}"
                store.commit(name, key)
                with lock:
                    committed[name] = bytes(model)
            elif fate < 0.7:
                store.remove(key)
            else:
                final[key] = model
            if parents and rng.random() < 0.2:
                victim = rng.choice(parents)
                try:
                    store.remove(victim)
                except (errors.FailedPrecondition, errors.NotFound):
                    pass
                else:
                    with lock:
                        committed.pop(victim, None)

    def run(n: int) -> None:
        try:
            worker(n)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    assert not failures, failures
    report = store.check(data=True)
    assert report.ok, report.problems
    for key, model in final.items():
        assert store.mounts(key).pread(size, 0) == bytes(model), key
    present = {i.name for i in store.walk()}
    for name, model in committed.items():
        if name in present:
            vol = store.view(f"probe/{name}", name)
            assert vol.pread(size, 0) == model, name


def test_eight_threads_of_mixed_work_leave_a_clean_store(store):
    _stress(store, seconds=3.0)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("COWSTORE_STRESS"), reason="make stress runs it")
def test_eight_threads_for_minutes_leave_a_clean_store(store):
    _stress(store, seconds=float(os.environ.get("COWSTORE_STRESS_SECONDS", 60)))
