"""The kernel's FUSE protocol (include/uapi/linux/fuse.h): opcodes, flags and wire layouts.

Fields are in host byte order with the kernel's natural alignment, so every layout below
is a `struct.Struct` in `=` order with its padding spelt out. Only what the pure-Python
server speaks is here: protocol 7.39 and the requests a file system of regular files
gets. The structs are compiled once so the request loop never re-reads a format.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 39
"""The newest protocol spoken; the kernel's offer is negotiated down to it."""
MIN_MINOR_VERSION = 23
"""The oldest protocol spoken: every layout below has had its size since 7.23."""

ROOT_ID = 1

# -- opcodes -------------------------------------------------------------------

LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SYNCFS = 50
TMPFILE = 51
STATX = 52

NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY})
"""Requests the kernel expects no answer to."""

# -- INIT flags (flags; bits 32 and up travel in flags2 when INIT_EXT is set) ---

ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
DIRECT_IO_ALLOW_MMAP = 1 << 36

# -- open reply flags ------------------------------------------------------------

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6

# -- SETATTR valid bits ----------------------------------------------------------

FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3

# -- layouts ---------------------------------------------------------------------

IN_HEADER = struct.Struct("=IIQQIIIHH")
"""fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding."""
OUT_HEADER = struct.Struct("=IiQ")
"""fuse_out_header: len, error (a negative errno), unique."""

INIT_IN = struct.Struct("=IIII")
"""fuse_init_in up to flags: major, minor, max_readahead, flags."""
INIT_IN_FLAGS2 = struct.Struct("=I")
"""fuse_init_in's flags2, right after `INIT_IN` (7.36 and later)."""
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")
"""fuse_init_out: major, minor, max_readahead, flags, max_background,
congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2, unused."""

ATTR_FORMAT = "QQQQQQIIIIIIIIII"
"""fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
mode, nlink, uid, gid, rdev, blksize, flags."""
ENTRY_OUT = struct.Struct("=QQQQII" + ATTR_FORMAT)
"""fuse_entry_out: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec,
attr_valid_nsec, then the fuse_attr."""
ATTR_OUT = struct.Struct("=QII" + ATTR_FORMAT)
"""fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then the fuse_attr."""

GETATTR_IN = struct.Struct("=IIQ")
"""fuse_getattr_in: getattr_flags, dummy, fh."""
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
"""fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
mtimensec, ctimensec, mode, unused4, uid, gid, unused5."""
FORGET_IN = struct.Struct("=Q")
BATCH_FORGET_IN = struct.Struct("=II")
OPEN_IN = struct.Struct("=II")
"""fuse_open_in: flags, open_flags."""
OPEN_OUT = struct.Struct("=QII")
"""fuse_open_out: fh, open_flags, padding (backing_id from 7.40)."""
RELEASE_IN = struct.Struct("=QIIQ")
"""fuse_release_in: fh, flags, release_flags, lock_owner."""
FLUSH_IN = struct.Struct("=QIIQ")
"""fuse_flush_in: fh, unused, padding, lock_owner."""
READ_IN = struct.Struct("=QQIIQII")
"""fuse_read_in (also READDIR's): fh, offset, size, read_flags, lock_owner, flags, padding."""
WRITE_IN = struct.Struct("=QQIIQII")
"""fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding; the data follows."""
WRITE_OUT = struct.Struct("=II")
"""fuse_write_out: size, padding."""
FSYNC_IN = struct.Struct("=QII")
"""fuse_fsync_in: fh, fsync_flags, padding."""
STATFS_OUT = struct.Struct("=QQQQQIIII24x")
"""fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare."""
GETXATTR_IN = struct.Struct("=II")
"""fuse_getxattr_in (GETXATTR, then the name; LISTXATTR): size, padding."""
GETXATTR_OUT = struct.Struct("=II")
"""fuse_getxattr_out, the answer to a request of size 0: the size needed, padding."""
ACCESS_IN = struct.Struct("=II")
LSEEK_IN = struct.Struct("=QQII")
"""fuse_lseek_in: fh, offset, whence, padding."""
LSEEK_OUT = struct.Struct("=Q")
FALLOCATE_IN = struct.Struct("=QQQII")
"""fuse_fallocate_in: fh, offset, length, mode, padding."""
DIRENT = struct.Struct("=QQII")
"""fuse_dirent before its name: ino, off (the next entry's cookie), namelen, type."""
DIRENT_ALIGN = 8
"""Each directory entry (name included) is padded to this many bytes."""
