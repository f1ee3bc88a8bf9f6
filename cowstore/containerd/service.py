"""containerd's snapshots gRPC service (`containerd.services.snapshots.v1.Snapshots`) over a
`Snapshotter`: messages in and out, cowstore errors as the gRPC codes containerd maps back
to its errdefs. Policy lives in `snapshotter`; this module only translates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from .. import errors
from ..types import Info, Kind
from .api import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .snapshotter import Mount, Snapshotter

log = logging.getLogger(__name__)
timing = logging.getLogger(__name__ + ".timing")
"""Every RPC's duration at DEBUG (`COWSTORE_LOG=cowstore.containerd.service.timing=DEBUG`)."""

LIST_BATCH = 100
"""Infos per List message at most (containerd's own server streams in batches too)."""
LIST_BATCH_BYTES = 1 << 20
"""Bytes of infos per List message at most: well under gRPC's 4 MiB message limit."""
MAX_LABELS = 1024
"""Labels one request may set at most."""
MAX_LABEL_BYTES = 256 << 10
"""Bytes of label keys and values one request may set at most (each pair: 4 KiB, as in
containerd)."""

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ReadOnly, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NoSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Locked, grpc.StatusCode.UNAVAILABLE),
    (errors.Closed, grpc.StatusCode.UNAVAILABLE),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Corruption, grpc.StatusCode.DATA_LOSS),
]

_KINDS = {
    Kind.VIEW: snapshots_pb2.VIEW,
    Kind.ACTIVE: snapshots_pb2.ACTIVE,
    Kind.COMMITTED: snapshots_pb2.COMMITTED,
}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

T = TypeVar("T")


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code of a cowstore error (INTERNAL for anything unexpected)."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels of a request, refused clearly when there are too many or they are too big."""
    if len(labels) > MAX_LABELS:
        raise errors.InvalidArgument(f"{len(labels)} labels: at most {MAX_LABELS} per snapshot")
    total = sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())
    if total > MAX_LABEL_BYTES:
        raise errors.InvalidArgument(f"labels hold {total} bytes: at most {MAX_LABEL_BYTES} per snapshot")
    return dict(labels)


def _timestamp(when: datetime | None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when or _EPOCH)
    return ts


def info_message(info: Info) -> snapshots_pb2.Info:
    """A store Info as containerd's: kind and both times always set."""
    return snapshots_pb2.Info(
        name=info.name,
        parent=info.parent or "",
        kind=_KINDS[info.kind],
        created_at=_timestamp(info.created),
        updated_at=_timestamp(info.updated or info.created),
        labels=info.labels,
    )


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


class Servicer(snapshots_pb2_grpc.SnapshotsServicer):
    """The ten RPCs of containerd's Snapshots service; `snapshotter` field of requests is
    ignored (one daemon serves one snapshotter)."""

    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        """Run `fn`, turning a cowstore error into the status containerd expects."""
        if timing.isEnabledFor(logging.DEBUG):
            start = time.perf_counter()
            try:
                return self._run(context, what, fn)
            finally:
                timing.debug("%s: %.2f ms", what, (time.perf_counter() - start) * 1e3)
        return self._run(context, what, fn)

    def _run(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except errors.Error as exc:
            self._abort(context, status_of(exc), str(exc))
        except Exception as exc:
            log.exception("%s failed", what)
            self._abort(context, grpc.StatusCode.INTERNAL, f"{what}: {exc}")

    @staticmethod
    def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        context.abort(code, message)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def Prepare(  # gRPC's method names
        self, request: snapshots_pb2.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        mounts = self._call(
            context,
            "Prepare",
            lambda: self.snapshotter.prepare(request.key, request.parent, _labels(request.labels)),
        )
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(
        self, request: snapshots_pb2.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = self._call(
            context,
            "View",
            lambda: self.snapshotter.view(request.key, request.parent, _labels(request.labels)),
        )
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(
        self, request: snapshots_pb2.MountsRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.MountsResponse:
        mounts = self._call(context, "Mounts", lambda: self.snapshotter.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=_mounts(mounts))

    def Commit(
        self, request: snapshots_pb2.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._call(
            context,
            "Commit",
            lambda: self.snapshotter.commit(request.name, request.key, _labels(request.labels)),
        )
        return empty_pb2.Empty()

    def Remove(
        self, request: snapshots_pb2.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._call(context, "Remove", lambda: self.snapshotter.remove(request.key))
        return empty_pb2.Empty()

    def Stat(
        self, request: snapshots_pb2.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.StatSnapshotResponse:
        info = self._call(context, "Stat", lambda: self.snapshotter.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=info_message(info))

    def Update(
        self, request: snapshots_pb2.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        def update() -> Info:
            wanted = Info(name=request.info.name, kind=Kind.ACTIVE, labels=_labels(request.info.labels))
            return self.snapshotter.update(wanted, list(request.update_mask.paths))

        info = self._call(context, "Update", update)
        return snapshots_pb2.UpdateSnapshotResponse(info=info_message(info))

    def List(
        self, request: snapshots_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        # The filters are parsed before the first message, so a bad one fails the call.
        infos = self._call(context, "List", lambda: iter(list(self.snapshotter.walk(list(request.filters)))))
        batch: list[snapshots_pb2.Info] = []
        size = 0
        for info in infos:
            message = info_message(info)
            batch.append(message)
            size += message.ByteSize()
            if len(batch) >= LIST_BATCH or size >= LIST_BATCH_BYTES:
                yield snapshots_pb2.ListSnapshotsResponse(info=batch)
                batch, size = [], 0
        if batch:
            yield snapshots_pb2.ListSnapshotsResponse(info=batch)

    def Usage(
        self, request: snapshots_pb2.UsageRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UsageResponse:
        usage = self._call(context, "Usage", lambda: self.snapshotter.usage(request.key))
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=0)

    def Cleanup(
        self, request: snapshots_pb2.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._call(context, "Cleanup", self.snapshotter.cleanup)
        return empty_pb2.Empty()


def add_to_server(servicer: Servicer, server: grpc.Server) -> None:
    """Register `servicer` with `server` under containerd's service name."""
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(servicer, server)


__all__ = ["Servicer", "add_to_server", "info_message", "status_of"]
