# The chunk pool: slot refcounts (derived from the maps), the free stack, the slots freed
# since the last take_changes (pending: not reusable until the metadata freeing them is
# durable), fresh slots (allocated since then), and blocks reserved ahead of the pool.

cdef uint64_t PREALLOC_MIN = <uint64_t>1 << 20


cdef inline uint64_t bit_bytes(uint64_t cap) noexcept nogil:
    return cap / 8 + 1


cdef int slots_ensure(State *st, uint64_t idx) noexcept nogil:
    """refs and freebit can be indexed by `idx`; -1 when out of memory."""
    cdef uint64_t cap, old
    cdef uint32_t *r
    cdef uint8_t *b
    if idx < st.slot_cap:
        return 0
    cap = st.slot_cap * 2 if st.slot_cap else 1024
    while cap <= idx:
        cap *= 2
    r = <uint32_t *>realloc(st.refs, cap * sizeof(uint32_t))
    if r == NULL:
        return -1
    st.refs = r
    memset(r + st.slot_cap, 0, (cap - st.slot_cap) * sizeof(uint32_t))
    old = bit_bytes(st.slot_cap) if st.freebit_ready else 0
    b = <uint8_t *>realloc(st.freebit, bit_bytes(cap))
    if b == NULL:
        return -1
    st.freebit = b
    memset(b + old, 0, bit_bytes(cap) - old)
    b = <uint8_t *>realloc(st.freshbit, bit_bytes(cap))
    if b == NULL:
        return -1
    st.freshbit = b
    memset(b + old, 0, bit_bytes(cap) - old)
    st.freebit_ready = 1
    st.slot_cap = cap
    return 0


cdef inline bint slot_is_free(State *st, uint32_t s) noexcept nogil:
    return (st.freebit[s >> 3] >> (s & 7)) & 1


cdef inline bint slot_is_fresh(State *st, uint32_t s) noexcept nogil:
    """No durable map can name the slot: it was allocated after the last take_changes,
    and a crash before the next one leaves it unnamed, whatever it holds."""
    return (st.freshbit[s >> 3] >> (s & 7)) & 1


cdef inline void slot_free_push(State *st, uint32_t s) noexcept nogil:
    """Push a slot on the free stack; the caller has reserved room."""
    st.free.a[st.free.n] = s
    st.free.n += 1
    st.freebit[s >> 3] |= <uint8_t>(1 << (s & 7))


cdef void pool_preallocate(State *st) noexcept nogil:
    """Reserve file blocks past the pool's new end (past the file size too, which stays),
    as much as the pool holds, within prealloc_step and max_slots: writes into reserved
    blocks skip the file system's allocation. The reservation never takes the file
    system's last free space: it leaves at least prealloc_step free. Failure only means
    no reservation."""
    cdef uint64_t start = (st.nslots - 1) * st.cs, length
    cdef statvfs fs
    if start < st.prealloc_end:
        start = st.prealloc_end
    length = start if start > PREALLOC_MIN else PREALLOC_MIN
    if length > st.prealloc_step:
        length = st.prealloc_step
    if st.max_slots >= 0 and start + length > <uint64_t>st.max_slots * st.cs:
        length = <uint64_t>st.max_slots * st.cs - start if <uint64_t>st.max_slots * st.cs > start else 0
    length = (length + st.cs - 1) & ~st.cs_mask
    if length:
        if fstatvfs(st.fd, &fs) < 0 or <uint64_t>fs.f_bavail * fs.f_frsize < length + st.prealloc_step:
            return
        fallocate(st.fd, FALLOC_FL_KEEP_SIZE, <off_t>start, <off_t>length)
    st.prealloc_end = start + length


cdef int slot_alloc(State *st, uint32_t *out, Err *err) noexcept nogil:
    """A slot with refcount 1 in *out; E_NOSPACE when the pool is at max_slots."""
    cdef uint32_t s
    if st.free.n:
        st.free.n -= 1
        s = st.free.a[st.free.n]
        st.freebit[s >> 3] &= <uint8_t>~(1 << (s & 7))
    else:
        if <int64_t>st.nslots >= st.max_slots:
            err.kind = E_NOSPACE
            err.a = <int64_t>st.nslots
            return -1
        if slots_ensure(st, st.nslots + 1) < 0:
            err.kind = E_NOMEM
            return -1
        st.nslots += 1
        s = <uint32_t>st.nslots
        if st.prealloc_step and st.nslots * st.cs > st.prealloc_end:
            pool_preallocate(st)
    st.refs[s] = 1
    st.used += 1
    if not slot_is_fresh(st, s):
        st.freshbit[s >> 3] |= <uint8_t>(1 << (s & 7))
        st.nfresh += 1
    out[0] = s
    return 0


cdef inline void slot_decref(State *st, uint32_t s) noexcept nogil:
    st.refs[s] -= 1
    if st.refs[s] == 0:
        st.used -= 1
        # Callers reserve room; were that to fail, the slot is only lost until the next load.
        if st.pending.n < st.pending.cap or u32_reserve(&st.pending, 1) == 0:
            st.pending.a[st.pending.n] = s
            st.pending.n += 1


cdef int state_init(State *st, int fd, uint64_t cs, uint64_t pe) noexcept nogil:
    """An empty engine on the data file `fd`; -1 when out of memory."""
    cdef unsigned int shift = 0
    st.fd = fd
    st.cs = cs
    while (<uint64_t>1 << shift) < cs:
        shift += 1
    st.cs_shift = shift
    st.cs_mask = cs - 1
    st.pe = pe
    st.sub = cs / FMT_SUB_BLOCKS if cs >= FMT_SUB_BLOCKS else 0
    st.page_bytes = sizeof(Page) + 2 * FMT_ENTRY_BYTES * pe
    st.max_slots = FMT_SLOT_MASK
    st.next_page_id = 1
    cs_bus_guard_install()
    return slots_ensure(st, 0)


cdef void pool_set_limit(State *st, int64_t max_slots) noexcept nogil:
    """Allocating beyond `max_slots` slots fails with E_NOSPACE (-1: nothing can be allocated)."""
    st.max_slots = max_slots


cdef void pool_set_prealloc_step(State *st, uint64_t step) noexcept nogil:
    st.prealloc_step = step


cdef void pool_stats(State *st, PoolStats *out) noexcept nogil:
    out.slots = st.nslots
    out.used = st.used
    out.free = st.free.n
    out.pending = st.pending.n
    out.maps = st.maps.n


cdef int pool_take_free(State *st, U32Vec *out, Err *err) noexcept nogil:
    """Move every free slot out of circulation into *out (the caller frees out.a)."""
    cdef size_t i
    cdef uint32_t s
    if u32_reserve(out, st.free.n):
        err.kind = E_NOMEM
        return -1
    for i in range(st.free.n):
        s = st.free.a[i]
        st.freebit[s >> 3] &= <uint8_t>~(1 << (s & 7))
        out.a[out.n] = s
        out.n += 1
    st.free.n = 0
    return 0


cdef int pool_release(State *st, const uint32_t *slots, size_t n, Err *err) noexcept nogil:
    """Make slots freed by durable metadata available again: all of them, or (E_BAD_SLOT,
    a: the index of one that is not a freed slot of the pool) none."""
    cdef size_t i, j
    cdef uint32_t s
    if u32_reserve(&st.free, n):
        err.kind = E_NOMEM
        return -1
    for i in range(n):
        s = slots[i]
        if s > st.nslots or st.refs[s] != 0 or slot_is_free(st, s):
            for j in range(i):
                st.freebit[slots[j] >> 3] &= <uint8_t>~(1 << (slots[j] & 7))
            err.kind = E_BAD_SLOT
            err.a = <int64_t>i
            return -1
        st.freebit[s >> 3] |= <uint8_t>(1 << (s & 7))
    for i in range(n):
        st.free.a[st.free.n] = slots[i]
        st.free.n += 1
    return 0


cdef int pool_trim_tail(State *st, uint64_t *nslots, Err *err) noexcept nogil:
    """Shrink the pool and the data file past the last used or pending slot, and give back
    blocks reserved past the end; the pool size in *nslots."""
    cdef struct_stat sb
    cdef uint64_t n = st.nslots, target = 0
    cdef size_t i, j
    cdef uint32_t s
    cdef int rc = 0
    while n and slot_is_free(st, <uint32_t>n):
        n -= 1
    nslots[0] = n
    # Truncating, even to the same size, also frees blocks reserved past the end,
    # this session's or those a crash left behind.
    if n < st.nslots:
        target = n * st.cs
    elif fstat(st.fd, &sb) == 0:
        target = <uint64_t>sb.st_size
    else:
        rc = errno
    if rc == 0:
        rc = ftruncate(st.fd, <off_t>target)
        while rc < 0 and errno == EINTR:
            rc = ftruncate(st.fd, <off_t>target)
        rc = errno if rc < 0 else 0
    if rc:
        err.kind = E_OS
        err.errnum = rc
        return -1
    st.prealloc_end = 0
    if n < st.nslots:
        st.file_size = n * st.cs
        j = 0
        for i in range(st.free.n):
            s = st.free.a[i]
            if s <= n:
                st.free.a[j] = s
                j += 1
            else:
                st.freebit[s >> 3] &= <uint8_t>~(1 << (s & 7))
        st.free.n = j
        st.nslots = n
    return 0


cdef bytes refcounts_bytes(State *st):
    """Slot refcounts as little-endian uint32, index 0 unused (under the lock, with the GIL:
    bytes are not tracked by the GC, so no finalizer runs here)."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(FMT_ENTRY_BYTES * (st.nslots + 1)))
    cs_le32_copy(PyBytes_AS_STRING(out), st.refs, st.nslots + 1)
    return out
