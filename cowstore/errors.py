"""The exceptions cowstore raises: one class per kind of failure, as in containerd's errdefs.

Every class subclasses :class:`Error`; where a builtin exception means the same thing the
class subclasses it too, so ``except ValueError`` still catches a bad argument.
"""

from __future__ import annotations

import errno


class Error(Exception):
    """Base class of every cowstore error."""


class InvalidArgument(Error, ValueError):
    """An argument is wrong: bad offset, bad key, bad option, malformed filter."""


class NotFound(Error, LookupError):
    """The snapshot (or store) does not exist, or no longer exists."""


class AlreadyExists(Error):
    """A snapshot with that key or name exists already."""


class FailedPrecondition(Error):
    """The call is valid but the snapshot is in the wrong state for it."""


class ReadOnly(Error, PermissionError):
    """A write to a view (a read-only snapshot)."""


class Locked(Error):
    """Another process (or another open in this one) holds the store."""


class Corruption(Error):
    """A store file is damaged: the data cannot be trusted."""


class NoSpace(Error, OSError):
    """No room for a new chunk: the pool is at its limit or the host file system is full.
    Nothing that was durable is touched, and the store goes on once there is room."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.args[1])


class Closed(Error, ValueError):
    """The store or volume was closed."""


class Unavailable(Error):
    """The store failed in a way that may have lost data (a failed fsync, a failing
    database): it refuses every call until it is reopened."""


__all__ = [
    "AlreadyExists",
    "Closed",
    "Corruption",
    "Error",
    "FailedPrecondition",
    "InvalidArgument",
    "Locked",
    "NoSpace",
    "NotFound",
    "ReadOnly",
    "Unavailable",
]
