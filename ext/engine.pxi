# The Engine binding: each method converts its arguments, takes the lock through `lock`
# (or `lock_python`), calls one core function and raises through `error`.

# Largest accepted sizes: chunk offsets ((slot - 1) * chunk_size) stay far below 2**63.
cdef uint64_t MAX_CHUNK_SIZE = 1 << 30
cdef uint64_t MAX_PAGE_ENTRIES = 1 << 26
cdef uint64_t SMALL_IO = 64 << 10   # at most this much I/O through the mapping keeps the GIL

cdef enum:
    SHARED = 0
    EXCLUSIVE = 1


cdef Key lookup_key(object obj) except *:
    """A map id; not `valid` when obj is not an integer in int64 range (no map has that id)."""
    cdef Key key
    cdef int overflow = 0
    key.id = 0
    key.valid = 0
    if not isinstance(obj, int):
        try:
            obj = PyNumber_Index(obj)
        except TypeError:
            return key
    key.id = PyLong_AsLongLongAndOverflow(obj, &overflow)
    key.valid = not overflow
    return key


cdef int64_t new_map_id(object obj) except? -1:
    """The id for a new map: an integer in int64 range."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(PyNumber_Index(obj), &overflow)
    if overflow:
        raise ValueError(f"map id {obj} is out of range")
    return v


cdef int as_int64(object obj, int64_t *out) except -1:
    """1 and the value when the integer fits in int64, 0 when it does not (out of any range)."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(obj if isinstance(obj, int) else PyNumber_Index(obj),
                                                    &overflow)
    if overflow:
        return 0
    out[0] = v
    return 1


cdef int get_bytes_view(object obj, Py_buffer *view) except -1:
    """A flat byte view of any buffer, as memoryview(obj).cast("B") gives it."""
    if type(obj) is bytes or type(obj) is bytearray:
        return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    return PyObject_GetBuffer(memoryview(obj).cast("B"), view, PyBUF_SIMPLE)


cdef uint64_t as_nchunks(State *st, object nchunks, object map_id) except? 0:
    cdef int64_t n
    if not as_int64(nchunks, &n) or n < 0 or <uint64_t>n > <uint64_t>INT64_MAX / st.cs:
        raise ValueError(f"map {map_id} cannot have {nchunks} chunks of {st.cs} bytes")
    return <uint64_t>n


cdef class Engine:
    """Chunk pool and maps of one store. Thread-safe: reads run in parallel, changes alone."""

    def __cinit__(self, fd, chunk_size, page_entries):
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError("chunk_size must be a power of two")
        if page_entries <= 0:
            raise ValueError("page_entries must be positive")
        if chunk_size > MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be at most {MAX_CHUNK_SIZE}")
        if page_entries > MAX_PAGE_ENTRIES:
            raise ValueError(f"page_entries must be at most {MAX_PAGE_ENTRIES}")
        if state_init(&self.st, fd, chunk_size, page_entries):
            raise MemoryError()
        if cs_rwlock_init(&self.rwlock):
            raise MemoryError("cannot create the engine's lock")
        self.rwlock_ready = True

    def __init__(self, fd, chunk_size, page_entries):
        """An engine with no maps on the data file `fd` (`__cinit__` did the work)."""

    def __dealloc__(self):
        state_free(&self.st)
        if self.rwlock_ready:
            pthread_rwlock_destroy(&self.rwlock)

    @property
    def chunk_size(self):
        return self.st.cs

    @property
    def page_entries(self):
        return self.st.pe

    @property
    def writes(self):
        """Data writes so far: unchanged since a flush began, there is no data to sync."""
        cdef const pthread_rwlock_t *outer = self.lock_python(SHARED)
        try:
            return self.st.writes
        finally:
            self.unlock_python(outer)

    # -- the lock ------------------------------------------------------------

    cdef int lock(self, bint exclusive, Err *err) noexcept nogil:
        """Take the lock, waiting for it (call without the GIL: the lock is never waited for
        with it); E_REENTERED when this thread holds it to run Python code."""
        if cs_rwlock_take(&self.rwlock, exclusive) == 0:
            return 0
        err.kind = E_REENTERED
        return -1

    cdef void unlock(self) noexcept nogil:
        pthread_rwlock_unlock(&self.rwlock)

    cdef const pthread_rwlock_t *lock_python(self, bint exclusive) except? NULL:
        """Take the lock (waiting without the GIL) to build Python objects under it; returns
        the lock this thread held so before, for `unlock_python`."""
        cdef Err err = NO_ERROR
        with nogil:
            self.lock(exclusive, &err)
        if err.kind:
            raise error(&self.st, &err, ())
        return cs_rwlock_mark_python(&self.rwlock)

    cdef void unlock_python(self, const pthread_rwlock_t *outer) noexcept:
        cs_rwlock_mark_python(outer)
        pthread_rwlock_unlock(&self.rwlock)

    # -- loading -------------------------------------------------------------

    def load_page(self, page_id, blob):
        """Register a stored page; only valid before `finish_load`."""
        cdef Err err = NO_ERROR
        cdef Py_buffer view
        cdef int64_t pid = 0
        PyObject_GetBuffer(blob, &view, PyBUF_SIMPLE)
        try:
            if <uint64_t>view.len != 2 * FMT_ENTRY_BYTES * self.st.pe:
                raise ValueError(f"page {page_id} has {view.len} bytes, expected {2 * FMT_ENTRY_BYTES * self.st.pe}")
            if not as_int64(page_id, &pid) or pid <= 0 or pid == INT64_MAX:
                raise ValueError(f"page id {page_id} is invalid or repeated")
            with nogil:
                if self.lock(EXCLUSIVE, &err) == 0:
                    page_load(&self.st, pid, view.buf, &err)
                    self.unlock()
        finally:
            PyBuffer_Release(&view)
        if err.kind:
            raise error(&self.st, &err, (page_id,))

    def load_map(self, map_id, nchunks, directory, parent_id=None):
        """Register a stored map whose pages were loaded with `load_page`; `parent_id` is the
        map its partial chunks read through (linked by `finish_load`)."""
        cdef Err err = NO_ERROR
        cdef Py_buffer view
        cdef uint64_t n, npages, want
        cdef int64_t key, parent
        cdef bint has_parent = parent_id is not None
        PyObject_GetBuffer(directory, &view, PyBUF_SIMPLE)
        try:
            if view.len % FMT_PAGE_ID_BYTES:
                raise ValueError("bytes length not a multiple of item size")
            npages = <uint64_t>view.len / FMT_PAGE_ID_BYTES
            if nchunks < 0:
                raise ValueError(f"map {map_id} cannot have {nchunks} chunks")
            want = -(-nchunks // self.st.pe)
            if npages != want:
                raise ValueError(f"map {map_id} directory has {npages} pages, expected {want}")
            n = as_nchunks(&self.st, nchunks, map_id)
            key = new_map_id(map_id)
            parent = new_map_id(parent_id) if has_parent else 0
            with nogil:
                if self.lock(EXCLUSIVE, &err) == 0:
                    map_load(&self.st, key, n, view.buf, npages, has_parent, parent, &err)
                    self.unlock()
        finally:
            PyBuffer_Release(&view)
        if err.kind:
            raise error(&self.st, &err, (map_id,))

    def finish_load(self, nslots):
        """Derive slot refcounts from the loaded pages; unreferenced pages become dead."""
        cdef Err err = NO_ERROR
        cdef int64_t n = 0
        if not as_int64(nslots, &n):
            err.kind = E_POOL_LIMIT if nslots > 0 else E_POOL_INVALID
            raise error(&self.st, &err, (nslots,))
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                load_finish(&self.st, n, &err)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, (nslots,))

    def set_verify(self, verify):
        """Check the sum of every chunk read that has one; a mismatch raises `Corruption`."""
        cdef Err err = NO_ERROR
        cdef bint v = bool(verify)
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                reads_set_verify(&self.st, v)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, ())

    def set_preallocate(self, step):
        """Reserve file blocks ahead of a growing pool, up to `step` bytes at a time (as
        much as the pool holds, from 1 MiB); 0 turns it off. `trim_free_tail` gives them back."""
        cdef Err err = NO_ERROR
        cdef int64_t v = 0
        if not as_int64(step, &v) or v < 0:
            raise ValueError(f"preallocation step {step!r} is not a byte count")
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                pool_set_prealloc_step(&self.st, <uint64_t>v)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, ())

    def set_max_slots(self, max_slots):
        """Limit the pool: allocating beyond `max_slots` raises `NoSpace`."""
        cdef Err err = NO_ERROR
        cdef int64_t v = -1
        if not as_int64(min(max_slots, <uint32_t>FMT_SLOT_MASK), &v) or v < -1:
            v = -1     # any negative limit behaves as -1: nothing can be allocated
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                pool_set_limit(&self.st, v)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, ())

    # -- maps ----------------------------------------------------------------

    def create_map(self, map_id, nchunks):
        cdef Err err = NO_ERROR
        cdef int64_t key = new_map_id(map_id)
        cdef uint64_t n = as_nchunks(&self.st, nchunks, map_id)
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                map_create(&self.st, key, n, &err)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, (map_id,))

    def clone_map(self, map_id, source_id, child=False):
        """A new map sharing every page of `source_id`: no entry or chunk is copied.

        With `child`, the source becomes the new map's parent: its partial chunks read
        through it, so it can be neither written nor dropped while it has children. Without,
        the new map takes the source's place (its parent too), as a commit does.
        """
        cdef Err err = NO_ERROR
        cdef bint as_child = child
        cdef int64_t key = new_map_id(map_id)
        cdef Key source = lookup_key(source_id)
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                map_clone(&self.st, key, source, as_child, &err)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, (map_id, source_id))

    def drop_map(self, map_id):
        cdef Err err = NO_ERROR
        cdef Key key = lookup_key(map_id)
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                map_drop(&self.st, key, &err)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, (map_id,))

    def grow_map(self, map_id, nchunks):
        """Give the map `nchunks` chunks, the new ones unallocated (read as zeros): only its
        directory grows, by empty pages. It may shrink back only over unallocated chunks (a
        grow undone); a map with children cannot change."""
        cdef Err err = NO_ERROR
        cdef Key key = lookup_key(map_id)
        cdef uint64_t n = as_nchunks(&self.st, nchunks, map_id)
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                map_grow(&self.st, key, n, &err)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, (map_id,))

    def has_map(self, map_id):
        cdef Err err = NO_ERROR
        cdef Key key = lookup_key(map_id)
        cdef bint found = False
        with nogil:
            if self.lock(SHARED, &err) == 0:
                found = map_find(&self.st, key) != NULL
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, (map_id,))
        return found

    def map_directory(self, map_id):
        cdef Key key = lookup_key(map_id)
        cdef Map *m
        cdef const pthread_rwlock_t *outer = self.lock_python(SHARED)
        try:
            m = map_find(&self.st, key)
            if m == NULL:
                raise KeyError(map_id)
            return directory_bytes(&self.st, m)
        finally:
            self.unlock_python(outer)

    # -- I/O -----------------------------------------------------------------

    cdef void read_into(self, Key key, bint fits, int64_t off, int64_t n, unsigned char *buf,
                        Err *err) noexcept:
        """Read into buf (NULL: only the checks), errors in err. Small reads through the
        mapping keep the GIL when the lock is free at once."""
        cdef State *st = &self.st
        cdef unsigned char *tmp = NULL
        if <uint64_t>n <= SMALL_IO and st.view != NULL and not st.verify:
            if cs_rwlock_try(&self.rwlock, SHARED) == 0:
                io_read(st, key, fits, off, n, buf, err, &tmp)
                self.unlock()
                free(tmp)
                return
        with nogil:
            if self.lock(SHARED, err) == 0:
                io_read(st, key, fits, off, n, buf, err, &tmp)
                self.unlock()
            free(tmp)

    cdef void write_from(self, Key key, bint fits, int64_t off, int64_t n, const unsigned char *data,
                         Err *err) noexcept:
        """Write data (NULL: zeros), errors in err. A small overwrite of a fresh slot keeps
        the GIL when the lock is free at once; anything else releases it."""
        cdef State *st = &self.st
        cdef int done
        if data != NULL and <uint64_t>n <= SMALL_IO and st.view_writable:
            if cs_rwlock_try(&self.rwlock, EXCLUSIVE) == 0:
                done = io_overwrite_fresh(st, key, fits, off, n, data, err)
                self.unlock()
                if done:
                    return
        with nogil:
            if self.lock(EXCLUSIVE, err) == 0:
                io_write(st, key, fits, off, n, data, err)
                self.unlock()

    cdef void io_pread(self, Key key, int64_t off, int64_t n, unsigned char *buf, Err *err) noexcept nogil:
        """Read for a caller without the GIL (the FUSE server): `read_into` without its
        GIL-held fast path."""
        cdef unsigned char *tmp = NULL
        if self.lock(SHARED, err) == 0:
            io_read(&self.st, key, True, off, n, buf, err, &tmp)
            self.unlock()
        free(tmp)

    cdef void io_pwrite(self, Key key, int64_t off, int64_t n, const unsigned char *data, Err *err) noexcept nogil:
        """Write (data NULL: zeros) for a caller without the GIL; a full pool is reported in
        err, and making room (`Volume._reclaim`) is the caller's, once it has the GIL."""
        if self.lock(EXCLUSIVE, err) == 0:
            io_write(&self.st, key, True, off, n, data, err)
            self.unlock()

    cdef int io_errno(self, const Err *err) noexcept nogil:
        """The errno a file system reports for an I/O error of `io_pread`/`io_pwrite`: ESTALE
        when the map is gone (its snapshot was committed or removed), ENOSPC when the pool
        or its file system is full, EIO for the rest."""
        if err.kind == E_OK:
            return 0
        if err.kind == E_KEY:
            return ESTALE
        if err.kind == E_NOSPACE or err.kind == E_NOSPACE_WRITE or err.kind == E_FULL:
            return ENOSPC
        if err.kind == E_RANGE:
            return EINVAL
        if err.kind == E_NOMEM:
            return ENOMEM
        return EIO

    cdef int _read(self, object map_id, unsigned char *buf, Py_ssize_t length, object offset,
                   bint readonly) except -1:
        cdef Err err = NO_ERROR
        cdef int64_t off = 0
        cdef bint fits = as_int64(offset, &off)
        # into read-only memory: the checks, then TypeError; nothing is written
        self.read_into(lookup_key(map_id), fits, off, length, NULL if readonly else buf, &err)
        if err.kind:
            raise error(&self.st, &err, (map_id,), offset, length)
        if readonly and length:
            raise TypeError("cannot modify read-only memory")
        return 0

    def pread(self, map_id, Py_ssize_t length, offset):
        if length < 0:
            raise ValueError("negative count")
        cdef bytes out = PyBytes_FromStringAndSize(NULL, length)
        self._read(map_id, <unsigned char *>PyBytes_AS_STRING(out), length, offset, False)
        return out

    def read(self, map_id, buffer, offset):
        """Fill `buffer` (any writable buffer) with the map's bytes from `offset`."""
        cdef Py_buffer view
        get_bytes_view(buffer, &view)
        try:
            self._read(map_id, <unsigned char *>view.buf, view.len, offset, view.readonly)
        finally:
            PyBuffer_Release(&view)

    cdef int _write(self, object map_id, const unsigned char *data, object offset, object length) except -1:
        cdef Err err = NO_ERROR
        cdef int64_t off = 0, n = 0
        cdef bint fits = as_int64(offset, &off) & as_int64(length, &n)
        self.write_from(lookup_key(map_id), fits, off, n, data, &err)
        if err.kind:
            raise error(&self.st, &err, (map_id,), offset, length)
        return 0

    def write(self, map_id, data, offset):
        """Write `data` (any buffer) at `offset`, copying shared pages and chunks first."""
        cdef Py_buffer view
        get_bytes_view(data, &view)
        try:
            self._write(map_id, <const unsigned char *>view.buf, offset, view.len)
        finally:
            PyBuffer_Release(&view)

    def zero(self, map_id, offset, length):
        """Make a range read as zeros; whole chunks become unallocated."""
        self._write(map_id, NULL, offset, length)

    def seal(self, map_id):
        """Compute the missing chunk sums of a map (at commit); returns how many it computed."""
        cdef Err err = NO_ERROR
        cdef Key key = lookup_key(map_id)
        cdef uint64_t count = 0
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                map_seal(&self.st, key, &count, &err)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, (map_id,))
        return count

    def close(self):
        """End I/O: later reads and writes raise Closed, and the mapping goes, so a handle
        that outlives its store can never write into the data file. Idempotent."""
        cdef Err err = NO_ERROR
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                data_close(&self.st)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, ())

    def flush_data(self):
        cdef Err err = NO_ERROR
        cdef int fd = self.st.fd
        with nogil:
            data_sync(fd, &err)
        if err.kind:
            raise error(&self.st, &err, ())

    # -- introspection -------------------------------------------------------

    def depth_runs(self, chain, first_chunk, count):
        """Runs of (chunks, depth, allocated) for chunks of chain[0]: depth k+1 means the
        map chain[k] supplies the chunk (its entry differs from chain[k+1]'s), 0 none."""
        cdef Err err = NO_ERROR
        cdef tuple ids = tuple(chain)
        cdef size_t nmaps = len(ids), i
        cdef Key *keys
        cdef Map **maps
        cdef int64_t first = 0, cnt = 0
        cdef bint fits
        cdef DepthRuns runs
        if nmaps == 0:
            raise ValueError("the chain is empty")
        fits = as_int64(first_chunk, &first) & as_int64(count, &cnt)
        runs.a = NULL
        runs.n = runs.cap = 0
        keys = <Key *>malloc(nmaps * sizeof(Key))
        maps = <Map **>malloc(nmaps * sizeof(Map *))
        try:
            if keys == NULL or maps == NULL:
                raise MemoryError()
            for i in range(nmaps):
                keys[i] = lookup_key(ids[i])
            with nogil:
                if self.lock(SHARED, &err) == 0:
                    depth_runs_collect(&self.st, keys, maps, nmaps, fits, first, cnt, &runs, &err)
                    self.unlock()
            if err.kind:
                raise error(&self.st, &err, ids, first_chunk, count)
            return [(runs.a[i].count, runs.a[i].depth, runs.a[i].allocated != 0) for i in range(runs.n)]
        finally:
            free(keys)
            free(maps)
            free(runs.a)

    def diff_runs(self, a_id, b_id):
        """Runs of (first_chunk, count) whose slots differ between two maps."""
        cdef Err err = NO_ERROR
        cdef Key a = lookup_key(a_id)
        cdef Key b = lookup_key(b_id)
        cdef DiffRuns runs
        cdef size_t i
        runs.a = NULL
        runs.n = runs.cap = 0
        try:
            with nogil:
                if self.lock(SHARED, &err) == 0:
                    diff_runs_collect(&self.st, a, b, &runs, &err)
                    self.unlock()
            if err.kind:
                raise error(&self.st, &err, (a_id, b_id))
            return [(runs.a[i].first, runs.a[i].count) for i in range(runs.n)]
        finally:
            free(runs.a)

    def exclusive_chunks(self, map_id, parent_id):
        """Chunks allocated in the map that its parent does not share."""
        cdef Err err = NO_ERROR
        cdef Key key = lookup_key(map_id)
        cdef bint has_parent = parent_id is not None
        cdef Key parent = lookup_key(parent_id) if has_parent else key
        cdef uint64_t count = 0
        with nogil:
            if self.lock(SHARED, &err) == 0:
                exclusive_count(&self.st, key, has_parent, parent, &count, &err)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, (map_id, parent_id))
        return count

    def stats(self):
        cdef Err err = NO_ERROR
        cdef PoolStats s
        memset(&s, 0, sizeof(PoolStats))
        with nogil:
            if self.lock(SHARED, &err) == 0:
                pool_stats(&self.st, &s)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, ())
        return {"slots": s.slots, "used": s.used, "free": s.free, "pending": s.pending, "maps": s.maps}

    def refcounts(self):
        """Slot refcounts as little-endian uint32, index 0 unused: for `Store.check`."""
        cdef const pthread_rwlock_t *outer = self.lock_python(SHARED)
        try:
            return refcounts_bytes(&self.st)
        finally:
            self.unlock_python(outer)

    def take_free(self):
        """Take every free slot out of circulation (to punch holes), ascending; `release` returns them."""
        cdef Err err = NO_ERROR
        cdef U32Vec out
        cdef size_t i
        out.a = NULL
        out.n = out.cap = 0
        try:
            with nogil:
                if self.lock(EXCLUSIVE, &err) == 0:
                    pool_take_free(&self.st, &out, &err)
                    self.unlock()
            if err.kind:
                raise error(&self.st, &err, ())
            return sorted([out.a[i] for i in range(out.n)])
        finally:
            free(out.a)

    def trim_free_tail(self):
        """Shrink the pool and the data file past its last used or pending slot, and give
        back blocks reserved past the end; returns the pool size."""
        cdef Err err = NO_ERROR
        cdef uint64_t n = 0
        with nogil:
            if self.lock(EXCLUSIVE, &err) == 0:
                pool_trim_tail(&self.st, &n, &err)
                self.unlock()
        if err.kind:
            raise error(&self.st, &err, ())
        return n

    # -- persistence ---------------------------------------------------------

    def take_changes(self, refcounts=False):
        """Hand over everything changed since the last call; the caller makes it durable.
        With `refcounts`, the slot refcounts of the same moment come along."""
        cdef const pthread_rwlock_t *outer = self.lock_python(EXCLUSIVE)
        try:
            return changes_take(&self.st, refcounts)
        finally:
            self.unlock_python(outer)

    def release(self, freed):
        """Make slots freed by durable metadata available again."""
        cdef Err err = NO_ERROR
        cdef tuple items = tuple(freed)
        cdef size_t n = len(items), i
        cdef uint32_t *slots
        cdef int64_t v
        if n == 0:
            return
        slots = <uint32_t *>malloc(n * sizeof(uint32_t))
        if slots == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                if not as_int64(items[i], &v) or v <= 0 or v > <int64_t>0xFFFFFFFF:
                    raise ValueError(f"slot {items[i]} is not in the pool")
                slots[i] = <uint32_t>v
            with nogil:
                if self.lock(EXCLUSIVE, &err) == 0:
                    pool_release(&self.st, slots, n, &err)
                    self.unlock()
            if err.kind:
                raise error(&self.st, &err, items)
        finally:
            free(slots)
