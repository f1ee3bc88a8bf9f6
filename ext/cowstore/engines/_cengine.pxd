# cython: language_level=3
"""Declarations of `cowstore.engines._cengine`: the C structs of the engine, the C it calls
(ext/include/*.h) and its two classes.

Cython pairs a module with the .pxd of its full dotted name, so this file and the .pyx sit
at ext/cowstore/engines/ (setup.py builds the module `cowstore.engines._cengine`): the
classes declared here are the module's own, not imported from elsewhere at run time.

Nothing in `State` is a Python object: pages, maps, refcounts and the change lists live in
malloc'd memory, guarded by the Engine's rwlock.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_rwlock_t:
        pass
    int pthread_rwlock_unlock(pthread_rwlock_t *lock)
    int pthread_rwlock_destroy(pthread_rwlock_t *lock)


cdef extern from "cs_sigbus.h" nogil:
    int cs_bus_guard_install()
    int cs_guarded_copy(void *dst, const void *src, size_t n)


cdef extern from "cs_crc32.h" nogil:
    void cs_crc32_init()
    uint32_t cs_crc32(const unsigned char *p, size_t n)


cdef extern from "cs_byteorder.h" nogil:
    void cs_le32_copy(void *dst, const void *src, size_t n)
    void cs_le64_copy(void *dst, const void *src, size_t n)


cdef extern from "cs_rwlock.h" nogil:
    int cs_rwlock_init(pthread_rwlock_t *lock)
    int cs_rwlock_take(pthread_rwlock_t *lock, int exclusive)
    int cs_rwlock_try(pthread_rwlock_t *lock, int exclusive)
    const pthread_rwlock_t *cs_rwlock_mark_python(const pthread_rwlock_t *lock)


cdef extern from "<fcntl.h>" nogil:
    enum: FALLOC_FL_KEEP_SIZE
    int fallocate(int fd, int mode, long offset, long length)


cdef extern from "<sys/statvfs.h>" nogil:
    cdef struct statvfs:
        unsigned long f_frsize
        unsigned long f_bavail
    int fstatvfs(int fd, statvfs *buf)


# A page: this header, then `page_entries` uint32 entries (a slot, 0 = unallocated, with
# the PARTIAL flag in bit 31) and as many uint32 chunk sums (0 = not computed; for a
# partial entry, the bitmap of its sub-blocks present) in the same allocation (see
# `ents()`, `sums()`): 16 bytes of overhead per page, 8 bytes per entry.
cdef struct Page:
    uint64_t id
    uint32_t refs       # maps (directory positions) naming this page
    uint32_t dirty      # 1 + index in State.dirty_pages, 0 = clean


cdef struct Map:
    int64_t id
    uint64_t nchunks
    uint64_t npages
    uint64_t dirty      # 1 + index in State.dirty_maps, 0 = clean
    Page **pages        # npages pointers, NULL = no page (every entry unallocated)
    Map *parent         # where partial chunks read their missing sub-blocks (NULL: zeros)
    uint64_t children   # maps whose parent this is: while any, it cannot change or go
    int64_t parent_key  # between load_map and finish_load: the parent's id
    bint has_parent_key


# Open-addressing hash table int64 -> pointer (NULL value = empty bucket).
cdef struct HEntry:
    int64_t key
    void *val


cdef struct HTable:
    HEntry *tab
    size_t mask
    size_t n


cdef struct U32Vec:
    uint32_t *a
    size_t n
    size_t cap


cdef struct U64Vec:
    uint64_t *a
    size_t n
    size_t cap


cdef struct PtrVec:
    void **a
    size_t n
    size_t cap


# An error of a core function, turned into a Python exception once the lock is released
# (ext/core/errors.pxi: the kinds, and what a and b mean for each).
cdef struct Err:
    int kind
    int errnum
    int64_t a
    int64_t b


# A map id from Python: not `valid` when the object can name no map (not an int64).
cdef struct Key:
    int64_t id
    bint valid


cdef struct PoolStats:
    uint64_t slots
    uint64_t used
    uint64_t free
    uint64_t pending
    uint64_t maps


# Result runs of depth_runs and diff_runs, gathered under the lock, turned into lists after.
cdef struct DepthRun:
    uint64_t count
    uint32_t depth
    uint32_t allocated


cdef struct DepthRuns:
    DepthRun *a
    size_t n
    size_t cap


cdef struct DiffRun:
    uint64_t first
    uint64_t count


cdef struct DiffRuns:
    DiffRun *a
    size_t n
    size_t cap


cdef struct State:
    int fd
    unsigned char *view     # the data file mapped (NULL: read with pread)
    uint64_t view_len       # bytes of address space mapped
    bint view_writable      # the mapping is writable: fresh slots are overwritten through it
    uint64_t file_size      # bytes known to be in the data file: a mapped read below it cannot fault
    uint64_t cs             # chunk size (a power of two)
    uint64_t cs_mask
    unsigned int cs_shift
    uint64_t pe             # page entries
    uint64_t sub            # sub-block size (chunk size / 32); 0: no partial chunks
    size_t page_bytes       # sizeof(Page) + 4 * pe
    HTable maps             # map id -> Map*
    HTable loaded           # page id -> Page*, between load_page and finish_load
    PtrVec loaded_order     # the loaded pages, in load order
    uint32_t *refs          # refs[slot]: (page, entry) references; refs[0] unused
    uint8_t *freebit        # bit per slot: the slot is on the free stack
    uint8_t *freshbit       # bit per slot: allocated since the last take_changes
    uint64_t nfresh         # bits set in freshbit (none: nothing to clear)
    uint64_t slot_cap       # entries allocated in refs (and bits in freebit and freshbit)
    bint freebit_ready      # freebit and freshbit hold bit_bytes(slot_cap) initialised bytes
    uint64_t nslots
    int64_t max_slots
    uint64_t prealloc_step  # reserve at most this many bytes ahead of the pool (0: none)
    uint64_t prealloc_end   # blocks are reserved (or were tried) up to this byte offset
    uint64_t used           # slots with refs != 0
    U32Vec free             # stack: pop from the end
    U32Vec pending          # freed since the last take_changes
    uint64_t next_page_id
    PtrVec dirty_pages      # Page*, NULL where a dirty page died
    PtrVec dirty_maps       # Map*, NULL where a dirty map was dropped
    U64Vec dead             # ids of pages whose refcount reached 0
    unsigned char *scratch  # one chunk, for partial copy-on-write (exclusive lock held)
    bint loading            # load_page/load_map called, finish_load not yet
    bint running            # finish_load called, or slot refcounts touched
    bint verify             # reads check the sums of chunks that have one
    bint closed             # close() ran: no more I/O, the mapping is gone
    uint64_t writes         # data writes so far (data_write, data_overwrite): flush skips when unchanged



cdef class Engine:
    # The binding (ext/engine.pxi): State is the core's, the lock is taken through `lock`.
    cdef State st
    cdef pthread_rwlock_t rwlock
    cdef bint rwlock_ready

    cdef int lock(self, bint exclusive, Err *err) noexcept nogil
    cdef void unlock(self) noexcept nogil
    cdef const pthread_rwlock_t *lock_python(self, bint exclusive) except? NULL
    cdef void unlock_python(self, const pthread_rwlock_t *outer) noexcept
    cdef void read_into(self, Key key, bint fits, int64_t off, int64_t n, unsigned char *buf,
                        Err *err) noexcept
    cdef void write_from(self, Key key, bint fits, int64_t off, int64_t n, const unsigned char *data,
                         Err *err) noexcept
    cdef void io_pread(self, Key key, int64_t off, int64_t n, unsigned char *buf, Err *err) noexcept nogil
    cdef void io_pwrite(self, Key key, int64_t off, int64_t n, const unsigned char *data, Err *err) noexcept nogil
    cdef int io_errno(self, const Err *err) noexcept nogil
    cdef int _read(self, object map_id, unsigned char *buf, Py_ssize_t length, object offset,
                   bint readonly) except -1
    cdef int _write(self, object map_id, const unsigned char *data, object offset, object length) except -1


cdef class VolumeBase:
    # The binding (ext/volume.pxi): one map of an engine, I/O through Engine.read_into/write_from.
    cdef Engine _engine
    cdef Key _map
    cdef object _key
    cdef int64_t _size
    cdef bint _readonly
    cdef bint _closed

    cdef int _check(self, object offset, object length, int64_t *off, int64_t *n, int64_t max_length) except -1
    cdef int _check_writable(self) except -1
    cdef int _read(self, unsigned char *buf, int64_t off, int64_t n) except -1
    cdef int _write(self, const unsigned char *data, int64_t off, int64_t n) except -1
