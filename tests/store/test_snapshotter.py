"""containerd's snapshotter semantics and error table, on both engines, in memory and on disk."""

from __future__ import annotations

import threading
from datetime import timezone

import pytest

from cowstore import Info, Kind, Usage, errors
from tests.conftest import CHUNK, SIZE


def test_prepare_creates_an_active_snapshot_with_default_size(store):
    vol = store.prepare("a", labels={"x": "1"})
    info = store.stat("a")
    assert (info.name, info.kind, info.parent, info.labels, info.size) == (
        "a",
        Kind.ACTIVE,
        None,
        {"x": "1"},
        SIZE,
    )
    assert info.created == info.updated and info.created.tzinfo == timezone.utc
    assert (vol.key, vol.size, vol.readonly) == ("a", SIZE, False)


def test_prepare_with_size_sets_the_virtual_size(store):
    assert store.prepare("a", size=3 * CHUNK + 7).size == 3 * CHUNK + 7


def test_child_has_its_parents_size_and_data(store):
    vol = store.prepare("a", size=5 * CHUNK)
    vol.pwrite(b"base", 10)
    store.commit("base", "a")
    child = store.prepare("c", "base")
    assert child.size == 5 * CHUNK
    assert child.pread(4, 10) == b"base"
    assert store.stat("c").parent == "base"


def test_keys_may_contain_slashes(store):
    store.prepare("default/1/sha256:abc")
    assert store.stat("default/1/sha256:abc").name == "default/1/sha256:abc"


@pytest.mark.parametrize("make", ["prepare", "view"])
def test_prepare_or_view_of_an_existing_key_raises_already_exists(store, make):
    store.prepare("a")
    store.commit("c", "a")
    store.prepare("a")
    for key in ("a", "c"):
        with pytest.raises(errors.AlreadyExists):
            getattr(store, make)(key, "c")


@pytest.mark.parametrize("make", ["prepare", "view"])
def test_prepare_or_view_of_a_missing_parent_raises_not_found(store, make):
    with pytest.raises(errors.NotFound):
        getattr(store, make)("a", "nope")
    assert list(store.walk()) == []


@pytest.mark.parametrize("make", ["prepare", "view"])
def test_prepare_or_view_on_an_uncommitted_parent_raises_invalid_argument(store, make):
    store.prepare("active")
    store.prepare("base")
    store.commit("c", "base")
    store.view("v", "c")
    for parent in ("active", "v"):
        with pytest.raises(errors.InvalidArgument):
            getattr(store, make)("new", parent)
    with pytest.raises(ValueError):
        store.prepare("new", "active")


def test_commit_makes_a_committed_snapshot_and_removes_the_key(store):
    vol = store.prepare("a", labels={"old": "1"})
    vol.pwrite(b"data", 0)
    store.commit("c", "a", labels={"new": "2"})
    info = store.stat("c")
    assert (info.kind, info.labels, info.created == info.updated) == (Kind.COMMITTED, {"new": "2"}, True)
    with pytest.raises(errors.NotFound):
        store.stat("a")
    assert store.view("v", "c").pread(4, 0) == b"data"


def test_commit_to_an_existing_name_raises_already_exists(store):
    store.prepare("a")
    store.prepare("b")
    with pytest.raises(errors.AlreadyExists):
        store.commit("b", "a")
    assert store.stat("a").kind is Kind.ACTIVE


def test_commit_of_a_missing_key_raises_not_found(store):
    with pytest.raises(errors.NotFound):
        store.commit("c", "missing")


def test_commit_of_a_view_or_committed_snapshot_raises_failed_precondition(store):
    store.prepare("a")
    store.commit("c", "a")
    store.view("v", "c")
    for key in ("v", "c"):
        with pytest.raises(errors.FailedPrecondition):
            store.commit("c2", key)


def test_remove_of_a_missing_snapshot_raises_not_found(store):
    with pytest.raises(errors.NotFound):
        store.remove("missing")


def test_remove_of_a_snapshot_with_children_is_refused(store):
    store.prepare("a")
    store.commit("c", "a")
    store.view("v", "c")
    with pytest.raises(errors.FailedPrecondition, match=r"cannot remove snapshot .* with children"):
        store.remove("c")
    store.remove("v")
    store.remove("c")
    assert list(store.walk()) == []


def test_remove_of_an_intermediate_snapshot_after_its_children(store):
    store.prepare("a").pwrite(b"1", 0)
    store.commit("l1", "a")
    store.prepare("b", "l1").pwrite(b"2", 1)
    store.commit("l2", "b")
    top = store.prepare("top", "l2")
    with pytest.raises(errors.FailedPrecondition):
        store.remove("l1")
    assert top.pread(2, 0) == b"12"
    store.remove("top")
    store.remove("l2")
    assert store.view("v", "l1").pread(2, 0) == b"1\0"


def test_update_replaces_all_labels_without_fieldpaths(store):
    store.prepare("a", labels={"a": "1", "b": "2"})
    before = store.stat("a")
    after = store.update(Info("a", Kind.ACTIVE, labels={"c": "3"}))
    assert after.labels == {"c": "3"} and store.stat("a") == after
    assert after.created == before.created and after.updated >= before.updated


def test_update_of_one_label_path_copies_or_deletes_that_key(store):
    store.prepare("a", labels={"a": "1", "b": "2"})
    info = Info("a", Kind.ACTIVE, labels={"a": "10", "z": "ignored"})
    assert store.update(info, "labels.a", "labels.b").labels == {"a": "10"}
    assert store.update(info, "labels").labels == {"a": "10", "z": "ignored"}


def test_update_changes_nothing_but_labels(store):
    store.prepare("a", size=2 * CHUNK)
    info = store.update(Info("a", Kind.VIEW, parent="zzz", size=1, labels={"k": "v"}))
    assert (info.kind, info.parent, info.size) == (Kind.ACTIVE, None, 2 * CHUNK)


def test_update_of_a_missing_snapshot_raises_not_found(store):
    with pytest.raises(errors.NotFound):
        store.update(Info("missing", Kind.ACTIVE))


@pytest.mark.parametrize("path", ["name", "kind", "parent", "labels.", "size", "created"])
def test_update_of_another_fieldpath_raises_invalid_argument(store, path):
    store.prepare("a", labels={"k": "v"})
    with pytest.raises(errors.InvalidArgument):
        store.update(Info("a", Kind.ACTIVE, labels={}), path)
    assert store.stat("a").labels == {"k": "v"}


def test_mounts_returns_a_new_handle_on_active_and_view(store):
    store.prepare("a").pwrite(b"xy", 0)
    again = store.mounts("a")
    assert again.pread(2, 0) == b"xy" and not again.readonly
    store.commit("c", "a")
    assert store.view("v", "c") is not store.mounts("v")
    assert store.mounts("v").readonly


def test_mounts_of_missing_or_committed_snapshot_raises(store):
    with pytest.raises(errors.NotFound):
        store.mounts("missing")
    store.prepare("a")
    store.commit("c", "a")
    with pytest.raises(errors.FailedPrecondition):
        store.mounts("c")


@pytest.mark.parametrize("call", ["stat", "usage"])
def test_stat_and_usage_of_a_missing_snapshot_raise_not_found(store, call):
    with pytest.raises(errors.NotFound):
        getattr(store, call)("missing")


def test_view_is_read_only(store):
    store.prepare("a").pwrite(b"abc", 0)
    store.commit("c", "a")
    view = store.view("v", "c")
    for call in (lambda: view.pwrite(b"x", 0), lambda: view.discard(0, 1), lambda: view.write_zeroes(0, 1)):
        with pytest.raises(errors.ReadOnly):
            call()
    with pytest.raises(PermissionError):
        view.pwrite(b"x", 0)
    assert view.pread(3, 0) == b"abc"


def test_view_without_parent_is_an_empty_read_only_snapshot(store):
    view = store.view("v")
    assert view.readonly and view.pread(4, 0) == bytes(4) and store.stat("v").kind is Kind.VIEW


def test_handle_of_a_committed_or_removed_key_raises_not_found(store):
    vol = store.prepare("a")
    store.commit("c", "a")
    with pytest.raises(errors.NotFound):
        vol.pwrite(b"late", 0)
    with pytest.raises(errors.NotFound):
        vol.pread(1, 0)
    assert store.view("v", "c").pread(4, 0) == bytes(4)
    other = store.prepare("b")
    store.remove("b")
    with pytest.raises(errors.NotFound):
        other.pread(1, 0)


def test_usage_counts_exclusive_chunks_only(store):
    base = store.prepare("a")
    base.pwrite(b"x" * (3 * CHUNK), 0)
    assert store.usage("a") == Usage(size=3 * CHUNK, chunks=3)
    store.commit("c", "a")
    child = store.prepare("b", "c")
    assert store.usage("b") == Usage(0, 0)
    child.pwrite(b"y", CHUNK + 5)
    assert store.usage("b") == Usage(CHUNK, 1)
    assert store.usage("c") == Usage(3 * CHUNK, 3)


def test_zeros_discard_and_write_zeroes_allocate_nothing(store):
    vol = store.prepare("a")
    vol.pwrite(bytes(2 * CHUNK), 0)
    vol.pwrite(bytes(100), 3 * CHUNK + 10)
    vol.write_zeroes(5 * CHUNK, 3 * CHUNK)
    vol.discard(9 * CHUNK, CHUNK)
    assert store.usage("a") == Usage(0, 0)
    vol.pwrite(b"x" * CHUNK, 0)
    vol.discard(0, CHUNK)
    assert store.usage("a") == Usage(0, 0) and vol.pread(CHUNK, 0) == bytes(CHUNK)


def test_walk_lists_every_snapshot_and_filters_like_containerd(store):
    store.prepare("base", labels={"containerd.io/gc.root": "x"})
    store.commit("img", "base", labels={"containerd.io/gc.root": "x", "tier": "1"})
    store.prepare("ctr1", "img", labels={"tier": "2"})
    store.view("v", "img")
    assert [i.name for i in store.walk()] == ["ctr1", "img", "v"]
    assert [i.name for i in store.walk("kind==active")] == ["ctr1"]
    assert [i.name for i in store.walk('parent!=""')] == ["ctr1", "v"]
    assert [i.name for i in store.walk('labels."containerd.io/gc.root"==x')] == ["img"]
    assert [i.name for i in store.walk("labels.tier")] == ["ctr1", "img"]
    assert [i.name for i in store.walk("kind==view", "name~=^ctr")] == ["ctr1", "v"]
    assert [i.name for i in store.walk("labels.tier==2,kind==active")] == ["ctr1"]
    with pytest.raises(errors.InvalidArgument):
        list(store.walk("name=="))


def test_stat_inside_walk_does_not_deadlock(store):
    for i in range(5):
        store.prepare(f"k{i}")
    seen = []
    for info in store.walk():
        assert store.stat(info.name) == info
        t = threading.Thread(target=lambda n=info.name: seen.append(store.stat(n)))
        t.start()
        t.join(timeout=10)
        assert not t.is_alive()
    assert len(seen) == 5


def test_close_twice_is_harmless_and_calls_after_close_fail(store):
    store.close()
    store.close()
    with pytest.raises(errors.Error):
        store.prepare("a")


def test_128_chained_layers_read_through_resolved_maps(store):
    parent = None
    for i in range(128):
        vol = store.prepare(f"a{i}", parent)
        vol.pwrite(bytes([i + 1]) * 3, i * 3)
        store.commit(f"l{i}", f"a{i}")
        parent = f"l{i}"
    top = store.view("top", parent)
    assert top.pread(3 * 128, 0) == b"".join(bytes([i + 1]) * 3 for i in range(128))
    depths = {e.depth for e in top.block_status(0, CHUNK)}
    assert depths == {2}


def test_transitivity_a_child_sees_its_ancestors_and_its_own_writes(store):
    a = store.prepare("a")
    a.pwrite(b"A" * 10, 0)
    store.commit("ca", "a")
    b = store.prepare("b", "ca")
    b.pwrite(b"B" * 5, 5)
    store.commit("cb", "b")
    c = store.prepare("c", "cb")
    assert c.pread(10, 0) == b"AAAAABBBBB"
    assert store.view("va", "ca").pread(10, 0) == b"A" * 10


@pytest.mark.parametrize("bad", ["", "a\0b", "a\nb", "tab\t", "del\x7f", "é" * 2049, 5, None, b"key"])
def test_bad_keys_raise_invalid_argument(store, bad):
    with pytest.raises(errors.InvalidArgument):
        store.prepare(bad)


def test_keys_and_labels_may_hold_4096_bytes(store):
    store.prepare("k" * 4096, labels={"l" * 96: "v" * 4000})
    assert store.stat("k" * 4096).labels == {"l" * 96: "v" * 4000}


@pytest.mark.parametrize(
    "labels", [{"k": 1}, {1: "v"}, ["k"], {"": "v"}, {"a\nb": "v"}, {"k" * 96: "v" * 4001}]
)
def test_bad_labels_raise_invalid_argument(store, labels):
    with pytest.raises(errors.InvalidArgument):
        store.prepare("a", labels=labels)
    assert list(store.walk()) == []


@pytest.mark.parametrize("size", [0, -1, 1 << 60, 1.5, "10"])
def test_bad_sizes_raise_invalid_argument(store, size):
    with pytest.raises(errors.InvalidArgument):
        store.prepare("a", size=size)


def test_size_with_a_parent_is_rejected(store):
    store.prepare("a")
    store.commit("c", "a")
    with pytest.raises(errors.InvalidArgument):
        store.prepare("b", "c", size=CHUNK)


def test_reader_reads_any_kind_read_only_and_writes_no_metadata(store):
    store.prepare("a").pwrite(b"image", 0)
    store.commit("img", "a")
    before = list(store.walk())
    reader = store.reader("img")
    assert reader.readonly and reader.pread(5, 0) == b"image"
    assert [(e.depth, e.allocated) for e in reader.block_status(0, CHUNK)] == [(1, True)]
    with pytest.raises(errors.ReadOnly):
        reader.pwrite(b"x", 0)
    assert list(store.walk()) == before
    child = store.prepare("c", "img")
    assert store.reader("c").readonly and not child.readonly
    store.remove("c")
    store.remove("img")
    with pytest.raises(errors.NotFound):
        reader.pread(1, 0)
    with pytest.raises(errors.NotFound):
        store.reader("img")
