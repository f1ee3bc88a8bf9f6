"""Crash safety under SIGKILL: a child runs a random workload, the parent kills it and checks.

Each round starts a child (tests/crashload.py) on the same store with a new seed and its
own log, kills it with SIGKILL after a random short time, reopens the store and replays
the log against a model of what must be there:

- everything up to the last durable point exactly: which snapshots exist, their kind,
  parent, labels and size, and the bytes of committed snapshots and views;
- for an active snapshot, per chunk: its bytes at the last flush (or its creation) with
  some prefix of the later writes to that chunk applied, in order;
- a snapshotter call cut short (its "done" missing) may or may not have happened;
- a call that failed with `NoSpace` (its "failed" record) did nothing, except that a data
  call leaves its range as the record says it read back, pending like any write.

The store as reopened then becomes the next round's exact starting state, so the model
never drifts however many rounds run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import cowstore
from cowstore.engines.format import SUB_BLOCKS
from tests.conftest import ENGINES
from tests.harness.crashload import BREAK_ENV, CHUNK, DATA_OPS, SIZE, payload
from tests.smallfs import fill, small_fs

UNIT = CHUNK // SUB_BLOCKS
"""What a write not flushed yet is all or nothing in: a sub-block (see `differences`)."""

ROOT = Path(__file__).resolve().parents[2]
STRESS = bool(os.environ.get("COWSTORE_STRESS"))
KILLS = int(os.environ.get("COWSTORE_CRASH_KILLS", 50))
STRESS_KILLS = int(os.environ.get("COWSTORE_CRASH_KILLS", 2000))
SELF_TEST_KILLS = 40
READY_TIMEOUT = 30.0
EXIT_TIMEOUT = 10.0


@dataclass
class Snap:
    """One snapshot in the model; `pending` writes are not durable yet (active snapshots only)."""

    kind: str
    parent: str | None
    labels: dict[str, str]
    size: int
    data: bytearray
    pending: list[tuple[int, bytes]] = field(default_factory=list)

    def copy(self) -> Snap:
        return Snap(
            self.kind, self.parent, dict(self.labels), self.size, bytearray(self.data), list(self.pending)
        )

    def settle(self) -> None:
        """Make every pending write durable."""
        for offset, data in self.pending:
            self.data[offset : offset + len(data)] = data
        self.pending = []


Model = dict[str, Snap]


@dataclass
class Round:
    """What one kill left behind, for the verdict and its report."""

    engine: str
    number: int
    seed: int
    log: Path
    ops: int
    tail: list[dict[str, Any]]
    problems: list[str]
    refused: int = 0

    def report(self) -> str:
        tail = "\n    ".join(json.dumps(r) for r in self.tail)
        problems = "\n    ".join(self.problems[:12])
        return (
            f"engine {self.engine}, kill {self.number}, child seed {self.seed}, {self.ops} operations logged "
            f"in {self.log}:\n  problems:\n    {problems}\n  last records:\n    {tail}"
        )


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's complete records; a last line cut short by the kill is dropped."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in raw.split(b"\n")[:-1]]


def updated_labels(old: dict[str, str], new: dict[str, str], paths: list[str]) -> dict[str, str]:
    """containerd's update of labels by field paths, as `Store.update` documents it."""
    labels = dict(old)
    for path in paths or ["labels"]:
        key = path.removeprefix("labels.")
        if path == "labels":
            labels = dict(new)
        elif new.get(key):
            labels[key] = new[key]
        else:
            labels.pop(key, None)
    return labels


def apply(model: Model, op: str, p: dict[str, Any]) -> None:
    """The effect of one finished call on the model."""
    if op == "pwrite":
        model[p["key"]].pending.append((p["offset"], payload(p["seed"], p["length"], p["zeros"])))
    elif op in ("discard", "write_zeroes"):
        model[p["key"]].pending.append((p["offset"], bytes(p["length"])))
    elif op == "flush":
        for snap in model.values():
            snap.settle()
    elif op in ("prepare", "view"):
        kind = "active" if op == "prepare" else "view"
        if p["parent"] is None:
            size = SIZE if p["size"] is None else p["size"]
            model[p["key"]] = Snap(kind, None, dict(p["labels"]), size, bytearray(size))
        else:
            base = model[p["parent"]]
            model[p["key"]] = Snap(kind, p["parent"], dict(p["labels"]), base.size, bytearray(base.data))
    elif op == "commit":
        snap = model.pop(p["key"])
        snap.settle()
        model[p["name"]] = Snap("committed", snap.parent, dict(p["labels"]), snap.size, snap.data)
    elif op == "remove":
        del model[p["key"]]
    elif op == "update":
        snap = model[p["key"]]
        snap.labels = updated_labels(snap.labels, p["labels"], p["paths"])
    else:
        raise AssertionError(f"the log names an unknown operation {op!r}")


def _params(begin: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in begin.items() if k not in ("ev", "n", "op")}


def _copy(model: Model) -> Model:
    return {k: s.copy() for k, s in model.items()}


def replay(start: Model, records: list[dict[str, Any]]) -> list[Model]:
    """The models the store may show after the kill: one, or two if a snapshotter call was cut short.

    A write cut short joins the pending writes (per chunk it landed or not); a flush cut short
    changes nothing the pending writes do not already allow. A failed data call joins them
    as the bytes it left in its range; any other failed call changes nothing.
    """
    model = _copy(start)
    begun: dict[str, Any] | None = None
    last_done = -1
    for r in records:
        if r["ev"] == "begin":
            assert begun is None, f"operation {r['n']} began before {begun} was done"
            begun = r
        elif r["ev"] == "done":
            assert begun is not None and begun["n"] == r["n"], f"done {r['n']} does not match {begun}"
            apply(model, begun["op"], _params(begun))
            last_done, begun = r["n"], None
        elif r["ev"] == "failed":
            assert begun is not None and begun["n"] == r["n"], f"failed {r['n']} does not match {begun}"
            if begun["op"] in DATA_OPS:
                model[begun["key"]].pending.append((begun["offset"], bytes.fromhex(r["now"])))
            begun = None
        elif r["ev"] == "durable":
            assert r["n"] == last_done and begun is None, f"durable {r['n']} is not right after its done"
    if begun is None or begun["op"] == "flush":
        return [model]
    if begun["op"] in DATA_OPS:
        apply(model, begun["op"], _params(begun))
        return [model]
    happened = _copy(model)
    apply(happened, begun["op"], _params(begun))
    return [model, happened]


def observe(store: cowstore.Store) -> tuple[Model, list[str]]:
    """The reopened store as a model with nothing pending, and what its own audit finds wrong.

    Committed snapshots are read through the engine: a view would change the store under test.
    """
    problems = [f"check: {p.what} ({p.where})" for p in store.check(data=True).problems]
    infos = list(store.walk())
    if [i.name for i in infos] != sorted(i.name for i in infos):
        problems.append("walk is not in key order")
    model: Model = {}
    for info in infos:
        if store.stat(info.name) != info:
            problems.append(f"{info.name}: stat {store.stat(info.name)} differs from walk's {info}")
        kind = info.kind.value
        try:
            if kind == "committed":
                data = store._engine.pread(store._snapshots[info.name].id, info.size, 0)
            else:
                data = store.mounts(info.name).pread(info.size, 0)
        except cowstore.errors.Corruption as exc:
            problems.append(f"{info.name}: reading it: {exc}")
            continue
        model[info.name] = Snap(kind, info.parent, dict(info.labels), info.size, bytearray(data))
    return model, problems


def differences(seen: Model, expected: Model) -> list[str]:
    """Where the store as seen falls outside what the model allows.

    Flushed bytes must be there. A write not flushed yet may be lost in whole or in part,
    but each sub-block (1/32 of a chunk, the unit a partial chunk holds) shows its durable
    bytes with some prefix of its later writes applied, in order.
    """
    problems = []
    if sorted(seen) != sorted(expected):
        missing, extra = sorted(set(expected) - set(seen)), sorted(set(seen) - set(expected))
        return [f"snapshots missing {missing}, unexpected {extra}"]
    for name, want in expected.items():
        got = seen[name]
        fields = ("kind", "parent", "labels", "size")
        for f in fields:
            if getattr(got, f) != getattr(want, f):
                problems.append(f"{name}: {f} is {getattr(got, f)!r}, expected {getattr(want, f)!r}")
        if got.size != want.size:
            continue
        by_unit: dict[int, list[tuple[int, bytes]]] = {}
        for offset, data in want.pending:
            for unit in range(offset // UNIT, (offset + len(data) - 1) // UNIT + 1):
                by_unit.setdefault(unit, []).append((offset, data))
        for unit in range(-(-want.size // UNIT)):
            lo, hi = unit * UNIT, min((unit + 1) * UNIT, want.size)
            actual = got.data[lo:hi]
            allowed = bytearray(want.data[lo:hi])
            if actual == allowed:
                continue
            writes = by_unit.get(unit, [])
            for offset, data in writes:
                start, stop = max(offset, lo), min(offset + len(data), hi)
                allowed[start - lo : stop - lo] = data[start - offset : stop - offset]
                if actual == allowed:
                    break
            else:
                at = lo + next(i for i in range(hi - lo) if actual[i] != want.data[lo + i])
                problems.append(
                    f"{name} ({want.kind}): chunk {lo // CHUNK}, sub-block {lo % CHUNK // UNIT} matches "
                    f"neither its durable bytes nor any of {len(writes)} later writes applied in order "
                    f"(first odd byte at {at}: {got.data[at : at + 8].hex()}, durable "
                    f"{want.data[at : at + 8].hex()})"
                )
    return problems


def kill_child(
    store: Path, log: Path, seed: int, engine: str, rng: random.Random, env: dict[str, str]
) -> None:
    """Start the workload, SIGKILL it after a random 5-300 ms (mostly counted from its ready record)."""
    err = log.with_suffix(".stderr")
    with open(err, "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.crashload", str(store), str(log), str(seed), engine],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        if rng.random() < 0.9:
            deadline = time.monotonic() + READY_TIMEOUT
            while b'"ready"' not in (log.read_bytes() if log.exists() else b""):
                if child.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        time.sleep(rng.uniform(0.005, 0.3))
        if child.poll() is not None:
            pytest.fail(f"the workload exited by itself ({child.returncode}):\n{err.read_text()[-3000:]}")
        child.send_signal(signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=EXIT_TIMEOUT)


def crash_rounds(
    tmp_path: Path, engine: str, kills: int, *, broken: bool = False, disk: Path | None = None
) -> tuple[list[Round], float]:
    """Run up to `kills` kill-and-check rounds; stop at the first failing one. Returns rounds and seconds.

    With `disk` (a small file system for the store), each round first takes all but a few
    chunks of its free space away, or gives it back, at random: the child meets a full disk
    in writes, flushes and snapshotter calls, and logs those calls as failed."""
    rng = random.Random(int(os.environ.get("COWSTORE_CRASH_SEED", random.randrange(1 << 32))))
    env = {k: v for k, v in os.environ.items() if k != BREAK_ENV}
    if broken:
        env[BREAK_ENV] = "1"
    store_dir = (disk or tmp_path) / "store"
    cowstore.open(store_dir, create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine).close()
    model: Model = {}
    rounds: list[Round] = []
    filler: Path | None = None
    began = time.monotonic()
    for number in range(kills):
        seed = rng.randrange(1 << 32)
        log = tmp_path / f"log.{number}"
        if disk is not None:
            if filler is not None:
                filler.unlink()
                filler = None
            if rng.random() < 0.6:
                filler = fill(disk, leave=rng.choice([0, 1, 4, 16]) * CHUNK)
        kill_child(store_dir, log, seed, engine, rng, env)
        if filler is not None:
            filler.unlink()
            filler = None
        records = read_log(log)
        candidates = replay(model, records)
        try:
            with cowstore.open(store_dir, engine=engine) as store:
                seen, problems = observe(store)
        except Exception as exc:
            seen, problems = {}, [f"reopen failed: {exc!r}"]
        if not problems:
            verdicts = [differences(seen, expected) for expected in candidates]
            if all(verdicts):
                problems = [p for v in verdicts for p in v]
        ops = sum(1 for r in records if r["ev"] == "begin")
        refused = sum(1 for r in records if r["ev"] == "failed")
        rounds.append(Round(engine, number, seed, log, ops, records[-8:], problems, refused))
        if problems:
            break
        model = seen
        log.unlink(missing_ok=True)
        log.with_suffix(".stderr").unlink(missing_ok=True)
    return rounds, time.monotonic() - began


def per_engine(total: int) -> int:
    return max(1, total // len(ENGINES))


def check_survives(tmp_path: Path, engine: str, kills: int) -> None:
    rounds, seconds = crash_rounds(tmp_path, engine, kills)
    failed = [r for r in rounds if r.problems]
    assert not failed, failed[0].report()
    ops = sum(r.ops for r in rounds)
    print(
        f"\n{engine}: {len(rounds)} kills, {ops} operations, {seconds / len(rounds) * 1000:.0f} ms per kill"
    )


def test_flushed_writes_and_snapshotter_calls_survive_sigkill(engine: str, tmp_path: Path) -> None:
    check_survives(tmp_path, engine, per_engine(KILLS))


def test_flushed_writes_and_snapshotter_calls_survive_sigkill_on_a_disk_that_fills_up(
    engine: str, tmp_path: Path
) -> None:
    with small_fs(tmp_path, size=24 << 20) as disk:
        rounds, _ = crash_rounds(tmp_path, engine, per_engine(KILLS), disk=disk)
    failed = [r for r in rounds if r.problems]
    assert not failed, failed[0].report()
    refused = sum(r.refused for r in rounds)
    print(f"\n{engine}: {len(rounds)} kills on a filling disk, {refused} calls refused with NoSpace")
    assert refused, f"in {len(rounds)} rounds no call met the full disk"


@pytest.mark.slow
@pytest.mark.skipif(not STRESS, reason="thousands of kills: run by `make stress` (COWSTORE_STRESS=1)")
def test_flushed_writes_and_snapshotter_calls_survive_thousands_of_kills(engine: str, tmp_path: Path) -> None:
    check_survives(tmp_path, engine, per_engine(STRESS_KILLS))


def test_harness_self_test_catches_slots_reused_before_their_freeing_is_durable(
    engine: str, tmp_path: Path
) -> None:
    """The harness's own test: a child whose engine breaks the pending-free rule must be caught.

    The reused slot still holds a chunk that durable metadata names: the next open finds
    bytes matching no allowed state or, for a chunk a commit sealed, a failed checksum."""
    rounds, _ = crash_rounds(tmp_path, engine, SELF_TEST_KILLS, broken=True)
    assert rounds[-1].problems, f"{len(rounds)} kills of a child that reuses freed slots early went unnoticed"
    signs = ("matches neither", "fails its checksum")
    assert any(sign in p for p in rounds[-1].problems for sign in signs), rounds[-1].report()
