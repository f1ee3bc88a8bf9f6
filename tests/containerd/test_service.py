"""The Snapshots service through a real gRPC channel: containerd's calls, error codes, the
hidden template, label limits, Update masks, List filters and batches."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import pytest

from tests.containerd.conftest import SIZE, Served

grpc = pytest.importorskip("grpc")
pb = pytest.importorskip("cowstore.containerd.api.snapshots_pb2")

from google.protobuf import field_mask_pb2  # noqa: E402

Code = grpc.StatusCode


def call(served: Served, method: str, **fields: Any) -> Any:
    """One unary RPC with the request message of `method` built from `fields`."""
    requests = {
        "Prepare": pb.PrepareSnapshotRequest,
        "View": pb.ViewSnapshotRequest,
        "Mounts": pb.MountsRequest,
        "Commit": pb.CommitSnapshotRequest,
        "Remove": pb.RemoveSnapshotRequest,
        "Stat": pb.StatSnapshotRequest,
        "Update": pb.UpdateSnapshotRequest,
        "Usage": pb.UsageRequest,
        "Cleanup": pb.CleanupRequest,
    }
    return getattr(served.stub, method)(requests[method](snapshotter="cowstore", **fields), timeout=60)


def fails(served: Served, code: Any, method: str, **fields: Any) -> str:
    """The message of the error `method` must fail with, with `code`."""
    with pytest.raises(grpc.RpcError) as info:
        call(served, method, **fields)
    assert info.value.code() == code, info.value.details()
    return str(info.value.details())


def listed(served: Served, *filters: str) -> list[Any]:
    """Every response message of List (the batches)."""
    return list(
        served.stub.List(pb.ListSnapshotsRequest(snapshotter="cowstore", filters=filters), timeout=60)
    )


def names(served: Served, *filters: str) -> list[str]:
    return sorted(i.name for batch in listed(served, *filters) for i in batch.info)


def test_prepare_mounts_an_empty_ext4_of_a_hidden_template(served: Served) -> None:
    reply = call(served, "Prepare", key="ns/1/extract 1 sha256:ab", labels={"a": "b"})
    (m,) = reply.mounts
    assert (m.type, list(m.options)) == ("ext4", ["rw", "noatime", "discard"])
    # The source: a loop device the snapshotter holds on the snapshot's file.
    assert served.backing(m.source) == served.file("ns/1/extract 1 sha256:ab")
    assert os.path.getsize(served.file("ns/1/extract 1 sha256:ab")) == SIZE
    assert call(served, "Mounts", key="ns/1/extract 1 sha256:ab").mounts[0].source == m.source
    info = call(served, "Stat", key="ns/1/extract 1 sha256:ab").info
    assert (info.kind, info.parent, dict(info.labels)) == (pb.ACTIVE, "", {"a": "b"})
    assert info.created_at.seconds > 0 and info.updated_at.seconds > 0
    # The file system: clean, root 0755, nothing in it (no lost+found).
    subprocess.run(["e2fsck", "-fn", m.source], check=True, capture_output=True)
    listing = subprocess.run(["debugfs", "-R", "ls -l /", m.source], capture_output=True, text=True).stdout
    assert "lost+found" not in listing and "40755" in listing
    # The template is formatted once and never shown to containerd.
    call(served, "Prepare", key="second")
    internal = [i.name for i in served.store.walk() if i.name.startswith("cowstore.containerd/")]
    assert internal == [f"cowstore.containerd/ext4-{SIZE}"]
    assert names(served) == ["ns/1/extract 1 sha256:ab", "second"]
    assert names(served, 'parent!=""') == []
    fails(served, Code.NOT_FOUND, "Stat", key=internal[0])
    fails(served, Code.NOT_FOUND, "Prepare", key="x", parent=internal[0])
    fails(served, Code.NOT_FOUND, "Remove", key=internal[0])
    fails(served, Code.INVALID_ARGUMENT, "Prepare", key="cowstore.containerd/mine")


def test_error_codes(served: Served) -> None:
    for method in ("Stat", "Mounts", "Remove", "Usage"):
        fails(served, Code.NOT_FOUND, method, key="missing")
    fails(served, Code.NOT_FOUND, "Commit", name="c", key="missing")
    fails(served, Code.NOT_FOUND, "Prepare", key="a", parent="missing")
    fails(served, Code.NOT_FOUND, "Update", info=pb.Info(name="missing"))
    call(served, "Prepare", key="a")
    fails(served, Code.ALREADY_EXISTS, "Prepare", key="a")
    fails(served, Code.INVALID_ARGUMENT, "Prepare", key="b", parent="a")  # parent not committed
    fails(served, Code.INVALID_ARGUMENT, "View", key="b", parent="a")
    call(served, "Commit", name="c", key="a")
    fails(served, Code.NOT_FOUND, "Stat", key="a")
    fails(served, Code.FAILED_PRECONDITION, "Mounts", key="c")
    fails(served, Code.FAILED_PRECONDITION, "Commit", name="d", key="c")
    call(served, "Prepare", key="e", parent="c")
    fails(served, Code.ALREADY_EXISTS, "Commit", name="c", key="e")
    fails(served, Code.ALREADY_EXISTS, "Prepare", key="c")
    assert "remove" in fails(served, Code.FAILED_PRECONDITION, "Remove", key="c")
    fails(served, Code.INVALID_ARGUMENT, "Prepare", key="")
    call(served, "Remove", key="e")
    call(served, "Remove", key="c")
    assert names(served) == []


def test_view_and_child_mounts(served: Served) -> None:
    call(served, "Prepare", key="a")
    call(served, "Commit", name="c", key="a", labels={"l": "1"})
    info = call(served, "Stat", key="c").info
    assert (info.kind, info.parent, dict(info.labels)) == (pb.COMMITTED, "", {"l": "1"})
    (m,) = call(served, "View", key="v", parent="c").mounts
    assert (m.type, list(m.options)) == ("ext4", ["ro", "noload"])
    assert served.backing(m.source) == served.file("v")
    assert list(call(served, "Mounts", key="v").mounts[0].options) == ["ro", "noload"]
    (m,) = call(served, "Prepare", key="p", parent="c").mounts
    assert list(m.options) == ["rw", "noatime", "discard"]
    assert call(served, "Stat", key="p").info.parent == "c"
    assert call(served, "Stat", key="v").info.kind == pb.VIEW
    (m,) = call(served, "View", key="empty").mounts  # a view of nothing: an empty file system
    assert list(m.options) == ["ro", "noload"]
    assert call(served, "Stat", key="empty").info.parent == ""


def test_size_label(served: Served) -> None:
    label = "containerd.io/snapshot/cowstore.size"
    call(served, "Prepare", key="big", labels={label: "128M"})
    assert os.path.getsize(served.file("big")) == 128 << 20
    subprocess.run(["e2fsck", "-fn", str(served.file("big"))], check=True, capture_output=True)
    call(served, "Commit", name="c", key="big")
    call(served, "Prepare", key="same", parent="c", labels={label: "128M"})
    call(served, "Prepare", key="smaller", parent="c", labels={label: "64M"})
    assert os.path.getsize(served.file("smaller")) == 128 << 20
    call(served, "Prepare", key="grown", parent="c", labels={label: "1G"})
    assert os.path.getsize(served.file("grown")) == 1 << 30
    assert call(served, "Stat", key="grown").info.parent == "c"
    subprocess.run(["e2fsck", "-fn", str(served.file("grown"))], check=True, capture_output=True)
    fails(served, Code.INVALID_ARGUMENT, "Prepare", key="x", labels={label: "lots"})


def test_label_floods_are_refused_clearly(served: Served) -> None:
    many = {f"k{i}": "v" for i in range(5000)}
    assert "labels" in fails(served, Code.INVALID_ARGUMENT, "Prepare", key="a", labels=many)
    fails(served, Code.INVALID_ARGUMENT, "Prepare", key="a", labels={"k": "v" * 10000})
    heavy = {f"k{i}": "v" * 4000 for i in range(100)}  # each pair fits; together too big
    fails(served, Code.INVALID_ARGUMENT, "Prepare", key="a", labels=heavy)
    call(served, "Prepare", key="a")
    fails(served, Code.INVALID_ARGUMENT, "Commit", name="c", key="a", labels=many)
    fails(served, Code.INVALID_ARGUMENT, "Update", info=pb.Info(name="a", labels=many))
    # Beyond gRPC's message limit: the channel refuses it, the server goes on.
    huge = {f"k{i}": "v" * 4000 for i in range(1200)}
    with pytest.raises(grpc.RpcError) as info:
        call(served, "Prepare", key="b", labels=huge)
    assert info.value.code() in (Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT)
    assert names(served) == ["a"]
    assert dict(call(served, "Stat", key="a").info.labels) == {}


def test_update_masks(served: Served) -> None:
    call(served, "Prepare", key="a", labels={"x": "1", "y": "2"})
    before = call(served, "Stat", key="a").info
    time.sleep(0.01)

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        mask = field_mask_pb2.FieldMask(paths=paths) if paths else None
        info = call(served, "Update", info=pb.Info(name="a", labels=labels), update_mask=mask).info
        assert info.created_at == before.created_at
        assert info.updated_at.ToDatetime() > before.updated_at.ToDatetime()
        assert info.kind == pb.ACTIVE
        return dict(info.labels)

    assert update({"z": "3"}) == {"z": "3"}  # no mask: every label
    assert update({"x": "9"}, "labels") == {"x": "9"}
    assert update({"w": "4", "ignored": "5"}, "labels.w") == {"x": "9", "w": "4"}
    assert update({}, "labels.x") == {"w": "4"}  # absent: deleted
    assert update({"w": ""}, "labels.w") == {}  # empty: deleted
    for path in ("name", "parent", "kind", "labels.", "created_at"):
        fails(served, Code.INVALID_ARGUMENT, "Update", info=pb.Info(name="a"), update_mask={"paths": [path]})
    assert dict(call(served, "Stat", key="a").info.labels) == {}


def test_list_filters(served: Served) -> None:
    call(served, "Prepare", key="base", labels={"containerd.io/gc.root": "x", "tier": "db"})
    call(served, "Commit", name="c1", key="base", labels={"tier": "web"})
    call(served, "Prepare", key="child", parent="c1", labels={"tier": "web"})
    call(served, "View", key="view", parent="c1")
    assert names(served) == ["c1", "child", "view"]
    assert names(served, "kind==committed") == ["c1"]
    assert names(served, 'parent!=""') == ["child", "view"]
    assert names(served, "parent==c1,kind==active") == ["child"]
    assert names(served, "labels.tier==web") == ["c1", "child"]
    assert names(served, 'labels."tier"') == ["c1", "child"]
    assert names(served, "name~=^v", "kind==committed") == ["c1", "view"]
    assert names(served, "labels.nothing") == []
    for bad in ("kind===", "name~=(", 'labels."open', "=="):
        with pytest.raises(grpc.RpcError) as info:
            listed(served, bad)
        assert info.value.code() == Code.INVALID_ARGUMENT, bad
    stat = call(served, "Stat", key="child").info
    (batch,) = listed(served, "name==child")
    assert list(batch.info) == [stat]


def test_list_streams_in_batches(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from cowstore.containerd import service

    monkeypatch.setattr(service, "LIST_BATCH", 4)
    call(served, "Prepare", key="base")
    call(served, "Commit", name="c", key="base")
    for i in range(9):
        call(served, "View", key=f"v{i}", parent="c")
    batches = listed(served)
    assert [len(b.info) for b in batches] == [4, 4, 2]
    assert sorted(i.name for b in batches for i in b.info) == ["c", *(f"v{i}" for i in range(9))]
    assert listed(served, "name==none") == []


def test_usage_and_cleanup(served: Served) -> None:
    call(served, "Prepare", key="a")
    assert call(served, "Usage", key="a").size == 0
    with open(served.file("a"), "r+b") as f:
        f.seek(1 << 20)
        f.write(b"x" * (256 << 10))
        os.fsync(f.fileno())
    usage = call(served, "Usage", key="a")
    assert usage.size >= 256 << 10 and usage.inodes == 0
    call(served, "Remove", key="a")
    call(served, "Cleanup")


def test_cleanup_gives_space_back_to_the_disk_only_past_the_slack(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cowstore.containerd import snapshotter

    monkeypatch.setattr(snapshotter, "CLEANUP_SLACK", 8 << 20)

    def free_on_disk_after_writing(key: str, size: int) -> int:
        """Write `size` bytes into a new snapshot, remove it, Cleanup: the bytes the data file
        then holds beyond the chunks in use."""
        call(served, "Prepare", key=key)
        with open(served.file(key), "r+b") as f:
            f.write(os.urandom(size))
            os.fsync(f.fileno())
        call(served, "Remove", key=key)
        call(served, "Cleanup")
        stats = served.store.stats()
        return stats.disk_bytes - stats.used * stats.chunk_size

    assert free_on_disk_after_writing("a", 4 << 20) >= 4 << 20, "within the slack: kept for reuse"
    assert free_on_disk_after_writing("b", 16 << 20) < 4 << 20


def test_cleanup_removes_templates_without_children_and_keeps_used_ones(served: Served) -> None:
    label = "containerd.io/snapshot/cowstore.size"
    call(served, "Prepare", key="a")
    call(served, "Commit", name="c", key="a")
    call(served, "View", key="v", labels={label: "32M"})
    templates = {f"cowstore.containerd/ext4-{SIZE}", f"cowstore.containerd/ext4-{32 << 20}"}
    call(served, "Cleanup")
    assert {i.name for i in served.store.walk()} == {"c", "v", *templates}
    call(served, "Remove", key="v")
    call(served, "Cleanup")
    assert {i.name for i in served.store.walk()} == {"c", f"cowstore.containerd/ext4-{SIZE}"}
    call(served, "Remove", key="c")
    call(served, "Cleanup")
    assert list(served.store.walk()) == []
    # The next Prepare formats a template again.
    (m,) = call(served, "Prepare", key="again").mounts
    subprocess.run(["e2fsck", "-fn", m.source], check=True, capture_output=True)
