"""The `cowstore` command line: every subcommand, its JSON against the Python API, and its errors."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

import cowstore
from cowstore import cli, rawimage
from cowstore.check import CheckReport
from tests.conftest import CHUNK, SIZE
from tests.console import command, env
from tests.tools import need


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def run(path, capsys):
    """Runs `cowstore --store PATH ARGS...` in-process and returns its exit code and output."""

    def run(*args: str) -> Run:
        capsys.readouterr()
        code = cli.main(["--store", str(path), *args])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run


@pytest.fixture
def store_at(path):
    """Opens the CLI's store with the Python API (closing it, and so unlocking, at the end)."""
    opened = []

    def open_store(**kw) -> cowstore.Store:
        s = cowstore.open(path, **kw)
        opened.append(s)
        return s

    yield open_store
    for s in opened:
        s.close()


@pytest.fixture
def made(run, path):
    """An initialized store of 4 KiB chunks and 1 MiB snapshots."""
    assert run("init", "--chunk-size", "4K", "--default-size", "1M").code == 0
    return path


def build(path: Path, steps) -> None:
    with cowstore.open(path) as s:
        steps(s)


def base_and_child(s: cowstore.Store) -> None:
    """base: data in chunks 1-3; child: chunk 3 rewritten, chunk 2 zeroed, chunk 5 written."""
    vol = s.prepare("b", labels={"layer": "base"})
    vol.pwrite(b"a" * CHUNK + b"b" * CHUNK + b"c" * CHUNK, CHUNK)
    s.commit("base", "b", labels={"layer": "base"})
    child = s.prepare("child", "base", labels={"layer": "top"})
    child.pwrite(b"C" * CHUNK, 3 * CHUNK)
    child.write_zeroes(2 * CHUNK, CHUNK)
    child.pwrite(b"e" * CHUNK, 5 * CHUNK)
    s.view("look", "base")


def one_error_line(r: Run) -> str:
    lines = r.err.splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("cowstore: error: "), r.err
    assert "Traceback" not in r.err
    return lines[0]


def sparse_image(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    """A sparse file of `size` bytes holding `pieces` at their offsets, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)


# -- init and the store's location --------------------------------------------


def test_init_creates_a_store_with_the_given_sizes(run, store_at):
    r = run("--json", "init", "--chunk-size", "8KiB", "--default-size", "2M")
    assert r.code == 0
    assert (r.json["created"], r.json["chunk_size"], r.json["default_size"]) == (True, 8192, 2 << 20)
    s = store_at()
    assert (s.chunk_size, s.default_size) == (8192, 2 << 20)


def test_init_max_bytes_limits_the_pool_and_zero_lifts_it(run, store_at):
    r = run("--json", "init", "--chunk-size", "4K", "--max-bytes", "8K")
    assert r.code == 0 and r.json["max_bytes"] == 8192
    s = store_at()
    assert s.max_bytes == 8192
    s.close()
    assert run("--json", "init", "--max-bytes", "0").json["max_bytes"] is None


def test_init_refuses_a_limit_below_one_chunk_or_below_what_the_pool_holds(run, made, store_at):
    build(made, base_and_child)
    r = run("init", "--max-bytes", "1K")
    assert r.code == 1 and "one chunk" in one_error_line(r)
    r = run("init", "--max-bytes", "8K")
    assert r.code == 1 and "below the" in one_error_line(r)
    assert store_at().max_bytes is None


def test_init_names_the_pool_limit(run, made):
    assert "pool limit 1 MiB" in run("init", "--max-bytes", "1M").out
    assert "no pool limit" in run("init", "--max-bytes", "0").out


def test_init_of_an_existing_store_with_its_settings_succeeds(run, made):
    r = run("init", "--chunk-size", "4096", "--json")
    assert r.code == 0 and r.json["created"] is False and r.json["chunk_size"] == CHUNK


def test_init_of_an_existing_store_with_other_settings_fails(run, made):
    r = run("init", "--chunk-size", "64K")
    assert r.code == 1
    assert "chunk_size" in one_error_line(r)


def test_init_creates_missing_parent_directories(tmp_path, capsys):
    deep = tmp_path / "a" / "b" / "store"
    assert cli.main(["--store", str(deep), "init"]) == 0
    assert (deep / "meta.sqlite").exists()


def test_store_path_comes_from_cowstore_store_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("COWSTORE_STORE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.default_store_path() == tmp_path / "env"
    monkeypatch.delenv("COWSTORE_STORE")
    assert cli.default_store_path() == tmp_path / "xdg" / "cowstore"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert cli.default_store_path() == tmp_path / "home" / ".local" / "share" / "cowstore"


def test_commands_without_store_option_use_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COWSTORE_STORE", str(tmp_path / "env"))
    assert cli.main(["init"]) == 0
    assert cli.main(["prepare", "a"]) == 0
    with cowstore.open(tmp_path / "env") as s:
        assert [i.name for i in s.walk()] == ["a"]


def test_a_missing_store_is_a_one_line_error_naming_init(run):
    r = run("ls")
    assert r.code == 1
    assert "cowstore init" in one_error_line(r)


# -- sizes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("64K", 65536),
        ("64KiB", 65536),
        ("64kb", 65536),
        ("1.5G", 3 << 29),
        ("2T", 2 << 40),
        ("512B", 512),
        ("1 MiB", 1 << 20),
    ],
)
def test_sizes_take_binary_suffixes(text, size):
    assert cli.parse_size(text) == size


@pytest.mark.parametrize("text", ["5X", "1.5", "-1", "K", "64iB", ""])
def test_malformed_sizes_are_refused(text):
    with pytest.raises(cli.UsageError):
        cli.parse_size(text)


def test_a_bad_size_suffix_is_a_one_line_error(run, made, store_at):
    r = run("prepare", "a", "--size", "5X")
    assert r.code == 1
    assert "invalid size '5X'" in one_error_line(r)
    assert list(store_at().walk()) == []


# -- snapshotter commands --------------------------------------------------------


def test_prepare_commit_view_build_what_the_api_sees(run, made, store_at):
    assert run("prepare", "a", "--size", "64K", "--label", "x=1", "--label", "y=2").code == 0
    assert run("commit", "img", "a", "--label", "image=demo").code == 0
    assert run("prepare", "ctr", "img").code == 0
    assert run("view", "v", "img", "--label", "ro=yes").code == 0
    s = store_at()
    got = {i.name: (i.kind, i.parent, i.labels, i.size) for i in s.walk()}
    assert got == {
        "img": (cowstore.Kind.COMMITTED, None, {"image": "demo"}, 65536),
        "ctr": (cowstore.Kind.ACTIVE, "img", {}, 65536),
        "v": (cowstore.Kind.VIEW, "img", {"ro": "yes"}, 65536),
    }


def test_prepare_json_reports_the_new_snapshot(run, made):
    r = run("prepare", "a", "--json")
    assert r.code == 0
    assert (r.json["name"], r.json["kind"], r.json["size"]) == ("a", "active", SIZE)


def test_prepare_of_an_existing_key_is_a_one_line_error(run, made):
    run("prepare", "a")
    r = run("prepare", "a")
    assert r.code == 1
    assert "already exists" in one_error_line(r)


def test_ls_json_matches_walk(run, made, store_at):
    build(made, base_and_child)
    r = run("--json", "ls")
    assert r.code == 0
    s = store_at()
    expected = list(s.walk())
    assert [o["name"] for o in r.json] == [i.name for i in expected]
    for obj, info in zip(r.json, expected, strict=True):
        assert obj["kind"] == info.kind.value
        assert obj["parent"] == info.parent
        assert obj["labels"] == info.labels
        assert obj["size"] == info.size
        assert datetime.fromisoformat(obj["created"]) == info.created
        assert datetime.fromisoformat(obj["updated"]) == info.updated


def test_ls_table_shows_a_header_and_one_row_per_snapshot(run, made):
    build(made, base_and_child)
    lines = run("ls").out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "PARENT", "SIZE", "CREATED", "LABELS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"base", "child", "look"}
    assert rows["child"][1:4] == ["active", "base", "1"] and rows["child"][-1] == "layer=top"


def test_ls_filters_select_and_several_filters_match_any(run, made):
    build(made, base_and_child)
    assert [o["name"] for o in run("ls", "--json", "kind==view").json] == ["look"]
    assert [o["name"] for o in run("ls", "--json", "kind==view", "labels.layer==top").json] == [
        "child",
        "look",
    ]


def test_a_bad_filter_is_a_one_line_error(run, made):
    r = run("ls", "kind==")
    assert r.code == 1
    assert "filter" in one_error_line(r)


def test_stat_json_matches_the_api(run, made, store_at):
    build(made, base_and_child)
    r = run("stat", "child", "--json")
    info = store_at().stat("child")
    assert r.code == 0
    assert r.json["parent"] == "base" and r.json["labels"] == info.labels and r.json["size"] == info.size
    assert datetime.fromisoformat(r.json["created"]) == info.created


def test_stat_human_output_names_each_field(run, made):
    build(made, base_and_child)
    out = run("stat", "child").out
    assert "kind:     active" in out and "parent:   base" in out and "layer=top" in out


@pytest.mark.parametrize(
    "args",
    [
        ["stat", "nope"],
        ["usage", "nope"],
        ["map", "nope"],
        ["diff", "nope", "base"],
        ["rm", "nope"],
        ["label", "nope", "a=1"],
        ["export", "nope", "out.raw"],
        ["commit", "c", "nope"],
    ],
)
def test_a_missing_snapshot_is_a_one_line_error(run, made, args, tmp_path):
    build(made, base_and_child)
    r = run(*[str(tmp_path / a) if a.endswith(".raw") else a for a in args])
    assert r.code == 1
    assert "'nope' does not exist" in one_error_line(r)


def test_label_sets_and_deletes_single_labels(run, made, store_at):
    build(made, base_and_child)
    assert run("label", "child", "a=1", "b=2").code == 0
    r = run("label", "child", "a=", "layer=new", "--json")
    assert r.code == 0 and r.json["labels"] == {"b": "2", "layer": "new"}
    assert store_at().stat("child").labels == {"b": "2", "layer": "new"}


def test_label_without_pairs_prints_the_labels(run, made):
    build(made, base_and_child)
    assert run("label", "child").out == "layer=top\n"


def test_a_label_without_equals_is_a_one_line_error(run, made):
    build(made, base_and_child)
    r = run("label", "child", "novalue")
    assert r.code == 1
    assert "KEY=VALUE" in one_error_line(r)


def test_rm_removes_children_before_their_parents(run, made, store_at):
    build(made, base_and_child)
    assert run("rm", "base", "child", "look").code == 0
    assert list(store_at().walk()) == []


def test_rm_removes_what_it_can_and_reports_each_key(run, made, store_at):
    build(made, base_and_child)
    r = run("rm", "nope", "look")
    assert r.code == 1
    assert "'nope'" in one_error_line(r) and r.out.splitlines() == ["removed look"]
    assert [i.name for i in store_at().walk()] == ["base", "child"]


def test_rm_json_reports_each_key(run, made):
    build(made, base_and_child)
    r = run("--json", "rm", "base", "child", "nope")
    assert r.code == 1
    assert [(e["key"], e["removed"]) for e in r.json] == [("base", False), ("child", True), ("nope", False)]
    assert r.json[0]["error"]["kind"] == "FailedPrecondition" and r.json[2]["error"]["kind"] == "NotFound"


def test_errors_are_a_json_object_on_stderr_with_json(run, made):
    r = run("--json", "stat", "nope")
    assert r.code == 1 and r.out == ""
    error = json.loads(r.err)["error"]
    assert error["kind"] == "NotFound" and "'nope'" in error["message"]


def test_rm_of_a_parent_with_children_left_fails(run, made, store_at):
    build(made, base_and_child)
    r = run("rm", "base")
    assert r.code == 1 and "children" in one_error_line(r)
    assert store_at().stat("base").name == "base"


def test_usage_json_matches_the_api(run, made, store_at):
    build(made, base_and_child)
    r = run("--json", "usage", "child")
    u = store_at().usage("child")
    assert r.json == {"size": u.size, "chunks": u.chunks} and u.chunks == 2


def test_df_json_matches_stats_and_the_data_file(run, made, store_at):
    build(made, base_and_child)
    r = run("df", "--json")
    assert r.code == 0
    data = os.stat(made / "data")
    assert (r.json["disk_bytes"], r.json["apparent_bytes"]) == (data.st_blocks * 512, data.st_size)
    stats = store_at().stats()
    assert (r.json["chunk_size"], r.json["snapshots"], r.json["used"]) == (CHUNK, 3, stats.used)
    assert r.json["logical_bytes"] == stats.logical_bytes
    assert r.json["kinds"] == {"view": 1, "active": 1, "committed": 1}


def test_df_human_output_shows_chunk_size_and_snapshots(run, made):
    build(made, base_and_child)
    out = run("df").out
    assert "chunk size:     4 KiB" in out and "snapshots:      3 (1 view, 1 active, 1 committed)" in out


def test_tree_lists_parents_before_children_with_usage(run, made):
    build(made, base_and_child)
    tree = run("tree", "--json").json
    assert [n["name"] for n in tree] == ["base", "child", "look"]
    nodes = {n["name"]: n for n in tree}
    assert nodes["base"]["usage"] == {"size": 3 * CHUNK, "chunks": 3}
    assert (nodes["base"]["parent"], nodes["base"]["children"]) == (None, ["child", "look"])
    assert nodes["child"]["usage"]["chunks"] == 2 and nodes["child"]["kind"] == "active"
    assert nodes["child"]["parent"] == "base"
    lines = run("tree").out.splitlines()
    assert lines[0].startswith("base  (committed, 1 MiB, exclusive 12 KiB)")
    assert lines[1].startswith("├── child") and lines[2].startswith("└── look")


def test_tree_of_a_chain_1024_deep_neither_recurses_nor_indents_by_depth(run, made, store_at):
    s = store_at()
    parent = None
    for n in range(1024):
        s.prepare(f"w{n}", parent, size=None if parent else 64 * CHUNK)
        s.commit(f"l{n}", f"w{n}")
        parent = f"l{n}"
    s.close()
    tree = run("tree", "--json").json
    assert [n["name"] for n in tree] == [f"l{n}" for n in range(1024)]
    assert tree[-1]["parent"] == "l1022" and tree[0]["children"] == ["l1"]
    lines = run("tree").out.splitlines()
    assert len(lines) == 1024 and lines[1].startswith("↳ l1  ") and lines[-1].startswith("↳ l1023  ")


# -- map and diff -----------------------------------------------------------------


def test_map_json_gives_qemu_img_map_extents(run, made):
    build(made, base_and_child)
    got = run("--json", "map", "child").json
    assert got == [
        {"start": 0, "length": CHUNK, "depth": 1, "present": False, "zero": True, "data": False},
        {"start": CHUNK, "length": CHUNK, "depth": 1, "present": True, "zero": False, "data": True},
        {"start": 2 * CHUNK, "length": CHUNK, "depth": 0, "present": True, "zero": True, "data": False},
        {"start": 3 * CHUNK, "length": CHUNK, "depth": 0, "present": True, "zero": False, "data": True},
        {"start": 4 * CHUNK, "length": CHUNK, "depth": 1, "present": False, "zero": True, "data": False},
        {"start": 5 * CHUNK, "length": CHUNK, "depth": 0, "present": True, "zero": False, "data": True},
        {
            "start": 6 * CHUNK,
            "length": SIZE - 6 * CHUNK,
            "depth": 1,
            "present": False,
            "zero": True,
            "data": False,
        },
    ]


def test_map_of_a_committed_snapshot_leaves_no_trace(run, made, store_at):
    build(made, base_and_child)
    got = run("map", "--json", "base").json
    assert [(e["start"], e["length"], e["present"]) for e in got] == [
        (0, CHUNK, False),
        (CHUNK, 3 * CHUNK, True),
        (4 * CHUNK, SIZE - 4 * CHUNK, False),
    ]
    assert [i.name for i in store_at().walk()] == ["base", "child", "look"]


def test_map_table_names_the_layer_of_each_extent(run, made):
    build(made, base_and_child)
    rows = [line.split() for line in run("map", "child").out.splitlines()]
    assert rows[0] == ["START", "LENGTH", "STATE", "LAYER"]
    assert rows[2] == [str(CHUNK), str(CHUNK), "data", "base"]
    assert rows[3] == [str(2 * CHUNK), str(CHUNK), "zero", "child"]


def _merged(extents: list[dict]) -> list[dict]:
    keys = ("depth", "present", "zero", "data")
    out: list[dict] = []
    for e in extents:
        e = {k: e[k] for k in ("start", "length", *keys)}
        if (
            out
            and all(out[-1][k] == e[k] for k in keys)
            and out[-1]["start"] + out[-1]["length"] == e["start"]
        ):
            out[-1]["length"] += e["length"]
        else:
            out.append(e)
    return out


def test_map_json_equals_qemu_img_map_of_the_same_qcow2_chain(run, made, tmp_path):
    need("qemu-img", "qemu-io")
    build(made, base_and_child)
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    quiet = {"check": True, "capture_output": True}
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CHUNK}", base, str(SIZE)], **quiet
    )
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write {CHUNK} {3 * CHUNK}", base], **quiet)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"cluster_size={CHUNK}",
            "-b",
            base,
            "-F",
            "qcow2",
            top,
        ],
        **quiet,
    )
    for op in (f"write {3 * CHUNK} {CHUNK}", f"write -z {2 * CHUNK} {CHUNK}", f"write {5 * CHUNK} {CHUNK}"):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", op, top], **quiet)
    qemu = json.loads(subprocess.run(["qemu-img", "map", "--output=json", top], **quiet, text=True).stdout)
    assert _merged(run("--json", "map", "child").json) == _merged(qemu)


def test_diff_reports_differing_byte_ranges_and_their_total(run, made, store_at):
    build(made, base_and_child)
    r = run("--json", "diff", "base", "child")
    assert r.code == 0
    assert r.json == {
        "ranges": [{"offset": 2 * CHUNK, "length": 2 * CHUNK}, {"offset": 5 * CHUNK, "length": CHUNK}],
        "total": 3 * CHUNK,
    }
    assert [(o["offset"], o["length"]) for o in r.json["ranges"]] == store_at().diff("base", "child")


def test_diff_ranges_end_at_the_snapshot_size(run, made):
    def steps(s: cowstore.Store) -> None:
        s.prepare("a", size=2 * CHUNK + 100).pwrite(b"x", 2 * CHUNK)
        s.commit("odd", "a")
        s.prepare("b", "odd").pwrite(b"y", 2 * CHUNK + 99)

    build(made, steps)
    assert run("--json", "diff", "odd", "b").json == {
        "ranges": [{"offset": 2 * CHUNK, "length": 100}],
        "total": 100,
    }


def test_diff_human_output_ends_with_the_total(run, made):
    build(made, base_and_child)
    assert run("diff", "base", "child").out.splitlines()[-1] == "total: 12 KiB (12288 bytes) in 2 ranges"
    assert run("diff", "base", "look").out == "no differences\n"


# -- import and export ----------------------------------------------------------------


IMAGE_SIZE = 64 * CHUNK + 1000


def image_pieces() -> dict[int, bytes]:
    """Data in chunks 2, 3 and 40, a partial last chunk, and an explicitly written zero chunk 10."""
    return {
        2 * CHUNK: os.urandom(2 * CHUNK),
        10 * CHUNK: bytes(CHUNK),
        40 * CHUNK + 100: b"middle",
        64 * CHUNK: b"t" * 1000,
    }


def test_import_then_export_round_trips_a_sparse_image(run, made, store_at, tmp_path):
    image, out = tmp_path / "disk.raw", tmp_path / "out.raw"
    sparse_image(image, IMAGE_SIZE, image_pieces())
    r = run("import", str(image), "work", "--commit", "img", "--label", "src=disk", "--json")
    assert r.code == 0 and r.err == ""
    assert r.json["written"] == 3 * CHUNK + 1000 and r.json["size"] == IMAGE_SIZE
    s = store_at()
    info = s.stat("img")
    assert (info.kind, info.size, info.labels) == (cowstore.Kind.COMMITTED, IMAGE_SIZE, {"src": "disk"})
    assert s.usage("img").chunks == 4
    s.close()
    r = run("export", "img", str(out))
    assert r.code == 0
    assert out.read_bytes() == image.read_bytes()
    assert os.stat(out).st_blocks * 512 <= 4 * CHUNK
    assert [i.name for i in store_at().walk()] == ["img"]


def test_holes_are_found_with_seek_data_and_widened_to_chunks(tmp_path):
    image = tmp_path / "disk.raw"
    sparse_image(image, IMAGE_SIZE, image_pieces())
    fd = os.open(image, os.O_RDONLY)
    try:
        ranges = list(rawimage.data_ranges(fd, IMAGE_SIZE, CHUNK))
    finally:
        os.close(fd)
    assert ranges == [
        (2 * CHUNK, 4 * CHUNK),
        (10 * CHUNK, 11 * CHUNK),
        (40 * CHUNK, 41 * CHUNK),
        (64 * CHUNK, IMAGE_SIZE),
    ]


def test_import_and_export_memory_does_not_grow_with_the_image(run, made, tmp_path):
    image, out = tmp_path / "big.raw", tmp_path / "out.raw"
    image.write_bytes(os.urandom(4 << 20))
    tracemalloc.start()
    try:
        assert run("import", str(image), "big", "--commit", "img").code == 0
        _, imported = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert run("export", "img", str(out)).code == 0
        _, exported = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert imported < 1 << 20 and exported < 1 << 20
    assert out.read_bytes() == image.read_bytes()


def test_progress_shows_percentages_on_a_terminal_without_tqdm(run, made, tmp_path, monkeypatch):
    class Terminal:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            pass

    terminal = Terminal()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(sys, "stderr", terminal)
    image = tmp_path / "disk.raw"
    sparse_image(image, IMAGE_SIZE, image_pieces())
    assert run("import", str(image), "w").code == 0
    shown, _, cleared = terminal.text.rpartition("\r")
    percents = [int(p.removeprefix("import w: ").removesuffix("%")) for p in shown.split("\r")[1:]]
    assert len(percents) > 2 and percents == sorted(percents) and percents[-1] == 100
    assert cleared == "\033[K"


def test_export_of_an_active_snapshot_writes_its_current_bytes(run, made, tmp_path):
    build(made, base_and_child)
    out = tmp_path / "child.raw"
    assert run("export", "child", str(out)).code == 0
    want = bytes(CHUNK) + b"a" * CHUNK + bytes(CHUNK) + b"C" * CHUNK + bytes(CHUNK) + b"e" * CHUNK
    data = out.read_bytes()
    assert len(data) == SIZE and data[: 6 * CHUNK] == want and data[6 * CHUNK :] == bytes(SIZE - 6 * CHUNK)


def test_export_replaces_an_existing_file_only_with_force(run, made, tmp_path):
    build(made, base_and_child)
    out = tmp_path / "old.raw"
    out.write_bytes(b"x" * (2 * SIZE))
    r = run("export", "base", str(out))
    assert r.code == 1 and str(out) in one_error_line(r) and "--force" in one_error_line(r)
    assert out.read_bytes() == b"x" * (2 * SIZE)
    assert run("export", "base", str(out), "--force").code == 0
    data = out.read_bytes()
    assert len(data) == SIZE and data[:CHUNK] == bytes(CHUNK)


def test_export_to_standard_output_reports_on_standard_error(made, tmp_path):
    build(made, base_and_child)
    with cowstore.open(made) as s:
        want = s.reader("base").pread(SIZE, 0)
    done = subprocess.run(
        [*command(), "--store", str(made), "export", "base", "-"], env=env(), capture_output=True, check=True
    )
    assert done.stdout == want
    assert b"exported base to -" in done.stderr


def test_import_committing_under_its_own_key_fails_before_copying(run, made, store_at, tmp_path):
    sparse_image(tmp_path / "img", SIZE, image_pieces())
    r = run("import", str(tmp_path / "img"), "k", "--commit", "k")
    assert r.code == 1 and "'k'" in one_error_line(r)
    assert list(store_at().walk()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_any_moment_of_an_import_leaves_all_or_nothing(made, tmp_path, signum):
    image = os.urandom(256 * CHUNK) * 64
    (tmp_path / "img").write_bytes(image)
    rng = random.Random(signum)
    outcomes = []
    for _ in range(6):
        child = subprocess.Popen(
            [*command(), "--store", str(made), "import", str(tmp_path / "img"), "k"],
            env=env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        # Once the child holds the store (its pid in the lock file), the import is under way.
        deadline = time.monotonic() + 30
        while (made / "lock").read_text().strip() != str(child.pid) and child.poll() is None:
            assert time.monotonic() < deadline, "the import never opened the store"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.4))
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
        with cowstore.open(made) as s:
            names = [i.name for i in s.walk()]
            if names:
                # The import was complete (the signal may have come after it, at exit).
                assert names == ["k"] and s.reader("k").pread(len(image), 0) == image
                outcomes.append("complete")
            else:
                assert child.returncode != 0
                assert b"interrupted" in err or b"terminated" in err, err
                outcomes.append("stopped")
            assert s.check(data=True).ok
            if names:
                s.remove("k")
    assert "stopped" in outcomes, outcomes


def test_qemu_img_compare_finds_the_export_identical_to_the_original(run, made, tmp_path):
    need("qemu-img")
    image, out = tmp_path / "disk.raw", tmp_path / "out.raw"
    sparse_image(image, IMAGE_SIZE, image_pieces())
    assert run("import", str(image), "work", "--commit", "img").code == 0
    assert run("export", "img", str(out)).code == 0
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", image, out], capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_import_onto_a_parent_stores_only_chunks_that_differ(run, made, store_at, tmp_path):
    old, new, out = tmp_path / "old.raw", tmp_path / "new.raw", tmp_path / "out.raw"
    first = {0: os.urandom(8 * CHUNK)}
    sparse_image(old, 8 * CHUNK, first)
    assert run("import", str(old), "w", "--commit", "v1").code == 0
    changed = bytearray(first[0])
    changed[CHUNK : CHUNK + 5] = b"fresh"
    changed[3 * CHUNK : 4 * CHUNK] = bytes(CHUNK)
    sparse_image(new, 6 * CHUNK, {0: bytes(changed[: 5 * CHUNK])})
    r = run("import", str(new), "w", "--parent", "v1", "--commit", "v2", "--json")
    assert r.code == 0
    assert (r.json["written"], r.json["zeroed"]) == (CHUNK, 2 * CHUNK)
    s = store_at()
    assert s.usage("v2").chunks == 1
    assert s.stat("v2").parent == "v1"
    assert s.diff("v1", "v2") == [(CHUNK, CHUNK), (3 * CHUNK, CHUNK), (5 * CHUNK, CHUNK)]
    s.close()
    assert run("export", "v2", str(out)).code == 0
    assert out.read_bytes() == bytes(changed[: 5 * CHUNK]) + bytes(CHUNK) + first[0][6 * CHUNK :]


def test_import_larger_than_its_parent_is_refused(run, made, store_at, tmp_path):
    small, big = tmp_path / "small.raw", tmp_path / "big.raw"
    sparse_image(small, CHUNK, {0: b"s"})
    sparse_image(big, 2 * CHUNK, {0: b"b"})
    assert run("import", str(small), "w", "--commit", "v1").code == 0
    r = run("import", str(big), "w2", "--parent", "v1")
    assert r.code == 1 and "larger than parent" in one_error_line(r)
    assert [i.name for i in store_at().walk()] == ["v1"]


def test_a_failed_import_leaves_no_snapshot_behind(run, made, store_at, tmp_path):
    store_at(max_bytes=2 * CHUNK).close()
    image = tmp_path / "disk.raw"
    sparse_image(image, 8 * CHUNK, {0: os.urandom(8 * CHUNK)})
    r = run("import", str(image), "w", "--commit", "img")
    assert r.code == 1
    one_error_line(r)
    assert list(store_at().walk()) == []


def test_import_refuses_a_commit_name_in_use_before_copying(run, made, store_at, tmp_path):
    build(made, base_and_child)
    image = tmp_path / "disk.raw"
    sparse_image(image, CHUNK, {0: b"x"})
    r = run("import", str(image), "w", "--commit", "base")
    assert r.code == 1 and "already exists" in one_error_line(r)
    assert "w" not in {i.name for i in store_at().walk()}


def test_import_of_a_missing_file_is_a_one_line_error(run, made, tmp_path):
    r = run("import", str(tmp_path / "absent.raw"), "w")
    assert r.code == 1
    assert "No such file or directory" in one_error_line(r)


# -- check --------------------------------------------------------------------------


def test_check_of_a_healthy_store_exits_0(run, made):
    build(made, base_and_child)
    r = run("check", "--data")
    assert r.code == 0 and "No errors were found" in r.out
    r = run("check", "--json")
    assert r.code == 0 and (r.json["corruptions"], r.json["leaks"]) == (0, 0)


def stray_chunks(path: Path, count: int) -> None:
    """Data past the pool's end that no map names: free chunks still holding space."""
    with open(path / "data", "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"s" * (count * CHUNK))


def test_check_reports_free_chunks_holding_space_as_ranges_not_leaks(run, made):
    build(made, base_and_child)
    with cowstore.open(made) as s:
        pool = s.stats().slots
    stray_chunks(made, 5)
    r = run("check")
    assert r.code == 0 and "No errors were found" in r.out
    assert f"5 free chunks (20 KiB) still hold space in the data file, slots {pool + 1}-{pool + 5}" in r.out
    stray_chunks(made, 5)
    r = run("check", "--json")
    assert r.code == 0
    assert (r.json["corruptions"], r.json["leaks"]) == (0, 0)
    assert r.json["reclaimable-slots"] == list(range(pool + 1, pool + 6))


def test_check_repair_gives_the_space_of_free_chunks_back(run, made):
    build(made, base_and_child)
    stray_chunks(made, 3)
    size = (made / "data").stat().st_size
    r = run("check", "--repair")
    assert r.code == 0
    assert "3 free chunks given back" in r.out and "No errors were found" in r.out
    assert (made / "data").stat().st_size == size - 3 * CHUNK
    assert run("check", "--json").json["reclaimable-slots"] == []


def test_leaked_pages_alone_are_exit_status_3():
    report = CheckReport(leaked_pages=[7])
    assert report.ok and cli.check_status(report) == cli.CHECK_LEAKS == 3


def test_check_exits_2_for_corruption_and_repair_changes_nothing(run, made):
    build(made, base_and_child)
    with sqlite3.connect(made / "meta.sqlite") as db:
        db.execute("UPDATE snapshots SET size = size - 1 WHERE key = 'child'")
    db.close()
    r = run("check")
    assert r.code == 2 and "ERROR snapshot 'child'" in r.out and "1 problem found on the store." in r.out
    r = run("check", "--repair", "--json")
    assert r.code == 2 and r.json["corruptions"] == 1


# -- errors ---------------------------------------------------------------------------


def test_a_locked_store_is_a_one_line_error_naming_the_holder(run, made, store_at):
    store_at()
    r = run("--wait", "0", "ls")
    assert r.code == 1
    assert "in use" in one_error_line(r) and f"process {os.getpid()} " in one_error_line(r)


def test_a_command_waits_for_the_store_to_be_let_go(run, made, store_at):
    held = store_at()
    threading.Timer(0.3, held.close).start()
    started = time.monotonic()
    assert run("--wait", "20", "ls").code == 0
    assert time.monotonic() - started >= 0.25


def test_an_empty_store_path_is_refused(run):
    r = run("--store", "", "ls")
    assert r.code == 1 and "--store" in one_error_line(r)


def test_concurrent_inits_create_the_store_once(tmp_path):
    path = tmp_path / "new"
    procs = [
        subprocess.Popen(
            [*command(), "--store", str(path), "--json", "init"], env=env(), stdout=subprocess.PIPE
        )
        for _ in range(4)
    ]
    results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(r["created"] for r in results) == [False, False, False, True]


def test_debug_adds_the_traceback(run, made):
    r = run("--debug", "stat", "nope")
    assert r.code == 1
    assert "Traceback" in r.err and r.err.rstrip().splitlines()[-1].startswith("cowstore: error: ")


@pytest.mark.parametrize("args", [["frobnicate"], ["stat"], ["ls", "--bogus"], []])
def test_argparse_misuse_exits_2_with_usage(run, args):
    r = run(*args)
    assert r.code == 2 and "usage:" in r.err


def test_help_exits_0(run):
    r = run("--help")
    assert r.code == 0 and "COWSTORE_STORE" in r.out and "XDG_DATA_HOME" in r.out


@pytest.mark.parametrize(
    ("text", "where"),
    [("127.0.0.1:10809", ("127.0.0.1", 10809)), ("[::1]:9000", ("::1", 9000)), (":0", ("127.0.0.1", 0))],
)
def test_listen_addresses_parse(text, where):
    assert cli.parse_listen(text) == where


@pytest.mark.parametrize("text", ["nohost", "host:99999", "[::1]", "a:b"])
def test_bad_listen_addresses_are_refused(text):
    with pytest.raises(cli.UsageError):
        cli.parse_listen(text)


# -- the real command ---------------------------------------------------------------------


def test_the_console_script_lists_snapshots_as_json(made):
    build(made, base_and_child)
    done = subprocess.run(
        [*command(), "--store", str(made), "ls", "--json", "kind==active"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [o["name"] for o in json.loads(done.stdout)] == ["child"]


def test_serve_exports_a_snapshot_that_nbdinfo_reads_and_stops_on_sigterm(made, tmp_path):
    need("nbdinfo")
    build(made, base_and_child)
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen(
        [*command(), "--store", str(made), "serve", "--socket", str(sock), "--export", "child"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        uri = f"nbd+unix:///child?socket={sock}"
        assert server.stdout is not None
        assert server.stdout.readline() == f"exporting child (read-write) at {uri}\n"
        info = json.loads(
            subprocess.run(
                ["nbdinfo", "--json", uri], capture_output=True, text=True, check=True, timeout=30
            ).stdout
        )
        assert info["exports"][0]["export-size"] == SIZE
        extents = json.loads(
            subprocess.run(
                ["nbdinfo", "--map", "--json", uri], capture_output=True, text=True, check=True, timeout=30
            ).stdout
        )
        data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
        assert data == [(CHUNK, CHUNK), (3 * CHUNK, CHUNK), (5 * CHUNK, CHUNK)]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
    assert server.returncode == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--export", "nope"], "--export nope: no snapshot has that key"),
        (["--export", "base"], "--export base: it is committed"),
        (["--listen", "0.0.0.0:0"], "--allow-remote"),
    ],
)
def test_serve_refuses_what_it_cannot_serve_naming_the_option(run, made, args, says):
    build(made, base_and_child)
    r = run("serve", *args)
    assert r.code == 1 and says in one_error_line(r)


def test_serve_refuses_a_socket_path_it_cannot_use_naming_it(run, made, tmp_path):
    build(made, base_and_child)
    missing = tmp_path / "no" / "such" / "dir" / "s"
    r = run("serve", "--socket", str(missing))
    assert (
        r.code == 1 and f"--socket {missing}" in one_error_line(r) and "does not exist" in one_error_line(r)
    )
    regular = tmp_path / "file"
    regular.write_text("keep me")
    r = run("serve", "--socket", str(regular))
    assert r.code == 1 and f"--socket {regular}" in one_error_line(r)
    assert regular.read_text() == "keep me"


def test_export_verify_refuses_a_chunk_that_fails_its_sum(run, made, tmp_path):
    build(made, base_and_child)
    with open(made / "data", "r+b") as f:
        f.seek(0)
        f.write(b"X")
    assert run("export", "base", str(tmp_path / "plain.raw")).code == 0
    r = run("export", "base", str(tmp_path / "checked.raw"), "--verify")
    assert r.code == 1 and "'base'" in one_error_line(r) and "checksum" in one_error_line(r)
    assert not (tmp_path / "checked.raw").exists()


def test_read_only_lists_and_exports_the_intact_snapshots_of_a_damaged_store(run, made, tmp_path):
    build(made, base_and_child)
    with sqlite3.connect(made / "meta.sqlite") as db:
        db.execute("UPDATE snapshots SET labels = '{damaged' WHERE key = 'child'")
    db.close()
    r = run("ls")
    assert r.code == 1 and "--read-only" in one_error_line(r)
    r = run("--read-only", "--json", "ls")
    assert r.code == 0 and {i["name"] for i in r.json} == {"base", "child", "look"}
    assert run("--read-only", "export", "base", str(tmp_path / "base.raw")).code == 0
    assert (tmp_path / "base.raw").stat().st_size == SIZE
    r = run("--read-only", "export", "child", str(tmp_path / "child.raw"))
    assert r.code == 1 and "'child' is damaged" in one_error_line(r)
    r = run("check")
    assert r.code == 2 and "ERROR snapshot 'child': the labels of snapshot 'child' are damaged" in r.out
    r = run("--read-only", "prepare", "new")
    assert r.code == 1 and "read-only" in one_error_line(r)


def test_export_to_a_device_needs_force_and_names_it(run, made):
    build(made, base_and_child)
    r = run("export", "base", "/dev/null")
    assert r.code == 1 and "/dev/null" in one_error_line(r) and "--force" in one_error_line(r)
    assert run("export", "base", "/dev/null", "--force").code == 0
