# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, overflowcheck=False, binding=True
# cython: auto_pickle=False, autotestdict=False
"""The Cython engine: the same interface, semantics and bytes as `cowstore.engines.python`.

This file is the module's root: compiler directives, imports and includes only.
- ext/core/*.pxi, the engine core, one file per concern: nogil C on a `State`, but where
  results are handed over as Python objects. A function that can fail returns -1 (or
  NULL) and fills an `Err` (core/errors.pxi); functions are named for what they work on
  (slot_, page_, map_, data_ for the data file, pool_, io_ for the I/O entry points).
- ext/engine.pxi, ext/volume.pxi, the binding: convert the arguments, take the lock
  through `Engine.lock`, call one core function, raise through `error`.
- _cengine.pxd: the structs and the two classes; ext/include/*.h: the C that is not
  Cython (SIGBUS guard, CRC-32, byte order, the lock).

Every piece of metadata is plain C: a page is one malloc'd block, a
16-byte header then `page_entries` uint32 slots and as many uint32 chunk sums (12 bytes
of metadata per mapped chunk with the slot refcounts); a map is an array of page
pointers; maps are found through an int64 hash table; slot refcounts are one uint32
array. Chunk sums are zlib's CRC-32, computed here in C (slice-by-8).

One rwlock guards the state: reads take it shared, everything that changes metadata takes
it exclusive. The lock is only ever waited for without the GIL (a try-lock may be taken
with it), and system calls (pread, pwrite, fdatasync, ftruncate) always run without it.

Reads copy from a shared mapping of the data file (no system call per read). Writes that
allocate stay pwrite, so a full disk is an error, not a fault. Overwrites in place of
bytes the file holds copy into the mapping only in fresh slots, those allocated since the
last take_changes: a process killed in the middle of a copy leaves it torn at any cache
line, which is harmless in a slot no durable map names. Every other overwrite is pwrite,
which a kill leaves applied by whole pages; a pwrite that fails drops the mapping's pages
over its range, since the page cache may hold the refused bytes (FUSE). A copy that faults (the file shrank under the
store's lock, or the disk failed) raises Corruption on a read and EIO on a write; bytes
past the end of the file inside its last page read as zeros, which only an outside
truncation while the store is open can cause. Small I/O through the mapping keeps the GIL
when the lock is free at once: releasing and taking it back costs more than a copy of a
few pages.

Both engines refuse, before changing anything, a write that would hit `NoSpace`, loading
after `finish_load`, a `release` of slots that are not freed slots of the pool, negative
sizes and an empty chain. This one is stricter still where the reference only fails
later: slot-refcount changes (write, zero, drop_map) between `load_*` and `finish_load`
and ids beyond int64 raise ValueError; a read into read-only memory raises TypeError.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.number cimport PyNumber_Index
from libc.errno cimport EDQUOT, EINTR, EINVAL, EIO, ENOMEM, ENOSPC, ESTALE, errno
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.types cimport off_t
from posix.unistd cimport fdatasync, ftruncate, pread, pwrite


cdef extern from "<sys/mman.h>" nogil:
    int MADV_DONTNEED
    int madvise(void *addr, size_t length, int advice)

cdef extern from "<unistd.h>" nogil:
    int _SC_PAGESIZE
    long sysconf(int name)

from os import strerror as _strerror

from cowstore.engines.format import MAX_SLOT, PARTIAL, SUB_BLOCKS, Changes, chunk_sum
from cowstore.errors import Closed, Corruption, InvalidArgument, NoSpace, NotFound, ReadOnly

cs_crc32_init()

include "core/format.pxi"
include "core/errors.pxi"
include "core/containers.pxi"
include "core/pool.pxi"
include "core/pages.pxi"
include "core/fileio.pxi"
include "core/readwrite.pxi"
include "core/introspection.pxi"
include "core/load.pxi"
include "core/grow.pxi"
include "engine.pxi"
include "volume.pxi"
