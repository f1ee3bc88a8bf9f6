"""fallocate(2), which the standard library lacks: reserve blocks in the data file and punch holes in it."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Give a byte range of `fd` back to the file system; False where it cannot (no support)."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve blocks for a byte range of `fd` without changing its size; False where it
    cannot (no support, no space): the caller loses only the speed-up."""
    return _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) == 0
