"""The NBD server against the real clients: nbdinfo, nbdcopy, qemu-io, qemu-img and fio.

Each client runs as a subprocess with a timeout. Outside CI a missing tool skips its
test; in CI (`CI` set) it fails, because `.ci/run` installs them all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

import cowstore
from cowstore import nbd
from tests.nbd.chain import CHUNK, Chain

SIZE = 8 * 1024 * 1024
TIMEOUT = 120


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is required in CI (install qemu-utils, libnbd-bin and fio)")
        pytest.skip(f"{tool} is not installed")
    return path


def run(*argv: str, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    need(argv[0])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd)
    if check and proc.returncode:
        raise AssertionError(f"{argv} failed with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def chain() -> Iterator[Chain]:
    """A `Chain` with baseview, a view of base, too."""
    store = cowstore.memory(chunk_size=CHUNK, default_size=SIZE)
    chain = Chain(store, SIZE)
    chain.view("baseview", "base")
    yield chain
    store.close()


@pytest.fixture
def server(chain) -> Iterator[nbd.Server]:
    directory = tempfile.mkdtemp(prefix="nbd")
    srv = nbd.Server(chain.store, socket_path=os.path.join(directory, "s"), shutdown_timeout=5)
    srv.start_in_thread()
    yield srv
    srv.stop()
    os.rmdir(directory)


def uri(server: nbd.Server, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={server.address}"


def test_nbdinfo_lists_every_export_with_size_and_flags(server):
    listing = json.loads(run("nbdinfo", "--list", "--json", uri(server)).stdout)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert sorted(exports) == ["baseview", "midview", "top"]
    assert listing["structured"] is True
    top, view = exports["top"], exports["midview"]
    assert top["export-size"] == view["export-size"] == SIZE
    assert top["is_read_only"] is False and view["is_read_only"] is True
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_multi_conn", "can_df"):
        assert top[flag] is True, flag
    assert view["can_trim"] is False and view["can_zero"] is False
    assert top["block_size_preferred"] == CHUNK
    assert top["block_size_maximum"] == nbd.MAX_PAYLOAD
    assert set(top["contexts"]) == {"base:allocation", "qemu:allocation-depth"}


def test_nbdinfo_over_tcp_reports_the_size(chain):
    with nbd.Server(chain.store, port=0) as srv:
        srv.start_in_thread()
        host, port = srv.address
        assert run("nbdinfo", "--size", f"nbd://{host}:{port}/top").stdout.strip() == str(SIZE)


def extents(server: nbd.Server, export: str, context: str) -> list[tuple[int, int, int]]:
    out = run("nbdinfo", f"--map={context}", "--json", uri(server, export)).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def test_nbdinfo_map_reports_data_and_holes_of_a_three_layer_chain(server):
    hole = 3
    assert extents(server, "top", "base:allocation") == [
        (0, 3 * CHUNK, 0),
        (3 * CHUNK, CHUNK, hole),
        (4 * CHUNK, CHUNK, 0),
        (5 * CHUNK, SIZE - 5 * CHUNK, hole),
    ]
    assert extents(server, "baseview", "base:allocation") == [
        (0, 2 * CHUNK, 0),
        (2 * CHUNK, SIZE - 2 * CHUNK, hole),
    ]


def test_nbdinfo_map_reports_the_allocation_depth_of_each_layer(server):
    assert extents(server, "top", "qemu:allocation-depth") == [
        (0, 2 * CHUNK, 3),
        (2 * CHUNK, CHUNK, 2),
        (3 * CHUNK, CHUNK, 0),
        (4 * CHUNK, CHUNK, 1),
        (5 * CHUNK, SIZE - 5 * CHUNK, 0),
    ]
    assert extents(server, "midview", "qemu:allocation-depth") == [
        (0, 2 * CHUNK, 3),
        (2 * CHUNK, CHUNK, 2),
        (3 * CHUNK, SIZE - 3 * CHUNK, 0),
    ]


def test_qemu_io_writes_unaligned_patterns_and_reads_them_back(server, chain):
    writes = [(0x5A, 1000, 3000), (0xA5, 70_000, 70_000), (0x3C, 5 * CHUNK - 7, 7 + 3 * CHUNK + 11)]
    commands = []
    for value, offset, length in writes:
        commands += ["-c", f"write -P {value:#x} {offset} {length}"]
    for value, offset, length in writes:
        commands += ["-c", f"read -P {value:#x} {offset} {length}"]
    out = run("qemu-io", "-f", "raw", *commands, uri(server, "top")).stdout
    assert "Pattern verification failed" not in out
    top = chain.model["top"]
    for value, offset, length in writes:
        top[offset : offset + length] = bytes([value]) * length
    assert chain.content("top") == top
    assert chain.content("midview") == chain.model["midview"]
    assert chain.content("baseview") == chain.model["baseview"]


def test_qemu_io_read_pattern_detects_a_mismatch(server):
    proc = run("qemu-io", "-f", "raw", "-c", "read -P 0x01 0 512", uri(server, "top"), check=False)
    assert proc.returncode != 0
    assert "Pattern verification failed" in proc.stdout


def test_qemu_img_convert_copies_an_export_to_a_raw_file(server, chain, tmp_path):
    out = tmp_path / "top.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(server, "top"), str(out))
    assert out.read_bytes() == chain.model["top"]


def test_nbdcopy_copies_an_export_to_a_raw_file(server, chain, tmp_path):
    out = tmp_path / "mid.raw"
    run("nbdcopy", uri(server, "midview"), str(out))
    assert out.read_bytes() == chain.model["midview"]


def test_qemu_img_convert_into_an_active_export_and_back(server, chain, tmp_path):
    source = bytearray(SIZE)
    source[100 : 100 + 200_000] = os.urandom(200_000)
    source[3 * 1024 * 1024 + 5 : 3 * 1024 * 1024 + 5 + 3 * CHUNK] = os.urandom(3 * CHUNK)
    src = tmp_path / "src.raw"
    src.write_bytes(source)
    chain.store.prepare("dest", size=SIZE)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri(server, "dest"))
    assert chain.content("dest") == source
    volume = chain.store.mounts("dest")
    allocated = sum(e.length for e in volume.block_status(0, SIZE) if e.allocated)
    assert allocated <= 8 * CHUNK, "zero ranges of the source stay unallocated"
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(server, "dest"), str(back))
    assert back.read_bytes() == source


def test_nbdcopy_writes_over_several_connections_into_an_active_export(server, chain, tmp_path):
    source = os.urandom(SIZE)
    src = tmp_path / "src.raw"
    src.write_bytes(source)
    chain.store.prepare("dest", size=SIZE)
    run("nbdcopy", "--connections=4", "--flush", str(src), uri(server, "dest"))
    assert chain.content("dest") == source


def test_fio_randrw_with_crc32c_verification_passes(server, chain, tmp_path):
    chain.store.prepare("fio", size=SIZE)
    proc = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={uri(server, 'fio')}",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=16",
        f"--size={SIZE}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--runtime=60",
        cwd=tmp_path,
    )
    assert "err= 0" in proc.stdout
    assert "verify" not in proc.stderr.lower()


def test_a_view_export_refuses_writes(server, chain, tmp_path):
    proc = run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4096", uri(server, "midview"), check=False)
    assert proc.returncode != 0
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x22" * CHUNK)
    proc = run("nbdcopy", str(src), uri(server, "midview"), check=False)
    assert proc.returncode != 0
    assert "read-only" in proc.stderr
    assert chain.content("midview") == chain.model["midview"]
