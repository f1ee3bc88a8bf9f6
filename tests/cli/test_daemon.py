"""`cowstore serve` holds the store; every other command runs in it through the control socket,
with the output and exit status it has when it opens the store itself."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import cowstore
from cowstore import cli, control
from tests.cli.test_cli import base_and_child, sparse_image
from tests.conftest import CHUNK, SIZE
from tests.console import command, env

TIMEOUT = 60


@dataclass(frozen=True)
class Run:
    code: int
    out: bytes
    err: bytes


@dataclass
class World:
    """A store with snapshots, a working directory with images, and the engine to run."""

    store: Path
    work: Path
    engine: str

    def cli(self, *args: str) -> Run:
        done = subprocess.run(
            [*command(), "--store", str(self.store), "--wait", "0", *args],
            cwd=self.work,
            env=env(self.engine),
            capture_output=True,
            timeout=TIMEOUT,
        )
        return Run(done.returncode, done.stdout, done.stderr)

    def popen(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [*command(), "--store", str(self.store), *args], cwd=self.work, env=env(self.engine), **kw
        )


@pytest.fixture
def world(engine: str, tmp_path: Path) -> World:
    store, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    with cowstore.open(store, create=True, chunk_size=CHUNK, default_size=SIZE, engine=engine) as s:
        base_and_child(s)
    sparse_image(work / "img", SIZE // 2, {CHUNK: b"i" * CHUNK, 5 * CHUNK: b"j" * 100})
    return World(store, work, engine)


class Daemon:
    """`cowstore serve --socket` on the world's store, until `stop`."""

    def __init__(self, world: World) -> None:
        self.socket = world.work / "nbd.sock"
        self.proc = world.popen(
            "serve", "--socket", str(self.socket), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.control = world.store / control.SOCKET_NAME
        assert self.proc.stdout is not None
        # The control socket listens before the front ends start: the first line says both serve.
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"serve ended: {self.proc.communicate(timeout=TIMEOUT)}")
        assert self.control.exists()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, bytes]:
        self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err


@pytest.fixture
def serving(world: World) -> Iterator[Daemon]:
    daemon = Daemon(world)
    try:
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()


_TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")

# Each runs on the state the ones before it left; errors and changes too.
SCRIPT: list[list[str]] = [
    ["df"],
    ["--json", "df"],
    ["ls"],
    ["--json", "ls"],
    ["ls", "kind==active"],
    ["ls", "kind=~="],
    ["stat", "child"],
    ["stat", "--json", "base"],
    ["stat", "nope"],
    ["--json", "stat", "nope"],
    ["usage", "child"],
    ["tree"],
    ["--json", "tree"],
    ["map", "child"],
    ["map", "--json", "child"],
    ["diff", "base", "child"],
    ["check"],
    ["--json", "check", "--data"],
    ["label", "child", "a=b", "layer="],
    ["label", "child"],
    ["label", "child", "novalue"],
    ["prepare", "--json", "new", "base", "--label", "x=y"],
    ["prepare", "child"],
    ["view", "v2", "base"],
    ["commit", "c1", "new"],
    ["rm", "v2", "nope", "base"],
    ["import", "img", "imp"],
    ["--json", "import", "img", "imp2", "--commit", "imp2c"],
    ["import", "missing.img", "k"],
    ["export", "base", "out.raw"],
    ["export", "base", "out.raw"],
    ["--json", "export", "imp", "out.raw", "--force"],
    ["export", "child", "-"],
    ["export", "--verify", "imp2c", "-"],
    ["--read-only", "ls"],
    ["--read-only", "prepare", "z"],
    ["stat"],
    ["check", "--repair"],
    ["compact"],
    ["tree"],
    ["--json", "df"],
]


def test_compact_in_the_daemon_gives_removed_chunks_back_to_the_disk(world: World) -> None:
    """Closing a store compacts it; a daemon keeps it open, so `compact` is how its free
    chunks go back to the disk."""
    daemon = Daemon(world)
    try:
        assert world.cli("import", "img", "imp").code == 0
        assert world.cli("rm", "imp").code == 0
        before = os.stat(world.store / "data").st_blocks * 512
        r = world.cli("--json", "compact")
        assert r.code == 0, r.err
        after = os.stat(world.store / "data").st_blocks * 512
        assert json.loads(r.out) == {"freed_bytes": json.loads(r.out)["freed_bytes"], "disk_bytes": after}
        assert json.loads(r.out)["freed_bytes"] >= 2 * CHUNK and after < before
        assert world.cli("compact").out.startswith(b"freed:          0 B")
    finally:
        daemon.stop()


def play(world: World) -> list[tuple[list[str], int, bytes, bytes]]:
    runs = []
    for args in SCRIPT:
        r = world.cli(*args)
        runs.append((args, r.code, _TIME.sub(b"<time>", r.out), _TIME.sub(b"<time>", r.err)))
    runs.append((["out.raw"], 0, (world.work / "out.raw").read_bytes(), b""))
    return runs


def test_every_command_through_the_daemon_says_what_it_says_on_its_own(world, tmp_path):
    before = tmp_path / "before"
    shutil.copytree(world.store, before)
    daemon = Daemon(world)
    try:
        through = play(world)
    finally:
        assert daemon.stop()[0] == 0
    assert not daemon.control.exists()
    shutil.rmtree(world.store)
    shutil.copytree(before, world.store)
    (world.work / "out.raw").unlink()
    alone = play(world)
    assert [r[0] for r in through] == [r[0] for r in alone]
    for a, b in zip(through, alone, strict=True):
        assert a == b
    codes = {" ".join(args): code for args, code, _, _ in alone}
    assert codes["stat nope"] == 1 and codes["stat"] == 2 and codes["check"] == 0
    assert not any(b"in use" in err for *_, err in through)


def test_export_to_standard_output_streams_the_bytes(world, serving):
    r = world.cli("export", "child", "-")
    assert r.code == 0 and b"exported child to -" in r.err
    assert len(r.out) == SIZE
    assert r.out[3 * CHUNK : 4 * CHUNK] == b"C" * CHUNK and r.out[2 * CHUNK : 3 * CHUNK] == bytes(CHUNK)


def test_the_control_socket_is_the_daemons_users_alone_and_goes_with_it(world, serving):
    mode = os.lstat(serving.control).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert serving.stop()[0] == 0
    assert not serving.control.exists()


def test_commands_that_cannot_go_through_the_daemon_fail_as_locked_naming_it(world, serving):
    mnt = world.work / "mnt"
    mnt.mkdir()
    for args in (["serve", "--socket", str(world.work / "other.sock")], ["init"], ["mount", str(mnt)]):
        started = time.monotonic()
        r = world.cli("--wait", "30", *args)
        assert time.monotonic() - started < 20
        assert r.code == 1, (args, r)
        assert f"process {serving.pid} ".encode() in r.err and b"in use" in r.err, (args, r.err)
    assert world.cli("ls").code == 0


def test_a_killed_daemon_leaves_a_socket_that_clients_ignore_and_the_next_daemon_replaces(world):
    first = Daemon(world)
    first.proc.kill()
    first.proc.communicate(timeout=TIMEOUT)
    assert first.control.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.socket(socket.AF_UNIX).connect(str(first.control))
    r = world.cli("ls", "--json")
    assert r.code == 0 and [i["name"] for i in json.loads(r.out)] == ["base", "child", "look"]
    stale = os.lstat(first.control).st_ino
    second = Daemon(world)
    try:
        assert os.lstat(second.control).st_ino != stale
        r = world.cli("prepare", "after", "base")
        assert r.code == 0, r
    finally:
        assert second.stop()[0] == 0
    with cowstore.open(world.store) as s:
        assert s.exists("after")


def test_the_daemon_refuses_a_client_of_another_user(world, monkeypatch):
    monkeypatch.setattr(control, "trusted", lambda uid: False)
    with control.Server(world.store, lambda request: 0), socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(world.store / control.SOCKET_NAME))
        received = control.receive(sock)
    assert received is not None and "refused" in received[0]


def _wait_for_import(daemon: Daemon, image: Path) -> None:
    """Until the daemon has the image open (the import is under way)."""
    deadline = time.monotonic() + TIMEOUT
    fds = Path(f"/proc/{daemon.pid}/fd")
    while True:
        opened = set()
        for fd in fds.iterdir():
            with contextlib.suppress(FileNotFoundError):
                opened.add(os.readlink(fd))
        if str(image) in opened:
            return
        assert time.monotonic() < deadline, "the import never started"
        time.sleep(0.005)


def _imported(world: World) -> list[str]:
    r = world.cli("ls", "--json")
    assert r.code == 0, r
    return [i["name"] for i in json.loads(r.out) if i["name"] not in ("base", "child", "look")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_client_stopped_during_an_import_leaves_all_or_nothing(world, serving, signum):
    """The client forwards SIGINT and SIGTERM: the import stops at its next chunk, is undone,
    and the client says so as it would alone; a killed client hangs up, which does the same."""
    image = os.urandom(256 * CHUNK) * 64
    (world.work / "big").write_bytes(image)
    rng = random.Random(signum)
    outcomes = []
    for _ in range(4):
        client = world.popen("import", "big", "k", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_for_import(serving, world.work / "big")
        time.sleep(rng.uniform(0, 0.2))
        client.send_signal(signum)
        _, err = client.communicate(timeout=TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        names = _imported(world)
        while any(n.startswith("cowstore.importing/") for n in names):
            assert time.monotonic() < deadline, names
            time.sleep(0.1)
            names = _imported(world)
        if names:
            assert names == ["k"]
            assert world.cli("export", "k", "-").out == image
            outcomes.append("complete")
            assert world.cli("rm", "k").code == 0
        else:
            if signum != signal.SIGKILL:
                want = (
                    (130, b"cowstore: interrupted\n")
                    if signum == signal.SIGINT
                    else (143, b"cowstore: terminated\n")
                )
                assert (client.returncode, err) == want
            outcomes.append("stopped")
    assert "stopped" in outcomes, outcomes
    assert world.cli("check").code == 0


def test_a_daemon_stopped_during_a_clients_import_undoes_it_and_says_so_to_the_client(world, serving):
    image = os.urandom(256 * CHUNK) * 64
    (world.work / "big").write_bytes(image)
    client = world.popen("import", "big", "k", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_import(serving, world.work / "big")
    assert serving.stop()[0] == 0
    _, err = client.communicate(timeout=TIMEOUT)
    with cowstore.open(world.store) as s:
        names = [i.name for i in s.walk()]
        assert s.check().ok
    if "k" in names:
        assert client.returncode == 0
    else:
        assert (client.returncode, err) == (143, b"cowstore: terminated\n")
        assert names == ["base", "child", "look"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--mount", "nowhere"], "mount point nowhere is not a directory"),
        (["--mount", ".", "--export", "child"], "--export is for NBD: add --listen or --socket"),
    ],
)
def test_serve_mount_refuses_what_it_cannot_serve(world, capsys, monkeypatch, args, says):
    monkeypatch.chdir(world.work)
    assert cli.main(["--store", str(world.store), "serve", *args]) == 1
    assert says in capsys.readouterr().err


def test_a_store_path_too_long_for_a_socket_address_still_gets_its_control_socket(tmp_path):
    deep = tmp_path / ("d" * 100) / "store"
    deep.mkdir(parents=True)
    assert len(str(deep / control.SOCKET_NAME)) > 108
    with control.Server(deep, lambda request: 7):
        sock = control.connect(deep)
        assert sock is not None
        with sock:
            control.send(sock, {"argv": []}, [1, 2])
            assert control.receive(sock) == ({"accepted": os.getpid()}, [])
            assert control.receive(sock) == ({"exit": 7}, [])
    assert control.connect(deep) is None
