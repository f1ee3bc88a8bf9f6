# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, overflowcheck=False, binding=True
"""The Cython engine: the same interface, semantics and bytes as `cowstore._pyengine`.

Every piece of metadata is plain C (see `_cengine.pxd`): a page is one malloc'd block, a
16-byte header then `page_entries` uint32 slots and as many uint32 chunk sums (12 bytes
of metadata per mapped chunk with the slot refcounts); a map is an array of page
pointers; maps are found through an int64 hash table; slot refcounts are one uint32
array. Chunk sums are zlib's CRC-32, computed here in C (slice-by-8).

One rwlock guards the state: reads take it shared, everything that changes metadata takes
it exclusive. The lock is only ever waited for without the GIL (a try-lock may be taken
with it), and system calls (pread, pwrite, fsync, ftruncate) always run without it.

Reads copy from a shared mapping of the data file (no system call per read). Writes that
allocate stay pwrite, so a full disk is an error, not a fault. Overwrites in place of
bytes the file holds copy into the mapping only in fresh slots, those allocated since the
last take_changes: a process killed in the middle of a copy leaves it torn at any cache
line, which is harmless in a slot no durable map names. Every other overwrite is pwrite,
which a kill leaves applied by whole pages. A copy that faults (the file shrank under the
store's lock, or the disk failed) raises Corruption on a read and EIO on a write; bytes
past the end of the file inside its last page read as zeros, which only an outside
truncation while the store is open can cause. Small I/O through the mapping keeps the GIL
when the lock is free at once: releasing and taking it back costs more than a copy of a
few pages.

Both engines refuse, before changing anything, a write that would hit `NoSpace`, loading
after `finish_load`, a `release` of slots that are not freed slots of the pool, negative
sizes and an empty chain. This one is stricter still where the reference only fails
later: slot-refcount changes (write, zero, drop_map) between `load_*` and `finish_load`
and ids beyond int64 raise ValueError; entries beyond a shorter map's end compare as
unallocated in depth_runs and exclusive_chunks; a read into read-only memory raises
TypeError.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.number cimport PyNumber_Index
from libc.errno cimport EINTR, EIO, errno
from libc.stdint cimport INT64_MAX, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.types cimport off_t
from posix.unistd cimport fsync, ftruncate, pread, pwrite


from os import strerror as _strerror

from cowstore.engines.format import MAX_SLOT, PARTIAL, SUB_BLOCKS, Changes, chunk_sum
from cowstore.errors import Closed, Corruption, InvalidArgument, NoSpace, NotFound, ReadOnly


cs_crc32_init()


cdef enum:
    E_OK = 0
    E_KEY           # a: index of the missing map id among the call's ids
    E_RANGE
    E_NOSPACE       # a: slots in the pool
    E_CORRUPT       # a: data-file offset of the short read
    E_OS            # errnum
    E_NOMEM
    E_EXISTS
    E_LOADING       # needs finish_load first
    E_FINISHED      # load_* / finish_load after the engine started
    E_DUP_PAGE
    E_NO_PAGE       # a: page id
    E_SLOT_BEYOND   # a: page id, b: slot
    E_BAD_SLOT      # a: slot
    E_REFS          # a refcount would overflow uint32
    E_CHECKSUM      # a: chunk, b: slot
    E_CLOSED
    E_CHILDREN      # a: how many child maps
    E_BAD_PARENT    # a: map id, b: the parent id it names

# Largest accepted sizes: chunk offsets ((slot - 1) * chunk_size) stay far below 2**63.
cdef uint64_t MAX_CHUNK_SIZE = 1 << 30
cdef uint64_t MAX_PAGE_ENTRIES = 1 << 26
cdef uint32_t DIRTY_LIMIT = 0xFFFFFFF0u
cdef size_t IO_MAX = 1 << 30
cdef uint64_t SMALL_IO = 64 << 10   # at most this much I/O through the mapping keeps the GIL
cdef uint32_t FLAG_PARTIAL = 0x80000000u  # entry flag: a partial chunk (see _pyengine.SUB_BLOCKS)
cdef uint32_t SLOT_MASK = 0x7FFFFFFFu
cdef uint32_t FULL_BITS = 0xFFFFFFFFu


# -- small C containers --------------------------------------------------------

cdef inline uint32_t *ents(Page *p) noexcept nogil:
    return <uint32_t *>(p + 1)


cdef inline uint32_t *sums(State *st, Page *p) noexcept nogil:
    return <uint32_t *>(p + 1) + st.pe


cdef inline uint32_t chunk_crc(const unsigned char *data, uint64_t n) noexcept nogil:
    """The reference's chunk_sum: CRC-32, with 0 (meaning "none yet") kept as 1."""
    cdef uint32_t c = cs_crc32(data, n)
    return c if c else 1


cdef int _grow(void **a, size_t *cap, size_t need, size_t size) noexcept nogil:
    """Make room for `need` elements of `size` bytes; -1 when out of memory."""
    cdef size_t c
    cdef void *p
    if need <= cap[0]:
        return 0
    c = cap[0] * 2 if cap[0] else 16
    if c < need:
        c = need
    if c > (<size_t>-1) / size:
        return -1
    p = realloc(a[0], c * size)
    if p == NULL:
        return -1
    a[0] = p
    cap[0] = c
    return 0


cdef inline int u32_reserve(U32Vec *v, size_t k) noexcept nogil:
    return _grow(<void **>&v.a, &v.cap, v.n + k, sizeof(uint32_t))


cdef inline int u64_reserve(U64Vec *v, size_t k) noexcept nogil:
    return _grow(<void **>&v.a, &v.cap, v.n + k, sizeof(uint64_t))


cdef inline int ptr_reserve(PtrVec *v, size_t k) noexcept nogil:
    return _grow(<void **>&v.a, &v.cap, v.n + k, sizeof(void *))


cdef inline size_t _hash(int64_t key) noexcept nogil:
    cdef uint64_t x = <uint64_t>key
    x ^= x >> 30
    x *= 0xbf58476d1ce4e5b9ULL
    x ^= x >> 27
    x *= 0x94d049bb133111ebULL
    x ^= x >> 31
    return <size_t>x


cdef void *ht_get(HTable *h, int64_t key) noexcept nogil:
    cdef size_t i
    if h.n == 0:
        return NULL
    i = _hash(key) & h.mask
    while h.tab[i].val != NULL:
        if h.tab[i].key == key:
            return h.tab[i].val
        i = (i + 1) & h.mask
    return NULL


cdef int ht_reserve(HTable *h, size_t extra) noexcept nogil:
    """Room for `extra` more keys at a load factor of at most 3/4; -1 when out of memory."""
    cdef size_t need = h.n + extra, cap = 16, i, j, oldcap
    cdef HEntry *tab
    cdef HEntry *old
    if h.tab != NULL and need * 4 <= (h.mask + 1) * 3:
        return 0
    while cap * 3 < need * 4:
        if cap > (<size_t>-1) / (4 * sizeof(HEntry)):
            return -1
        cap *= 2
    tab = <HEntry *>calloc(cap, sizeof(HEntry))
    if tab == NULL:
        return -1
    old = h.tab
    oldcap = h.mask + 1 if old != NULL else 0
    h.tab = tab
    h.mask = cap - 1
    for i in range(oldcap):
        if old[i].val != NULL:
            j = _hash(old[i].key) & h.mask
            while tab[j].val != NULL:
                j = (j + 1) & h.mask
            tab[j] = old[i]
    free(old)
    return 0


cdef void ht_put(HTable *h, int64_t key, void *val) noexcept nogil:
    """Insert a key known to be absent; the caller has reserved room."""
    cdef size_t i = _hash(key) & h.mask
    while h.tab[i].val != NULL:
        i = (i + 1) & h.mask
    h.tab[i].key = key
    h.tab[i].val = val
    h.n += 1


cdef void ht_del(HTable *h, int64_t key) noexcept nogil:
    """Remove a key (linear probing, backward-shift deletion: no tombstones)."""
    cdef size_t i, j, k
    if h.n == 0:
        return
    i = _hash(key) & h.mask
    while h.tab[i].val != NULL and h.tab[i].key != key:
        i = (i + 1) & h.mask
    if h.tab[i].val == NULL:
        return
    j = i
    while True:
        j = (j + 1) & h.mask
        if h.tab[j].val == NULL:
            break
        k = _hash(h.tab[j].key) & h.mask
        # The entry at j stays unless its home k lies cyclically outside (i, j].
        if (i < k <= j) if i <= j else (i < k or k <= j):
            continue
        h.tab[i] = h.tab[j]
        i = j
    h.tab[i].val = NULL
    h.n -= 1


# -- slots, pages, maps ----------------------------------------------------------

cdef inline uint32_t entry(State *st, Map *m, uint64_t chunk) noexcept nogil:
    """The slot of a chunk inside the map."""
    cdef Page *p = m.pages[chunk / st.pe]
    if p == NULL:
        return 0
    return ents(p)[chunk % st.pe]


cdef inline uint32_t entry_cov(State *st, Map *m, uint64_t chunk) noexcept nogil:
    """The slot of any chunk: 0 beyond the map's end."""
    if chunk >= m.nchunks:
        return 0
    return entry(st, m, chunk)


cdef inline Page *span_page(Map *m, uint64_t p, uint64_t end, Page *partial) noexcept nogil:
    """The map's page `p` if it covers chunks up to `end`, NULL if all its entries there are
    0, `partial` if the map ends inside the span (compare chunk by chunk)."""
    cdef Page *pg
    if p >= m.npages:
        return NULL
    pg = m.pages[p]
    if pg == NULL:
        return NULL
    if m.nchunks < end:
        return partial
    return pg


cdef inline uint64_t bit_bytes(uint64_t cap) noexcept nogil:
    return cap / 8 + 1


cdef int ensure_slots(State *st, uint64_t idx) noexcept nogil:
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


cdef inline bint is_free(State *st, uint32_t s) noexcept nogil:
    return (st.freebit[s >> 3] >> (s & 7)) & 1


cdef inline bint is_fresh(State *st, uint32_t s) noexcept nogil:
    """No durable map can name the slot: it was allocated after the last take_changes,
    and a crash before the next one leaves it unnamed, whatever it holds."""
    return (st.freshbit[s >> 3] >> (s & 7)) & 1


cdef inline void free_push(State *st, uint32_t s) noexcept nogil:
    """Push a slot on the free stack; the caller has reserved room."""
    st.free.a[st.free.n] = s
    st.free.n += 1
    st.freebit[s >> 3] |= <uint8_t>(1 << (s & 7))


cdef void preallocate(State *st) noexcept nogil:
    """Reserve file blocks past the pool's new end (past the file size too, which stays),
    as much as the pool holds, within prealloc_step and max_slots: writes into reserved
    blocks skip the file system's allocation. Failure only means no reservation."""
    cdef uint64_t start = (st.nslots - 1) * st.cs, length
    if start < st.prealloc_end:
        start = st.prealloc_end
    length = start if start > PREALLOC_MIN else PREALLOC_MIN
    if length > st.prealloc_step:
        length = st.prealloc_step
    if st.max_slots >= 0 and start + length > <uint64_t>st.max_slots * st.cs:
        length = <uint64_t>st.max_slots * st.cs - start if <uint64_t>st.max_slots * st.cs > start else 0
    length = (length + st.cs - 1) & ~st.cs_mask
    if length:
        fallocate(st.fd, FALLOC_FL_KEEP_SIZE, <off_t>start, <off_t>length)
    st.prealloc_end = start + length


cdef int st_alloc(State *st, uint32_t *out) noexcept nogil:
    """A slot with refcount 1: 0, or E_NOSPACE / E_NOMEM."""
    cdef uint32_t s
    if st.free.n:
        st.free.n -= 1
        s = st.free.a[st.free.n]
        st.freebit[s >> 3] &= <uint8_t>~(1 << (s & 7))
    else:
        if <int64_t>st.nslots >= st.max_slots:
            return E_NOSPACE
        if ensure_slots(st, st.nslots + 1) < 0:
            return E_NOMEM
        st.nslots += 1
        s = <uint32_t>st.nslots
        if st.prealloc_step and st.nslots * st.cs > st.prealloc_end:
            preallocate(st)
    st.refs[s] = 1
    st.used += 1
    if not is_fresh(st, s):
        st.freshbit[s >> 3] |= <uint8_t>(1 << (s & 7))
        st.nfresh += 1
    out[0] = s
    return 0


cdef inline void st_decref(State *st, uint32_t s) noexcept nogil:
    st.refs[s] -= 1
    if st.refs[s] == 0:
        st.used -= 1
        # Callers reserve room; were that to fail, the slot is only lost until the next load.
        if st.pending.n < st.pending.cap or u32_reserve(&st.pending, 1) == 0:
            st.pending.a[st.pending.n] = s
            st.pending.n += 1


cdef int reserve_dirty_pages(State *st, size_t k) noexcept nogil:
    cdef size_t i, j = 0
    cdef Page *p
    if st.dirty_pages.n + k >= DIRTY_LIMIT:
        # Page.dirty is 32 bits: squeeze out the pages that died while dirty.
        for i in range(st.dirty_pages.n):
            p = <Page *>st.dirty_pages.a[i]
            if p != NULL:
                st.dirty_pages.a[j] = p
                j += 1
                p.dirty = <uint32_t>j
        st.dirty_pages.n = j
        if j + k >= DIRTY_LIMIT:
            return -1
    return ptr_reserve(&st.dirty_pages, k)


cdef inline void mark_page(State *st, Page *p) noexcept nogil:
    if p.dirty == 0:
        st.dirty_pages.a[st.dirty_pages.n] = p
        st.dirty_pages.n += 1
        p.dirty = <uint32_t>st.dirty_pages.n


cdef inline void mark_map(State *st, Map *m) noexcept nogil:
    if m.dirty == 0:
        st.dirty_maps.a[st.dirty_maps.n] = m
        st.dirty_maps.n += 1
        m.dirty = st.dirty_maps.n


cdef Page *page_for_write(State *st, Map *m, uint64_t index) noexcept nogil:
    """The map's page `index`, made exclusive to the map (created or copied); NULL when out
    of memory. The caller has reserved a dirty page and a dirty map."""
    cdef Page *page = m.pages[index]
    cdef Page *fresh
    cdef uint32_t *e
    cdef uint64_t i
    if page != NULL and page.refs == 1:
        mark_page(st, page)
        return page
    fresh = <Page *>malloc(st.page_bytes)
    if fresh == NULL:
        return NULL
    fresh.id = st.next_page_id
    st.next_page_id += 1
    fresh.refs = 1
    fresh.dirty = 0
    e = ents(fresh)
    if page == NULL:
        memset(e, 0, 2 * st.pe * sizeof(uint32_t))
    else:
        memcpy(e, ents(page), 2 * st.pe * sizeof(uint32_t))
        for i in range(st.pe):
            if e[i]:
                st.refs[e[i] & SLOT_MASK] += 1
        page.refs -= 1
    mark_page(st, fresh)
    m.pages[index] = fresh
    mark_map(st, m)
    return fresh


cdef void unref_page(State *st, Page *page) noexcept nogil:
    """Drop one reference; a page reaching 0 releases its slots, is reported dead and
    freed. The caller has reserved room in `pending` and `dead`."""
    cdef uint32_t *e
    cdef uint64_t i
    page.refs -= 1
    if page.refs:
        return
    e = ents(page)
    for i in range(st.pe):
        if e[i]:
            st_decref(st, e[i] & SLOT_MASK)
    if page.dirty:
        st.dirty_pages.a[page.dirty - 1] = NULL
    st.dead.a[st.dead.n] = page.id
    st.dead.n += 1
    free(page)


cdef void free_map(Map *m) noexcept nogil:
    free(m.pages)
    free(m)


# -- data I/O ------------------------------------------------------------------------

cdef int pread_full(int fd, unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    cdef ssize_t r
    cdef uint64_t start = off
    while n:
        r = pread(fd, buf, n if n < IO_MAX else IO_MAX, <off_t>off)
        if r < 0:
            if errno == EINTR:
                continue
            err.kind = E_OS
            err.errnum = errno
            return -1
        if r == 0:
            err.kind = E_CORRUPT
            err.a = <int64_t>start
            return -1
        buf += r
        n -= <uint64_t>r
        off += <uint64_t>r
    return 0


cdef uint64_t VIEW_MIN = <uint64_t>1 << 36
cdef uint64_t PREALLOC_MIN = <uint64_t>1 << 20


cdef void view_grow(State *st, uint64_t end) noexcept nogil:
    """Note that the data file holds `end` bytes, and map it so I/O below is a memcpy.

    The mapping reserves address space well past the file (64 GiB, then doubling), so it is
    redone rarely, and only under the exclusive lock, while no I/O is copying through it. It
    is writable when the file is, else read-only; if mmap fails, I/O keeps to pread and pwrite.
    """
    cdef uint64_t want = VIEW_MIN
    cdef void *p
    if end > st.file_size:
        st.file_size = end
    if st.closed or st.file_size <= st.view_len or cs_bus_guard_install() != 0:
        return
    while want < st.file_size:
        want *= 2
    view_drop(st)
    p = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_SHARED, st.fd, 0)
    st.view_writable = p != MAP_FAILED
    if p == MAP_FAILED:
        p = mmap(NULL, want, PROT_READ, MAP_SHARED, st.fd, 0)
    if p != MAP_FAILED:
        st.view = <unsigned char *>p
        st.view_len = want


cdef void view_drop(State *st) noexcept nogil:
    if st.view != NULL:
        munmap(<void *>st.view, st.view_len)
        st.view = NULL
        st.view_len = 0
        st.view_writable = 0


cdef int st_pread(State *st, unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    """Data-file bytes: copied from the mapping where the file surely holds them, else pread."""
    if st.view != NULL and off + n <= st.file_size:
        if cs_guarded_copy(buf, st.view + off, n) == 0:
            return 0
        err.kind = E_CORRUPT
        err.a = <int64_t>off
        return -1
    return pread_full(st.fd, buf, n, off, err)


cdef int st_pwrite(State *st, const unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    if pwrite_full(st.fd, buf, n, off, err) < 0:
        return -1
    view_grow(st, off + n)
    return 0


cdef inline bint copies_in(State *st, uint32_t slot, uint64_t n, uint64_t off) noexcept nogil:
    """An overwrite of bytes the file holds in `slot` goes through the mapping."""
    return st.view_writable and off + n <= st.file_size and is_fresh(st, slot)


cdef int st_overwrite(State *st, uint32_t slot, const unsigned char *buf, uint64_t n, uint64_t off,
                      Err *err) noexcept nogil:
    """Overwrite bytes the file already holds (so no fault can mean a full disk) in `slot`.

    A fresh slot is written by a copy into the mapping: a process killed in the middle of
    the copy leaves it torn anywhere, but in a slot that no durable map names. Any other
    slot is written by pwrite, which a kill leaves applied by whole pages. A copy that
    faults (a failing disk) is EIO, as pwrite would report it."""
    if copies_in(st, slot, n, off):
        if cs_guarded_copy(st.view + off, buf, n) == 0:
            return 0
        err.kind = E_OS
        err.errnum = EIO
        return -1
    return st_pwrite(st, buf, n, off, err)


cdef int pwrite_full(int fd, const unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    cdef ssize_t r
    while n:
        r = pwrite(fd, buf, n if n < IO_MAX else IO_MAX, <off_t>off)
        if r < 0:
            if errno == EINTR:
                continue
            err.kind = E_OS
            err.errnum = errno
            return -1
        if r == 0:
            err.kind = E_OS
            err.errnum = EIO
            return -1
        buf += r
        n -= <uint64_t>r
        off += <uint64_t>r
    return 0


cdef inline bint is_zero(const unsigned char *p, uint64_t n) noexcept nogil:
    cdef uint64_t i
    if n <= 16:
        for i in range(n):
            if p[i]:
                return 0
        return 1
    for i in range(16):
        if p[i]:
            return 0
    return memcmp(p, p + 16, n - 16) == 0


cdef inline bint range_ok(State *st, Map *m, bint fits, int64_t off, int64_t length) noexcept nogil:
    cdef uint64_t limit = m.nchunks * st.cs
    if not fits or off < 0 or length < 0:
        return 0
    return <uint64_t>off <= limit and <uint64_t>length <= limit - <uint64_t>off


cdef inline uint32_t checked_sum(State *st, Map *m, uint64_t chunk) noexcept nogil:
    """The sum a read must check for a chunk: 0 when reads do not verify or it has none."""
    cdef Page *p
    if not st.verify:
        return 0
    p = m.pages[chunk / st.pe]
    if p == NULL:
        return 0
    return sums(st, p)[chunk % st.pe]


cdef int st_read(State *st, Map *m, unsigned char *buf, uint64_t off, uint64_t n, Err *err,
                 unsigned char **tmp) noexcept nogil:
    """Fill buf from the map; runs of chunks in consecutive slots are one pread, runs of
    unallocated chunks one memset. A chunk with a sum to check is read whole (into the
    caller's buffer when the piece is the whole chunk, else into *tmp, allocated here)."""
    cdef uint64_t pos = 0, chunk, within, piece, run, cs = st.cs
    cdef uint64_t slot, nxt, foff
    cdef uint32_t want
    cdef unsigned char *whole
    while pos < n:
        chunk = (off + pos) >> st.cs_shift
        within = (off + pos) & st.cs_mask
        piece = cs - within
        if piece > n - pos:
            piece = n - pos
        slot = entry(st, m, chunk)
        run = piece
        if slot & FLAG_PARTIAL:
            if read_partial(st, m, chunk, within, piece, buf + pos, err, tmp) < 0:
                return -1
            pos += run
            continue
        want = checked_sum(st, m, chunk) if slot else 0
        if want:
            if piece == cs:
                whole = buf + pos
            else:
                if tmp[0] == NULL:
                    tmp[0] = <unsigned char *>malloc(cs)
                    if tmp[0] == NULL:
                        err.kind = E_NOMEM
                        return -1
                whole = tmp[0]
            if pread_full(st.fd, whole, cs, (slot - 1) * cs, err) < 0:
                return -1
            if chunk_crc(whole, cs) != want:
                err.kind = E_CHECKSUM
                err.a = <int64_t>chunk
                err.b = <int64_t>slot
                return -1
            if whole != buf + pos:
                memcpy(buf + pos, whole + within, piece)
        elif slot == 0:
            while pos + run < n and entry(st, m, chunk + 1) == 0:
                chunk += 1
                run += cs if n - pos - run > cs else n - pos - run
            memset(buf + pos, 0, run)
        else:
            foff = (slot - 1) * cs + within
            while pos + run < n:
                nxt = entry(st, m, chunk + 1)
                if nxt != slot + 1 or checked_sum(st, m, chunk + 1):
                    break
                slot = nxt
                chunk += 1
                run += cs if n - pos - run > cs else n - pos - run
            if st_pread(st, buf + pos, run, foff, err) < 0:
                return -1
        pos += run
    return 0


cdef int reserve_piece(State *st, bint partial) noexcept nogil:
    """Room for everything one chunk write can append, so no step fails half-way."""
    if reserve_dirty_pages(st, 1) or ptr_reserve(&st.dirty_maps, 1):
        return -1
    if u32_reserve(&st.pending, 1) or u32_reserve(&st.free, 1):
        return -1
    if st.free.n == 0 and <int64_t>st.nslots < st.max_slots and ensure_slots(st, st.nslots + 1):
        return -1
    if partial and st.scratch == NULL:
        st.scratch = <unsigned char *>malloc(st.cs)
        if st.scratch == NULL:
            return -1
    return 0


cdef inline uint32_t parent_entry(State *st, Map *m, uint64_t chunk) noexcept nogil:
    return entry(st, m.parent, chunk) if m.parent != NULL else 0


cdef inline uint32_t span_bits(State *st, uint64_t lo, uint64_t hi) noexcept nogil:
    """The bitmap of the sub-blocks in the sub-block-aligned range lo..hi of a chunk."""
    return <uint32_t>((((<uint64_t>1) << ((hi - lo) / st.sub)) - 1) << (lo / st.sub))


cdef int read_parent(State *st, Map *m, uint64_t chunk, uint64_t within, uint64_t n, unsigned char *buf,
                     Err *err, unsigned char **tmp) noexcept nogil:
    """Bytes of the chunk as the map's parent holds them (zeros without a parent)."""
    if n == 0:
        return 0
    if m.parent == NULL:
        memset(buf, 0, n)
        return 0
    return st_read(st, m.parent, buf, chunk * st.cs + within, n, err, tmp)


cdef int read_partial(State *st, Map *m, uint64_t chunk, uint64_t within, uint64_t n, unsigned char *buf,
                      Err *err, unsigned char **tmp) noexcept nogil:
    """A piece of a partial chunk: runs of its own sub-blocks from its slot, the rest
    through the parent."""
    cdef Page *page = m.pages[chunk / st.pe]
    cdef uint32_t bits = sums(st, page)[chunk % st.pe]
    cdef uint64_t base = (<uint64_t>(ents(page)[chunk % st.pe] & SLOT_MASK) - 1) * st.cs
    cdef uint64_t pos = within, end = within + n, stop, sub = st.sub
    cdef uint32_t own
    while pos < end:
        own = (bits >> (pos / sub)) & 1
        stop = (pos / sub + 1) * sub
        while stop < end and ((bits >> (stop / sub)) & 1) == own:
            stop += sub
        if stop > end:
            stop = end
        if own:
            if st_pread(st, buf + (pos - within), stop - pos, base + pos, err) < 0:
                return -1
        elif read_parent(st, m, chunk, pos, stop - pos, buf + (pos - within), err, tmp) < 0:
            return -1
        pos = stop
    return 0


cdef int fill_partial(State *st, Map *m, uint64_t chunk, uint32_t slot, uint32_t bits, Err *err) noexcept nogil:
    """Copy a partial chunk's missing sub-blocks from the parent into its slot (st.scratch
    is free to use)."""
    cdef uint64_t k = 0, first, sub = st.sub, base = (<uint64_t>slot - 1) * st.cs
    cdef unsigned char *tmp = NULL
    cdef int rc = 0
    while k < 32 and rc == 0:
        if (bits >> k) & 1:
            k += 1
            continue
        first = k
        while k < 32 and not (bits >> k) & 1:
            k += 1
        rc = read_parent(st, m, chunk, first * sub, (k - first) * sub, st.scratch, err, &tmp)
        if rc == 0:
            rc = st_pwrite(st, st.scratch, (k - first) * sub, base + first * sub, err)
    free(tmp)
    return rc


cdef int fill_edge(State *st, Map *m, uint64_t chunk, uint64_t within, uint64_t n, uint64_t base,
                   Err *err) noexcept nogil:
    """Bring the parent's bytes into part of a sub-block a write covers only partly."""
    cdef unsigned char *tmp = NULL
    cdef unsigned char *edge = <unsigned char *>malloc(n)
    cdef int rc
    if edge == NULL:
        err.kind = E_NOMEM
        return -1
    rc = read_parent(st, m, chunk, within, n, edge, err, &tmp)
    if rc == 0:
        rc = st_pwrite(st, edge, n, base + within, err)
    free(tmp)
    free(edge)
    return rc


cdef int write_in_place(State *st, Map *m, Page *page, uint64_t chunk, uint64_t within,
                        const unsigned char *piece, uint64_t n, Err *err) noexcept nogil:
    """The reference's _write_in_place: the chunk changes, so its sum goes (piece NULL:
    zeros); a partial chunk gains the sub-blocks written, and is whole once it has all."""
    cdef uint64_t i = chunk % st.pe, lo, hi, sub = st.sub
    cdef uint32_t e = ents(page)[i]
    cdef uint32_t *s = sums(st, page)
    cdef uint64_t base = (<uint64_t>(e & SLOT_MASK) - 1) * st.cs
    cdef uint32_t bits
    if piece == NULL and st.scratch == NULL:
        st.scratch = <unsigned char *>malloc(st.cs)
        if st.scratch == NULL:
            err.kind = E_NOMEM
            return -1
    if s[i] or e & FLAG_PARTIAL:
        if reserve_dirty_pages(st, 1):
            err.kind = E_NOMEM
            return -1
    if piece == NULL:
        memset(st.scratch, 0, n)
        piece = st.scratch
    if not e & FLAG_PARTIAL:
        if s[i]:
            s[i] = 0
            mark_page(st, page)
        return st_overwrite(st, e, piece, n, base + within, err)
    lo = within / sub * sub
    hi = (within + n + sub - 1) / sub * sub
    bits = s[i]
    if within > lo and not (bits >> (lo / sub)) & 1:
        if fill_edge(st, m, chunk, lo, within - lo, base, err) < 0:
            return -1
    if within + n < hi and not (bits >> (hi / sub - 1)) & 1:
        if fill_edge(st, m, chunk, within + n, hi - within - n, base, err) < 0:
            return -1
    if st_pwrite(st, piece, n, base + within, err) < 0:
        return -1
    bits |= span_bits(st, lo, hi)
    if bits == FULL_BITS:
        ents(page)[i] = e & SLOT_MASK
        s[i] = 0
    else:
        s[i] = bits
    mark_page(st, page)
    return 0


cdef int write_chunk(State *st, Map *m, uint64_t chunk, uint64_t within, const unsigned char *piece,
                     uint64_t n, Err *err) noexcept nogil:
    """The reference's _write_chunk; piece NULL writes zeros."""
    cdef uint64_t index = chunk / st.pe, i = chunk % st.pe, cs = st.cs, lo = 0, hi = cs
    cdef Page *page = m.pages[index]
    cdef uint32_t old = ents(page)[i] if page != NULL else 0
    cdef uint32_t new = 0, bits = 0
    cdef bint full = n == cs
    cdef bint zero
    cdef const unsigned char *src
    cdef unsigned char *dst
    cdef unsigned char *tmp = NULL
    cdef int rc
    if piece == NULL:
        zero = 1
    else:
        # Only an unallocated or a whole chunk cares whether the data is zeros.
        zero = (old == 0 or full) and is_zero(piece, n)
    if old == 0 and zero:
        return 0
    if old and st.refs[old & SLOT_MASK] == 1 and not (full and zero) and page.refs == 1:
        return write_in_place(st, m, page, chunk, within, piece, n, err)
    if reserve_piece(st, not full):
        err.kind = E_NOMEM
        return -1
    page = page_for_write(st, m, index)
    if page == NULL:
        err.kind = E_NOMEM
        return -1
    old = ents(page)[i]
    if not (full and zero):
        # (the reference's in-place branch here is unreachable: a page just made exclusive
        # by copying holds each of its slots at least twice)
        if full:
            src = piece
        else:
            if st.sub and old == parent_entry(st, m, chunk):
                # Partial copy on write: only the sub-blocks the write touches.
                lo = within / st.sub * st.sub
                hi = (within + n + st.sub - 1) / st.sub * st.sub
                rc = read_parent(st, m, chunk, lo, within - lo, st.scratch, err, &tmp)
                if rc == 0:
                    rc = read_parent(st, m, chunk, within + n, hi - within - n, st.scratch + (within + n - lo),
                                     err, &tmp)
                bits = span_bits(st, lo, hi)
                dst = st.scratch + (within - lo)
            else:
                rc = st_read(st, m, st.scratch, chunk * cs, cs, err, &tmp)
                dst = st.scratch + within
            free(tmp)
            if rc < 0:
                return -1
            if piece == NULL:
                memset(dst, 0, n)
            else:
                memcpy(dst, piece, n)
            src = st.scratch
        rc = st_alloc(st, &new)
        if rc:
            err.kind = rc
            err.a = <int64_t>st.nslots
            return -1
        if st_pwrite(st, src, hi - lo, (<uint64_t>new - 1) * cs + lo, err) < 0:
            st.refs[new] = 0
            st.used -= 1
            free_push(st, new)
            return -1
    if bits and bits != FULL_BITS:
        ents(page)[i] = new | FLAG_PARTIAL
        sums(st, page)[i] = bits
    else:
        ents(page)[i] = new
        sums(st, page)[i] = 0
    if old:
        st_decref(st, old & SLOT_MASK)
    return 0


cdef uint64_t slots_needed(State *st, Map *m, const unsigned char *data, uint64_t off, uint64_t n) noexcept nogil:
    """How many slots a write (data NULL: a zero) allocates, at most."""
    cdef uint64_t pos = 0, chunk, within, piece, need = 0, cs = st.cs
    cdef Page *page
    cdef uint32_t old
    cdef bint full, zero
    while pos < n:
        chunk = (off + pos) >> st.cs_shift
        within = (off + pos) & st.cs_mask
        piece = cs - within
        if piece > n - pos:
            piece = n - pos
        page = m.pages[chunk / st.pe]
        old = ents(page)[chunk % st.pe] if page != NULL else 0
        full = piece == cs
        zero = data == NULL or ((old == 0 or full) and is_zero(data + pos, piece))
        if not ((old == 0 and zero) or (full and zero) or (old and st.refs[old & SLOT_MASK] == 1 and page.refs == 1)):
            need += 1
        pos += piece
    return need


cdef int st_write(State *st, Map *m, const unsigned char *data, uint64_t off, uint64_t n, Err *err) noexcept nogil:
    """Write (data NULL: zero) a validated range. NoSpace is decided before any change."""
    cdef uint64_t pos = 0, chunk, within, piece, avail, cs = st.cs
    if n == 0:
        return 0
    avail = st.free.n
    if st.max_slots > <int64_t>st.nslots:
        avail += <uint64_t>(st.max_slots - <int64_t>st.nslots)
    if ((off + n - 1) >> st.cs_shift) - (off >> st.cs_shift) + 1 > avail:
        if slots_needed(st, m, data, off, n) > avail:
            err.kind = E_NOSPACE
            err.a = <int64_t>st.nslots
            return -1
    st.running = 1
    while pos < n:
        chunk = (off + pos) >> st.cs_shift
        within = (off + pos) & st.cs_mask
        piece = cs - within
        if piece > n - pos:
            piece = n - pos
        if write_chunk(st, m, chunk, within, data + pos if data != NULL else NULL, piece, err):
            return -1
        pos += piece
    return 0


cdef Map *io_map(State *st, int64_t key, bint fits, int64_t off, int64_t n, Err *err) noexcept nogil:
    """The map an I/O call works on, once the engine is open and the range is inside it."""
    cdef Map *m
    if st.closed:
        err.kind = E_CLOSED
        return NULL
    m = <Map *>ht_get(&st.maps, key)
    if m == NULL:
        err.kind = E_KEY
    elif not range_ok(st, m, fits, off, n):
        err.kind = E_RANGE
        m = NULL
    return m


cdef void read_locked(State *st, int64_t key, bint fits, int64_t off, int64_t n, unsigned char *buf,
                      Err *err, unsigned char **tmp) noexcept nogil:
    cdef Map *m = io_map(st, key, fits, off, n, err)
    if m != NULL and n and buf != NULL:
        st_read(st, m, buf, <uint64_t>off, <uint64_t>n, err, tmp)


cdef void write_locked(State *st, int64_t key, bint fits, int64_t off, int64_t n, const unsigned char *data,
                       Err *err) noexcept nogil:
    cdef Map *m = io_map(st, key, fits, off, n, err)
    if m == NULL:
        return
    if st.loading:
        err.kind = E_LOADING
    elif m.children:
        err.kind = E_CHILDREN
        err.a = <int64_t>m.children
    else:
        st_write(st, m, data, <uint64_t>off, <uint64_t>n, err)


cdef int overwrite_locked(State *st, int64_t key, bint fits, int64_t off, int64_t n, const unsigned char *data,
                          Err *err) noexcept nogil:
    """1 when the write was done (or failed) as an overwrite of a fresh slot through the
    mapping; 0, with nothing changed, when it needs the general path (it allocates, copies,
    crosses a chunk, clears a sum, or the slot is not fresh)."""
    cdef Map *m = io_map(st, key, fits, off, n, err)
    cdef uint64_t chunk, within
    cdef Page *page
    cdef uint32_t slot, want
    if m == NULL:
        return 1
    if st.loading or n == 0 or m.children:
        return 0
    chunk = <uint64_t>off >> st.cs_shift
    within = <uint64_t>off & st.cs_mask
    if within + <uint64_t>n > st.cs:
        return 0
    page = m.pages[chunk / st.pe]
    if page == NULL or page.refs != 1:
        return 0
    slot = ents(page)[chunk % st.pe]
    if slot & FLAG_PARTIAL:
        # Only sub-blocks the chunk has: the file holds their bytes.
        want = span_bits(st, within / st.sub * st.sub, (within + n + st.sub - 1) / st.sub * st.sub)
        if (sums(st, page)[chunk % st.pe] & want) != want:
            return 0
        slot &= SLOT_MASK
    elif sums(st, page)[chunk % st.pe]:
        return 0
    if slot == 0 or st.refs[slot] != 1:
        return 0
    if not copies_in(st, slot, <uint64_t>n, (<uint64_t>slot - 1) * st.cs + within):
        return 0
    if <uint64_t>n == st.cs and is_zero(data, <uint64_t>n):
        return 0
    st.running = 1
    st_overwrite(st, slot, data, <uint64_t>n, (<uint64_t>slot - 1) * st.cs + within, err)
    return 1


# -- introspection ---------------------------------------------------------------------

cdef int depth_add(DepthRuns *r, uint64_t count, uint32_t depth, uint32_t allocated) noexcept nogil:
    if r.n and r.a[r.n - 1].depth == depth and r.a[r.n - 1].allocated == allocated:
        r.a[r.n - 1].count += count
        return 0
    if _grow(<void **>&r.a, &r.cap, r.n + 1, sizeof(DepthRun)):
        return -1
    r.a[r.n].count = count
    r.a[r.n].depth = depth
    r.a[r.n].allocated = allocated
    r.n += 1
    return 0


cdef int st_depth_runs(State *st, Map **maps, size_t nmaps, uint64_t first, uint64_t count,
                       DepthRuns *runs) noexcept nogil:
    cdef uint64_t c = first, end = first + count, p, pend, ch
    cdef size_t k, k0
    cdef Page *a
    cdef Page *b
    cdef Page *partial = <Page *>maps   # any pointer that is never a page
    cdef uint32_t e, below, depth
    while c < end:
        p = c / st.pe
        pend = (p + 1) * st.pe
        if pend > end:
            pend = end
        # Levels whose maps hold the same page compare equal on the whole span: skip them.
        k0 = 0
        while k0 + 1 < nmaps:
            a = span_page(maps[k0], p, pend, partial)
            b = span_page(maps[k0 + 1], p, pend, partial)
            if a != b or a == partial:
                break
            k0 += 1
        if k0 + 1 == nmaps and span_page(maps[k0], p, pend, partial) == NULL:
            if depth_add(runs, pend - c, 0, 0):
                return -1
            c = pend
            continue
        for ch in range(c, pend):
            depth = 0
            for k in range(k0, nmaps):
                e = entry_cov(st, maps[k], ch)
                below = entry_cov(st, maps[k + 1], ch) if k + 1 < nmaps else 0
                if e != below:
                    depth = <uint32_t>(k + 1)
                    break
            if depth_add(runs, 1, depth, entry_cov(st, maps[0], ch) != 0):
                return -1
        c = pend
    return 0


cdef int st_diff_runs(State *st, Map *a, Map *b, DiffRuns *runs) noexcept nogil:
    cdef uint64_t n = a.nchunks if a.nchunks > b.nchunks else b.nchunks
    cdef uint64_t c = 0, p, pend, ch
    cdef Page *partial = <Page *>a
    cdef Page *pa
    cdef Page *pb
    while c < n:
        p = c / st.pe
        pend = (p + 1) * st.pe
        if pend > n:
            pend = n
        pa = span_page(a, p, pend, partial)
        pb = span_page(b, p, pend, partial)
        if pa != pb or pa == partial:
            for ch in range(c, pend):
                if entry_cov(st, a, ch) != entry_cov(st, b, ch):
                    if runs.n and runs.a[runs.n - 1].first + runs.a[runs.n - 1].count == ch:
                        runs.a[runs.n - 1].count += 1
                    else:
                        if _grow(<void **>&runs.a, &runs.cap, runs.n + 1, sizeof(DiffRun)):
                            return -1
                        runs.a[runs.n].first = ch
                        runs.a[runs.n].count = 1
                        runs.n += 1
        c = pend
    return 0


cdef uint64_t st_exclusive(State *st, Map *m, Map *parent) noexcept nogil:
    cdef uint64_t p, c, pend, ch, count = 0
    cdef Page *pg
    cdef uint32_t *e
    cdef uint32_t slot
    for p in range(m.npages):
        pg = m.pages[p]
        if pg == NULL:
            continue
        c = p * st.pe
        pend = c + st.pe
        if pend > m.nchunks:
            pend = m.nchunks
        if parent != NULL and span_page(parent, p, pend, <Page *>m) == pg:
            continue
        e = ents(pg)
        for ch in range(c, pend):
            slot = e[ch - c]
            if slot and (parent == NULL or entry_cov(st, parent, ch) != slot):
                count += 1
    return count


# -- Python-side helpers ---------------------------------------------------------------------

cdef int _lookup_key(object obj, int64_t *out) except -1:
    """1 and the id when obj is an integer in int64 range; 0 when no map can have this id."""
    cdef int overflow = 0
    cdef long long v
    if not isinstance(obj, int):
        try:
            obj = PyNumber_Index(obj)
        except TypeError:
            return 0
    v = PyLong_AsLongLongAndOverflow(obj, &overflow)
    if overflow:
        return 0
    out[0] = v
    return 1


cdef int64_t _new_key(object obj) except? -1:
    """The id for a new map: an integer in int64 range."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(PyNumber_Index(obj), &overflow)
    if overflow:
        raise ValueError(f"map id {obj} is out of range")
    return v


cdef int _int64(object obj, int64_t *out) except -1:
    """1 and the value when the integer fits in int64, 0 when it does not (out of any range)."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(obj if isinstance(obj, int) else PyNumber_Index(obj),
                                                    &overflow)
    if overflow:
        return 0
    out[0] = v
    return 1


cdef int _get_buffer(object obj, Py_buffer *view) except -1:
    """A flat byte view of any buffer, as memoryview(obj).cast("B") gives it."""
    if type(obj) is bytes or type(obj) is bytearray:
        return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    return PyObject_GetBuffer(memoryview(obj).cast("B"), view, PyBUF_SIMPLE)


cdef object _exception(State *st, Err *err, tuple keys):
    cdef int kind = err.kind
    if kind == E_KEY:
        return KeyError(keys[err.a] if 0 <= err.a < len(keys) else None)
    if kind == E_NOSPACE:
        return NoSpace(f"the pool is full: {err.a} chunks of {st.cs} bytes in use")
    if kind == E_CORRUPT:
        return Corruption(f"short read at data offset {err.a}: the data file is truncated")
    if kind == E_CHECKSUM:
        return Corruption(f"chunk {err.a} (slot {err.b}) of map {keys[0] if keys else '?'} fails its checksum")
    if kind == E_OS:
        return OSError(err.errnum, _strerror(err.errnum))
    if kind == E_NOMEM:
        return MemoryError()
    if kind == E_LOADING:
        return ValueError("maps were loaded: finish_load must come first")
    if kind == E_FINISHED:
        return ValueError("loading is only valid before finish_load and before any write")
    if kind == E_REFS:
        return ValueError("a page is shared by too many maps")
    if kind == E_CLOSED:
        return Closed("the store is closed")
    if kind == E_CHILDREN:
        return ValueError(f"map {keys[0] if keys else '?'} has {err.a} child maps: it cannot change or go")
    return SystemError(f"cowstore._cengine: unexpected error {kind}")


cdef bytes _directory(State *st, Map *m):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(8 * m.npages))
    cdef uint64_t *ids = <uint64_t *>PyBytes_AS_STRING(out)
    cdef uint64_t i
    cdef uint64_t v
    for i in range(m.npages):
        v = m.pages[i].id if m.pages[i] != NULL else 0
        cs_le64_copy(&ids[i], &v, 1)
    return out


cdef class Engine:
    """Chunk pool and maps of one store. Thread-safe: reads run in parallel, changes alone."""

    def __cinit__(self, fd, chunk_size, page_entries):
        cdef uint64_t shift = 0
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError("chunk_size must be a power of two")
        if page_entries <= 0:
            raise ValueError("page_entries must be positive")
        if chunk_size > MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be at most {MAX_CHUNK_SIZE}")
        if page_entries > MAX_PAGE_ENTRIES:
            raise ValueError(f"page_entries must be at most {MAX_PAGE_ENTRIES}")
        self.st.fd = fd
        self.st.cs = chunk_size
        while (<uint64_t>1 << shift) < self.st.cs:
            shift += 1
        self.st.cs_shift = <unsigned int>shift
        self.st.cs_mask = self.st.cs - 1
        self.st.pe = page_entries
        self.st.sub = self.st.cs / 32 if self.st.cs >= 32 else 0
        self.st.page_bytes = sizeof(Page) + 8 * self.st.pe
        self.st.max_slots = MAX_SLOT
        self.st.next_page_id = 1
        cs_bus_guard_install()
        if ensure_slots(&self.st, 0):
            raise MemoryError()
        if cs_rwlock_init(&self.lock):
            raise MemoryError("cannot create the engine's lock")
        self.lock_ready = True

    def __dealloc__(self):
        cdef State *st = &self.st
        cdef size_t i
        cdef uint64_t j
        cdef Page *p
        cdef Map *m
        # Unreferenced loaded pages first; every other page belongs to maps and is freed
        # when its last map lets go of it.
        for i in range(st.loaded_order.n):
            p = <Page *>st.loaded_order.a[i]
            if p.refs == 0:
                free(p)
        if st.maps.tab != NULL:
            for i in range(st.maps.mask + 1):
                m = <Map *>st.maps.tab[i].val
                if m == NULL:
                    continue
                for j in range(m.npages):
                    p = m.pages[j]
                    if p != NULL:
                        p.refs -= 1
                        if p.refs == 0:
                            free(p)
                free_map(m)
        free(st.maps.tab)
        free(st.loaded.tab)
        free(st.loaded_order.a)
        free(st.refs)
        free(st.freebit)
        free(st.freshbit)
        free(st.free.a)
        free(st.pending.a)
        free(st.dirty_pages.a)
        free(st.dirty_maps.a)
        free(st.dead.a)
        free(st.scratch)
        view_drop(st)
        if self.lock_ready:
            pthread_rwlock_destroy(&self.lock)

    @property
    def chunk_size(self):
        return self.st.cs

    @property
    def page_entries(self):
        return self.st.pe

    cdef int _enter(self) except -1:
        # Only take_changes runs Python code under the lock (exclusively): a finalizer run by
        # its allocations must not wait for the lock its own thread holds.
        if self.writer_active and pthread_equal(self.writer, pthread_self()):
            raise RuntimeError("the engine was re-entered while it holds its lock")
        return 0

    cdef int _as_nchunks(self, object nchunks, object map_id, uint64_t *out) except -1:
        cdef int64_t n
        if not _int64(nchunks, &n) or n < 0 or <uint64_t>n > <uint64_t>INT64_MAX / self.st.cs:
            raise ValueError(f"map {map_id} cannot have {nchunks} chunks of {self.st.cs} bytes")
        out[0] = <uint64_t>n
        return 0

    # -- loading -------------------------------------------------------------

    def load_page(self, page_id, blob):
        """Register a stored page; only valid before `finish_load`."""
        cdef State *st = &self.st
        cdef Py_buffer view
        cdef Page *page
        cdef int64_t pid = 0
        cdef bint fits
        cdef int kind = E_OK
        self._enter()
        PyObject_GetBuffer(blob, &view, PyBUF_SIMPLE)
        try:
            if <uint64_t>view.len != 8 * st.pe:
                raise ValueError(f"page {page_id} has {view.len} bytes, expected {8 * st.pe}")
            fits = _int64(page_id, &pid)
            if not fits or pid <= 0 or pid == INT64_MAX:
                raise ValueError(f"page id {page_id} is invalid or repeated")
            page = <Page *>malloc(st.page_bytes)
            if page == NULL:
                raise MemoryError()
            page.id = <uint64_t>pid
            page.refs = 0
            page.dirty = 0
            cs_le32_copy(ents(page), view.buf, 2 * st.pe)
        finally:
            PyBuffer_Release(&view)
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            if st.running:
                kind = E_FINISHED
            elif ht_get(&st.loaded, pid) != NULL:
                kind = E_DUP_PAGE
            elif ht_reserve(&st.loaded, 1) or ptr_reserve(&st.loaded_order, 1):
                kind = E_NOMEM
            else:
                ht_put(&st.loaded, pid, page)
                st.loaded_order.a[st.loaded_order.n] = page
                st.loaded_order.n += 1
                if st.next_page_id <= <uint64_t>pid:
                    st.next_page_id = <uint64_t>pid + 1
                st.loading = 1
            pthread_rwlock_unlock(&self.lock)
        if kind:
            free(page)
            if kind == E_DUP_PAGE:
                raise ValueError(f"page id {page_id} is invalid or repeated")
            raise MemoryError() if kind == E_NOMEM else ValueError(
                "loading is only valid before finish_load and before any write")

    def load_map(self, map_id, nchunks, directory, parent_id=None):
        """Register a stored map whose pages were loaded with `load_page`; `parent_id` is the
        map its partial chunks read through (linked by `finish_load`)."""
        cdef State *st = &self.st
        cdef Py_buffer view
        cdef uint64_t *ids = NULL
        cdef uint64_t n, npages, want, i, j
        cdef int64_t key, pkey
        cdef Map *m = NULL
        cdef Page *p
        cdef Err err
        memset(&err, 0, sizeof(Err))
        PyObject_GetBuffer(directory, &view, PyBUF_SIMPLE)
        try:
            if view.len % 8:
                raise ValueError("bytes length not a multiple of item size")
            npages = <uint64_t>view.len / 8
            if nchunks < 0:
                raise ValueError(f"map {map_id} cannot have {nchunks} chunks")
            want = -(-nchunks // st.pe)
            if npages != want:
                raise ValueError(f"map {map_id} directory has {npages} pages, expected {want}")
            self._as_nchunks(nchunks, map_id, &n)
            key = _new_key(map_id)
            pkey = _new_key(parent_id) if parent_id is not None else 0
            m = <Map *>calloc(1, sizeof(Map))
            ids = <uint64_t *>malloc(8 * npages + 8)
            if m == NULL or ids == NULL:
                free(m)
                free(ids)
                raise MemoryError()
            m.pages = <Page **>calloc(npages + 1, sizeof(Page *))
            if m.pages == NULL:
                free(m)
                free(ids)
                raise MemoryError()
            cs_le64_copy(ids, view.buf, npages)
        finally:
            PyBuffer_Release(&view)
        m.id = key
        m.nchunks = n
        m.npages = npages
        m.parent_key = pkey
        m.has_parent_key = parent_id is not None
        try:
            self._enter()
        except BaseException:
            free_map(m)
            free(ids)
            raise
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            if st.running:
                err.kind = E_FINISHED
            elif ht_get(&st.maps, key) != NULL:
                err.kind = E_EXISTS
            else:
                for i in range(npages):
                    if ids[i] == 0:
                        continue
                    p = NULL
                    if ids[i] <= <uint64_t>INT64_MAX:
                        p = <Page *>ht_get(&st.loaded, <int64_t>ids[i])
                    if p == NULL:
                        err.kind = E_NO_PAGE
                        err.a = <int64_t>i
                        break
                    m.pages[i] = p
                if err.kind == E_OK and ht_reserve(&st.maps, 1):
                    err.kind = E_NOMEM
                if err.kind == E_OK:
                    for i in range(npages):
                        p = m.pages[i]
                        if p != NULL:
                            if p.refs == 0xFFFFFFFFu:
                                err.kind = E_REFS
                                for j in range(i):
                                    if m.pages[j] != NULL:
                                        m.pages[j].refs -= 1
                                break
                            p.refs += 1
                if err.kind == E_OK:
                    ht_put(&st.maps, key, m)
                    st.loading = 1
            pthread_rwlock_unlock(&self.lock)
        if err.kind:
            free_map(m)
            if err.kind == E_EXISTS:
                free(ids)
                raise ValueError(f"map {map_id} is loaded twice")
            if err.kind == E_NO_PAGE:
                i = ids[err.a]
                free(ids)
                raise ValueError(f"map {map_id} names page {i}, which does not exist")
            free(ids)
            raise _exception(st, &err, ())
        free(ids)

    def finish_load(self, nslots):
        """Derive slot refcounts from the loaded pages; unreferenced pages become dead."""
        cdef State *st = &self.st
        cdef int64_t ns = 0
        cdef uint64_t n, s, used = 0, zeros = 0, ndead = 0, bad_page = 0, bad_slot = 0, steps
        cdef int64_t bad_map = 0, bad_parent = 0
        cdef size_t i, j
        cdef Map *m
        cdef Map *up
        cdef uint32_t *refs = NULL
        cdef uint8_t *bits = NULL
        cdef uint8_t *fresh = NULL
        cdef uint32_t *e
        cdef Page *p
        cdef struct_stat sb
        cdef int kind = E_OK
        if nslots > st.max_slots:
            raise ValueError(f"pool of {nslots} slots exceeds the limit")
        if not _int64(nslots, &ns) or ns < 0:
            raise ValueError(f"pool of {nslots} slots is invalid")
        n = <uint64_t>ns
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            if st.running:
                kind = E_FINISHED
            else:
                # Validate everything before changing anything.
                for i in range(st.loaded_order.n):
                    p = <Page *>st.loaded_order.a[i]
                    if p.refs == 0:
                        ndead += 1
                        continue
                    e = ents(p)
                    for j in range(st.pe):
                        if (e[j] & SLOT_MASK) > n:
                            kind = E_SLOT_BEYOND
                            bad_page = p.id
                            bad_slot = e[j] & SLOT_MASK
                            break
                    if kind:
                        break
                # Each named parent exists, has the child's size, and no chain loops.
                for i in range(st.maps.mask + 1 if st.maps.tab != NULL else 0):
                    m = <Map *>st.maps.tab[i].val
                    if m == NULL or not m.has_parent_key or kind:
                        continue
                    up = m
                    steps = 0
                    while up != NULL and up.has_parent_key:
                        bad_map = up.id
                        bad_parent = up.parent_key
                        up = <Map *>ht_get(&st.maps, up.parent_key)
                        steps += 1
                        if up == NULL or up.nchunks != m.nchunks or up == m or steps > st.maps.n:
                            kind = E_BAD_PARENT
                            break
            if kind == E_OK:
                refs = <uint32_t *>calloc(n + 1, sizeof(uint32_t))
                bits = <uint8_t *>calloc(bit_bytes(n + 1), 1)
                fresh = <uint8_t *>calloc(bit_bytes(n + 1), 1)
                if refs == NULL or bits == NULL or fresh == NULL or u64_reserve(&st.dead, ndead):
                    kind = E_NOMEM
            if kind == E_OK:
                for i in range(st.loaded_order.n):
                    p = <Page *>st.loaded_order.a[i]
                    if p.refs:
                        e = ents(p)
                        for j in range(st.pe):
                            if e[j]:
                                refs[e[j] & SLOT_MASK] += 1
                for s in range(1, n + 1):
                    if refs[s]:
                        used += 1
                zeros = n - used
                if _grow(<void **>&st.free.a, &st.free.cap, zeros, sizeof(uint32_t)):
                    kind = E_NOMEM
            if kind == E_OK:
                free(st.refs)
                free(st.freebit)
                free(st.freshbit)
                st.refs = refs
                st.freebit = bits
                st.freshbit = fresh
                st.nfresh = 0
                refs = NULL
                bits = NULL
                fresh = NULL
                st.slot_cap = n + 1
                st.nslots = n
                if fstat(st.fd, &sb) == 0:
                    view_grow(st, <uint64_t>sb.st_size)
                st.used = used
                st.free.n = 0
                s = n
                while s >= 1:
                    if st.refs[s] == 0:
                        free_push(st, <uint32_t>s)
                    s -= 1
                for i in range(st.loaded_order.n):
                    p = <Page *>st.loaded_order.a[i]
                    if p.refs == 0:
                        st.dead.a[st.dead.n] = p.id
                        st.dead.n += 1
                        free(p)
                for i in range(st.maps.mask + 1 if st.maps.tab != NULL else 0):
                    m = <Map *>st.maps.tab[i].val
                    if m != NULL and m.has_parent_key:
                        m.parent = <Map *>ht_get(&st.maps, m.parent_key)
                        m.parent.children += 1
                        m.has_parent_key = 0
                st.loaded_order.n = 0
                free(st.loaded.tab)
                st.loaded.tab = NULL
                st.loaded.n = 0
                st.loaded.mask = 0
                st.loading = 0
                st.running = 1
            pthread_rwlock_unlock(&self.lock)
        free(refs)
        free(bits)
        free(fresh)
        if kind == E_SLOT_BEYOND:
            raise ValueError(f"page {bad_page} names slot {bad_slot}, beyond the pool of {nslots}")
        if kind == E_BAD_PARENT:
            raise ValueError(f"map {bad_map} names parent {bad_parent}: missing, of another size or a loop")
        if kind == E_NOMEM:
            raise MemoryError()
        if kind == E_FINISHED:
            raise ValueError("finish_load is only valid once, before any write")

    def set_verify(self, verify):
        """Check the sum of every chunk read that has one; a mismatch raises `Corruption`."""
        cdef bint v = bool(verify)
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            self.st.verify = v
            pthread_rwlock_unlock(&self.lock)

    def set_preallocate(self, step):
        """Reserve file blocks ahead of a growing pool, up to `step` bytes at a time (as
        much as the pool holds, from 1 MiB); 0 turns it off. `trim_free_tail` gives them back."""
        cdef int64_t v = 0
        if not _int64(step, &v) or v < 0:
            raise ValueError(f"preallocation step {step!r} is not a byte count")
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            self.st.prealloc_step = <uint64_t>v
            pthread_rwlock_unlock(&self.lock)

    def set_max_slots(self, max_slots):
        """Limit the pool: allocating beyond `max_slots` raises `NoSpace`."""
        cdef int64_t v = -1
        limit = min(max_slots, MAX_SLOT)
        if not _int64(limit, &v) or v < -1:
            v = -1     # any negative limit behaves as -1: nothing can be allocated
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            self.st.max_slots = v
            pthread_rwlock_unlock(&self.lock)

    # -- maps ----------------------------------------------------------------

    def create_map(self, map_id, nchunks):
        cdef State *st = &self.st
        cdef int64_t key = _new_key(map_id)
        cdef uint64_t n
        cdef Map *m
        cdef int kind = E_OK
        self._as_nchunks(nchunks, map_id, &n)
        m = <Map *>calloc(1, sizeof(Map))
        if m == NULL:
            raise MemoryError()
        m.id = key
        m.nchunks = n
        m.npages = (n + st.pe - 1) / st.pe
        m.pages = <Page **>calloc(m.npages + 1, sizeof(Page *))
        if m.pages == NULL:
            free(m)
            raise MemoryError()
        try:
            self._enter()
        except BaseException:
            free_map(m)
            raise
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            if ht_get(&st.maps, key) != NULL:
                kind = E_EXISTS
            elif ht_reserve(&st.maps, 1) or ptr_reserve(&st.dirty_maps, 1):
                kind = E_NOMEM
            else:
                ht_put(&st.maps, key, m)
                mark_map(st, m)
            pthread_rwlock_unlock(&self.lock)
        if kind:
            free_map(m)
            if kind == E_EXISTS:
                raise ValueError(f"map {map_id} exists")
            raise MemoryError()

    def clone_map(self, map_id, source_id, child=False):
        """A new map sharing every page of `source_id`: no entry or chunk is copied.

        With `child`, the source becomes the new map's parent: its partial chunks read
        through it, so it can be neither written nor dropped while it has children. Without,
        the new map takes the source's place (its parent too), as a commit does.
        """
        cdef bint as_child = child
        cdef State *st = &self.st
        cdef int64_t key = _new_key(map_id)
        cdef int64_t skey = 0
        cdef bint sfound = _lookup_key(source_id, &skey)
        cdef Map *src
        cdef Map *m = NULL
        cdef uint64_t i, j
        cdef int kind = E_OK
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            src = <Map *>ht_get(&st.maps, skey) if sfound else NULL
            if ht_get(&st.maps, key) != NULL:
                kind = E_EXISTS
            elif src == NULL:
                kind = E_KEY
            else:
                m = <Map *>calloc(1, sizeof(Map))
                if m != NULL:
                    m.pages = <Page **>malloc((src.npages + 1) * sizeof(Page *))
                if m == NULL or m.pages == NULL or ht_reserve(&st.maps, 1) or ptr_reserve(&st.dirty_maps, 1):
                    kind = E_NOMEM
                else:
                    m.id = key
                    m.nchunks = src.nchunks
                    m.npages = src.npages
                    memcpy(m.pages, src.pages, src.npages * sizeof(Page *))
                    for i in range(m.npages):
                        if m.pages[i] != NULL:
                            if m.pages[i].refs == 0xFFFFFFFFu:
                                kind = E_REFS
                                for j in range(i):
                                    if m.pages[j] != NULL:
                                        m.pages[j].refs -= 1
                                break
                            m.pages[i].refs += 1
                    if kind == E_OK:
                        m.parent = src if as_child else src.parent
                        if m.parent != NULL:
                            m.parent.children += 1
                        ht_put(&st.maps, key, m)
                        mark_map(st, m)
                if kind and m != NULL:
                    free_map(m)
            pthread_rwlock_unlock(&self.lock)
        if kind == E_EXISTS:
            raise ValueError(f"map {map_id} exists")
        if kind == E_KEY:
            raise KeyError(source_id)
        if kind == E_NOMEM:
            raise MemoryError()
        if kind == E_REFS:
            raise ValueError("a page is shared by too many maps")

    def drop_map(self, map_id):
        cdef State *st = &self.st
        cdef int64_t key = 0
        cdef bint found = _lookup_key(map_id, &key)
        cdef Map *m
        cdef Page *p
        cdef uint64_t i, j, dying = 0, slots = 0
        cdef uint32_t *e
        cdef int kind = E_OK
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            m = <Map *>ht_get(&st.maps, key) if found else NULL
            if m == NULL:
                kind = E_KEY
            elif st.loading:
                kind = E_LOADING
            elif m.children:
                kind = E_CHILDREN
                dying = m.children
            else:
                # Count what dies (a page can appear twice in a directory) to reserve room.
                for i in range(m.npages):
                    p = m.pages[i]
                    if p != NULL:
                        p.refs -= 1
                        if p.refs == 0:
                            dying += 1
                            e = ents(p)
                            for j in range(st.pe):
                                if e[j]:
                                    slots += 1
                for i in range(m.npages):
                    if m.pages[i] != NULL:
                        m.pages[i].refs += 1
                if u64_reserve(&st.dead, dying) or u32_reserve(&st.pending, slots):
                    kind = E_NOMEM
                else:
                    st.running = 1
                    ht_del(&st.maps, key)
                    for i in range(m.npages):
                        if m.pages[i] != NULL:
                            unref_page(st, m.pages[i])
                    if m.dirty:
                        st.dirty_maps.a[m.dirty - 1] = NULL
                    if m.parent != NULL:
                        m.parent.children -= 1
                    free_map(m)
            pthread_rwlock_unlock(&self.lock)
        if kind == E_KEY:
            raise KeyError(map_id)
        if kind == E_CHILDREN:
            raise ValueError(f"map {map_id} has {dying} child maps: drop them first")
        if kind:
            raise MemoryError() if kind == E_NOMEM else ValueError(
                "maps were loaded: finish_load must come first")

    def has_map(self, map_id):
        cdef int64_t key = 0
        cdef bint found = _lookup_key(map_id, &key)
        if not found:
            return False
        self._enter()
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            found = ht_get(&self.st.maps, key) != NULL
            pthread_rwlock_unlock(&self.lock)
        return found

    def map_directory(self, map_id):
        cdef int64_t key = 0
        cdef bint found = _lookup_key(map_id, &key)
        cdef Map *m = NULL
        self._enter()
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            if found:
                m = <Map *>ht_get(&self.st.maps, key)
            if m == NULL:
                pthread_rwlock_unlock(&self.lock)
        if m == NULL:
            raise KeyError(map_id)
        try:
            # bytes are not tracked by the GC: no finalizer can run here.
            return _directory(&self.st, m)
        finally:
            pthread_rwlock_unlock(&self.lock)

    # -- I/O -----------------------------------------------------------------

    cdef void _io_read(self, int64_t key, bint fits, int64_t off, int64_t n, unsigned char *buf,
                       Err *err) noexcept:
        """Read into buf, errors in err. Small reads through the mapping keep the GIL when the
        lock is free (the lock is never waited for with the GIL held)."""
        cdef State *st = &self.st
        cdef unsigned char *tmp = NULL
        if <uint64_t>n <= SMALL_IO and st.view != NULL and not st.verify:
            if pthread_rwlock_tryrdlock(&self.lock) == 0:
                read_locked(st, key, fits, off, n, buf, err, &tmp)
                pthread_rwlock_unlock(&self.lock)
                free(tmp)
                return
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            read_locked(st, key, fits, off, n, buf, err, &tmp)
            pthread_rwlock_unlock(&self.lock)
            free(tmp)

    cdef void _io_write(self, int64_t key, bint fits, int64_t off, int64_t n, const unsigned char *data,
                        Err *err) noexcept:
        """Write data (NULL: zeros), errors in err. A small overwrite of a fresh slot keeps
        the GIL when the lock is free at once; anything else releases it."""
        cdef State *st = &self.st
        cdef int done
        if data != NULL and <uint64_t>n <= SMALL_IO and st.view_writable:
            if pthread_rwlock_trywrlock(&self.lock) == 0:
                done = overwrite_locked(st, key, fits, off, n, data, err)
                pthread_rwlock_unlock(&self.lock)
                if done:
                    return
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            write_locked(st, key, fits, off, n, data, err)
            pthread_rwlock_unlock(&self.lock)

    cdef int _read(self, object map_id, unsigned char *buf, Py_ssize_t length, object offset,
                   bint readonly) except -1:
        cdef int64_t key = 0, off = 0
        cdef bint found = _lookup_key(map_id, &key)
        cdef bint fits = _int64(offset, &off)
        cdef Err err
        memset(&err, 0, sizeof(Err))
        self._enter()
        if not found:
            err.kind = E_KEY
        else:
            # into read-only memory: the checks, then TypeError; nothing is written
            self._io_read(key, fits, off, length, NULL if readonly else buf, &err)
        if err.kind == E_RANGE:
            raise ValueError(f"range {offset}+{length} is outside the map")
        if err.kind:
            raise _exception(&self.st, &err, (map_id,))
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
        _get_buffer(buffer, &view)
        try:
            self._read(map_id, <unsigned char *>view.buf, view.len, offset, view.readonly)
        finally:
            PyBuffer_Release(&view)

    cdef int _write(self, object map_id, const unsigned char *data, object offset, object length) except -1:
        cdef int64_t key = 0, off = 0, n = 0
        cdef bint found = _lookup_key(map_id, &key)
        cdef bint fits = _int64(offset, &off) & _int64(length, &n)
        cdef Err err
        memset(&err, 0, sizeof(Err))
        self._enter()
        if not found:
            err.kind = E_KEY
        else:
            self._io_write(key, fits, off, n, data, &err)
        if err.kind == E_RANGE:
            raise ValueError(f"range {offset}+{length} is outside the map")
        if err.kind:
            raise _exception(&self.st, &err, (map_id,))
        return 0

    def write(self, map_id, data, offset):
        """Write `data` (any buffer) at `offset`, copying shared pages and chunks first."""
        cdef Py_buffer view
        _get_buffer(data, &view)
        try:
            self._write(map_id, <const unsigned char *>view.buf, offset, view.len)
        finally:
            PyBuffer_Release(&view)

    def zero(self, map_id, offset, length):
        """Make a range read as zeros; whole chunks become unallocated."""
        self._write(map_id, NULL, offset, length)

    def seal(self, map_id):
        """Compute the missing chunk sums of a map (at commit); returns how many it computed."""
        cdef State *st = &self.st
        cdef int64_t key = 0
        cdef bint found = _lookup_key(map_id, &key)
        cdef Map *m
        cdef Page *p
        cdef uint64_t i, j, count = 0
        cdef uint32_t *e
        cdef uint32_t *s
        cdef Err err
        memset(&err, 0, sizeof(Err))
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            m = <Map *>ht_get(&st.maps, key) if found and not st.closed else NULL
            if m == NULL:
                err.kind = E_CLOSED if st.closed else E_KEY
            elif st.scratch == NULL:
                st.scratch = <unsigned char *>malloc(st.cs)
                if st.scratch == NULL:
                    err.kind = E_NOMEM
            if err.kind == E_OK:
                for i in range(m.npages):
                    p = m.pages[i]
                    if p == NULL:
                        continue
                    e = ents(p)
                    s = sums(st, p)
                    for j in range(st.pe):
                        if (e[j] and not s[j]) or e[j] & FLAG_PARTIAL:
                            if reserve_dirty_pages(st, 1):
                                err.kind = E_NOMEM
                                break
                            if e[j] & FLAG_PARTIAL:
                                if fill_partial(st, m, i * st.pe + j, e[j] & SLOT_MASK, s[j], &err) < 0:
                                    break
                                e[j] &= SLOT_MASK
                                s[j] = 0
                            if st_pread(st, st.scratch, st.cs, (<uint64_t>e[j] - 1) * st.cs, &err) < 0:
                                break
                            s[j] = chunk_crc(st.scratch, st.cs)
                            mark_page(st, p)
                            count += 1
                    if err.kind:
                        break
            pthread_rwlock_unlock(&self.lock)
        if err.kind:
            raise _exception(st, &err, (map_id,))
        return count

    def close(self):
        """End I/O: later reads and writes raise Closed, and the mapping goes, so a handle
        that outlives its store can never write into the data file. Idempotent."""
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            self.st.closed = 1
            view_drop(&self.st)
            pthread_rwlock_unlock(&self.lock)

    def flush_data(self):
        cdef int fd = self.st.fd, rc
        with nogil:
            rc = fsync(fd)
            while rc < 0 and errno == EINTR:
                rc = fsync(fd)
            if rc < 0:
                rc = errno
        if rc:
            raise OSError(rc, _strerror(rc))

    # -- introspection -------------------------------------------------------

    def depth_runs(self, chain, first_chunk, count):
        """Runs of (chunks, depth, allocated) for chunks of chain[0]: depth k+1 means the
        map chain[k] supplies the chunk (its entry differs from chain[k+1]'s), 0 none."""
        cdef State *st = &self.st
        cdef tuple ids = tuple(chain)
        cdef size_t nmaps = len(ids), i
        cdef int64_t *keys
        cdef uint8_t *found
        cdef Map **maps
        cdef int64_t first = 0, cnt = 0
        cdef bint fits
        cdef DepthRuns runs
        cdef Err err
        if nmaps == 0:
            raise ValueError("the chain is empty")
        fits = _int64(first_chunk, &first) & _int64(count, &cnt)
        runs.a = NULL
        runs.n = runs.cap = 0
        memset(&err, 0, sizeof(Err))
        keys = <int64_t *>malloc(nmaps * sizeof(int64_t))
        found = <uint8_t *>malloc(nmaps)
        maps = <Map **>malloc(nmaps * sizeof(Map *))
        try:
            if keys == NULL or found == NULL or maps == NULL:
                raise MemoryError()
            for i in range(nmaps):
                found[i] = _lookup_key(ids[i], &keys[i])
            self._enter()
            with nogil:
                pthread_rwlock_rdlock(&self.lock)
                for i in range(nmaps):
                    maps[i] = <Map *>ht_get(&st.maps, keys[i]) if found[i] else NULL
                    if maps[i] == NULL:
                        err.kind = E_KEY
                        err.a = <int64_t>i
                        break
                if err.kind == E_OK:
                    if not fits or first < 0 or cnt < 0 or <uint64_t>first > maps[0].nchunks or \
                            <uint64_t>cnt > maps[0].nchunks - <uint64_t>first:
                        err.kind = E_RANGE
                    elif st_depth_runs(st, maps, nmaps, <uint64_t>first, <uint64_t>cnt, &runs):
                        err.kind = E_NOMEM
                pthread_rwlock_unlock(&self.lock)
            if err.kind == E_RANGE:
                raise ValueError(
                    f"range {first_chunk * st.cs}+{count * st.cs} is outside the map")
            if err.kind:
                raise _exception(st, &err, ids)
            return [(runs.a[i].count, runs.a[i].depth, runs.a[i].allocated != 0) for i in range(runs.n)]
        finally:
            free(keys)
            free(found)
            free(maps)
            free(runs.a)

    def diff_runs(self, a_id, b_id):
        """Runs of (first_chunk, count) whose slots differ between two maps."""
        cdef State *st = &self.st
        cdef int64_t ka = 0, kb = 0
        cdef bint fa = _lookup_key(a_id, &ka)
        cdef bint fb = _lookup_key(b_id, &kb)
        cdef Map *a
        cdef Map *b
        cdef DiffRuns runs
        cdef Err err
        cdef size_t i
        runs.a = NULL
        runs.n = runs.cap = 0
        memset(&err, 0, sizeof(Err))
        self._enter()
        try:
            with nogil:
                pthread_rwlock_rdlock(&self.lock)
                a = <Map *>ht_get(&st.maps, ka) if fa else NULL
                b = <Map *>ht_get(&st.maps, kb) if fb else NULL
                if a == NULL:
                    err.kind = E_KEY
                    err.a = 0
                elif b == NULL:
                    err.kind = E_KEY
                    err.a = 1
                elif st_diff_runs(st, a, b, &runs):
                    err.kind = E_NOMEM
                pthread_rwlock_unlock(&self.lock)
            if err.kind:
                raise _exception(st, &err, (a_id, b_id))
            return [(runs.a[i].first, runs.a[i].count) for i in range(runs.n)]
        finally:
            free(runs.a)

    def exclusive_chunks(self, map_id, parent_id):
        """Chunks allocated in the map that its parent does not share."""
        cdef State *st = &self.st
        cdef int64_t km = 0, kp = 0
        cdef bint fm = _lookup_key(map_id, &km)
        cdef bint has_parent = parent_id is not None
        cdef bint fp = has_parent and _lookup_key(parent_id, &kp)
        cdef Map *m
        cdef Map *parent = NULL
        cdef uint64_t count = 0
        cdef Err err
        memset(&err, 0, sizeof(Err))
        self._enter()
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            m = <Map *>ht_get(&st.maps, km) if fm else NULL
            if has_parent and fp:
                parent = <Map *>ht_get(&st.maps, kp)
            if m == NULL:
                err.kind = E_KEY
                err.a = 0
            elif has_parent and parent == NULL:
                err.kind = E_KEY
                err.a = 1
            else:
                count = st_exclusive(st, m, parent)
            pthread_rwlock_unlock(&self.lock)
        if err.kind:
            raise _exception(st, &err, (map_id, parent_id))
        return count

    def stats(self):
        cdef State *st = &self.st
        cdef uint64_t slots, used, nfree, pending, maps
        self._enter()
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
            slots = st.nslots
            used = st.used
            nfree = st.free.n
            pending = st.pending.n
            maps = st.maps.n
            pthread_rwlock_unlock(&self.lock)
        return {"slots": slots, "used": used, "free": nfree, "pending": pending, "maps": maps}

    def refcounts(self):
        """Slot refcounts as little-endian uint32, index 0 unused: for `Store.check`."""
        cdef State *st = &self.st
        cdef bytes out
        self._enter()
        with nogil:
            pthread_rwlock_rdlock(&self.lock)
        try:
            # bytes are not tracked by the GC: no finalizer can run here.
            out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(4 * (st.nslots + 1)))
            cs_le32_copy(PyBytes_AS_STRING(out), st.refs, st.nslots + 1)
            return out
        finally:
            pthread_rwlock_unlock(&self.lock)

    def take_free(self):
        """Take every free slot out of circulation (to punch holes), ascending; `release` returns them."""
        cdef State *st = &self.st
        cdef size_t i
        cdef uint32_t s
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
        self.writer = pthread_self()
        self.writer_active = True
        try:
            free_slots = sorted([st.free.a[i] for i in range(st.free.n)])
            for i in range(st.free.n):
                s = st.free.a[i]
                st.freebit[s >> 3] &= <uint8_t>~(1 << (s & 7))
            st.free.n = 0
            return free_slots
        finally:
            self.writer_active = False
            pthread_rwlock_unlock(&self.lock)

    def trim_free_tail(self):
        """Shrink the pool and the data file past its last used or pending slot, and give
        back blocks reserved past the end; returns the pool size."""
        cdef State *st = &self.st
        cdef struct_stat sb
        cdef uint64_t n, target = 0
        cdef size_t i, j
        cdef uint32_t s
        cdef int rc = 0
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
            n = st.nslots
            while n and is_free(st, <uint32_t>n):
                n -= 1
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
            if rc == 0:
                st.prealloc_end = 0
            if rc == 0 and n < st.nslots:
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
            pthread_rwlock_unlock(&self.lock)
        if rc:
            raise OSError(rc, _strerror(rc))
        return n

    # -- persistence ---------------------------------------------------------

    def take_changes(self):
        """Hand over everything changed since the last call; the caller makes it durable."""
        cdef State *st = &self.st
        cdef size_t i
        cdef Page *p
        cdef Map *m
        cdef bytes blob
        self._enter()
        with nogil:
            pthread_rwlock_wrlock(&self.lock)
        self.writer = pthread_self()
        self.writer_active = True
        try:
            pages = []
            for i in range(st.dirty_pages.n):
                p = <Page *>st.dirty_pages.a[i]
                if p != NULL:
                    blob = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(8 * st.pe))
                    cs_le32_copy(PyBytes_AS_STRING(blob), ents(p), 2 * st.pe)
                    pages.append((p.id, blob))
            maps = []
            for i in range(st.dirty_maps.n):
                m = <Map *>st.dirty_maps.a[i]
                if m != NULL:
                    maps.append((m.id, _directory(st, m)))
            maps.sort()
            changes = Changes(pages, [st.dead.a[i] for i in range(st.dead.n)], maps,
                              [st.pending.a[i] for i in range(st.pending.n)])
            # Nothing can fail from here on: hand the changes over.
            for i in range(st.dirty_pages.n):
                p = <Page *>st.dirty_pages.a[i]
                if p != NULL:
                    p.dirty = 0
            for i in range(st.dirty_maps.n):
                m = <Map *>st.dirty_maps.a[i]
                if m != NULL:
                    m.dirty = 0
            st.dirty_pages.n = 0
            st.dirty_maps.n = 0
            st.dead.n = 0
            st.pending.n = 0
            if st.nfresh:
                memset(st.freshbit, 0, bit_bytes(st.slot_cap))
                st.nfresh = 0
            return changes
        finally:
            self.writer_active = False
            pthread_rwlock_unlock(&self.lock)

    def release(self, freed):
        """Make slots freed by durable metadata available again."""
        cdef State *st = &self.st
        cdef list items = list(freed)
        cdef size_t n = len(items), i, j
        cdef uint32_t *slots
        cdef uint32_t s
        cdef int64_t v
        cdef int kind = E_OK
        cdef size_t bad = 0
        if n == 0:
            return
        slots = <uint32_t *>malloc(n * sizeof(uint32_t))
        if slots == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                if not _int64(items[i], &v) or v <= 0 or v > <int64_t>0xFFFFFFFF:
                    raise ValueError(f"slot {items[i]} is not in the pool")
                slots[i] = <uint32_t>v
            self._enter()
            with nogil:
                pthread_rwlock_wrlock(&self.lock)
                if u32_reserve(&st.free, n):
                    kind = E_NOMEM
                else:
                    for i in range(n):
                        s = slots[i]
                        if s > st.nslots or st.refs[s] != 0 or is_free(st, s):
                            kind = E_BAD_SLOT
                            bad = i
                            # undo the marks of this call
                            for j in range(i):
                                st.freebit[slots[j] >> 3] &= <uint8_t>~(1 << (slots[j] & 7))
                            break
                        st.freebit[s >> 3] |= <uint8_t>(1 << (s & 7))
                    if kind == E_OK:
                        for i in range(n):
                            st.free.a[st.free.n] = slots[i]
                            st.free.n += 1
                pthread_rwlock_unlock(&self.lock)
            if kind == E_NOMEM:
                raise MemoryError()
            if kind == E_BAD_SLOT:
                raise ValueError(f"slot {items[bad]} is not a freed slot of the pool")
        finally:
            free(slots)


# -- volumes ---------------------------------------------------------------------------

cdef int64_t IO_LIMIT = 1 << 30
MAX_IO = IO_LIMIT


cdef class VolumeBase:
    """The hot half of `cowstore.Volume`: argument checks and I/O on one map, in C.

    `cowstore.volume.Volume` adds the rest (flush, extents, a file object) and `_reclaim`,
    which makes room when the pool is full so that a write retries once.
    """

    def _attach(self, Engine engine not None, map_id, key, size, bint readonly):
        self._engine = engine
        self._mid = _new_key(map_id)
        self._key = key
        self._size = size
        self._readonly = readonly

    @property
    def key(self):
        return self._key

    @property
    def size(self):
        return self._size

    @property
    def readonly(self):
        return self._readonly

    @property
    def closed(self):
        return self._closed

    def close(self):
        self._closed = True

    def _reclaim(self):
        return False

    cdef int _check(self, object offset, object length, int64_t *off, int64_t *n, int64_t max_length) except -1:
        if self._closed:
            raise Closed(f"volume {self._key!r} is closed")
        if not isinstance(offset, int) or not isinstance(length, int):
            raise InvalidArgument("offset and length must be ints")
        if (not (_int64(offset, off) & _int64(length, n)) or off[0] < 0 or n[0] < 0
                or off[0] > self._size or n[0] > self._size - off[0]):
            raise InvalidArgument(f"range {offset}+{length} is outside the volume of {self._size} bytes")
        if n[0] > max_length:
            raise InvalidArgument(f"length {length} is over the maximum of {max_length} bytes per call")
        return 0

    def _check_range(self, offset, length, max_length=IO_LIMIT):
        """The checks every call makes, for the methods that live in Python."""
        cdef int64_t off, n
        self._check(offset, length, &off, &n, max_length)

    cdef int _check_writable(self) except -1:
        if self._readonly:
            raise ReadOnly(f"snapshot {self._key!r} is read-only here: it cannot be written")
        return 0

    cdef object _error(self, Err *err, int64_t off, int64_t n):
        if err.kind == E_KEY:
            return NotFound(f"snapshot {self._key!r} was committed or removed")
        exc = _exception(&self._engine.st, err, (self._mid,))
        if isinstance(exc, Corruption):
            return Corruption(f"snapshot {self._key!r}, read of {n} bytes at offset {off}: {exc}")
        return exc

    cdef int _read(self, unsigned char *buf, int64_t off, int64_t n) except -1:
        cdef Err err
        memset(&err, 0, sizeof(Err))
        self._engine._enter()
        self._engine._io_read(self._mid, True, off, n, buf, &err)
        if err.kind:
            raise self._error(&err, off, n)
        return 0

    cdef int _write(self, const unsigned char *data, int64_t off, int64_t n) except -1:
        cdef Err err
        cdef int attempt
        self._engine._enter()
        for attempt in range(2):
            memset(&err, 0, sizeof(Err))
            self._engine._io_write(self._mid, True, off, n, data, &err)
            if err.kind != E_NOSPACE or attempt or not self._reclaim():
                break
        if err.kind:
            raise self._error(&err, off, n)
        return 0

    def pread(self, length, offset):
        """`length` bytes from `offset`."""
        cdef int64_t off, n
        self._check(offset, length, &off, &n, IO_LIMIT)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>n)
        self._read(<unsigned char *>PyBytes_AS_STRING(out), off, n)
        return out

    def preadinto(self, buffer, offset):
        """Fill `buffer` (any writable buffer) from `offset`; returns its length in bytes."""
        cdef Py_buffer view
        cdef int64_t off, n
        if type(buffer) is not bytearray:
            try:
                mv = memoryview(buffer)
            except TypeError:
                raise InvalidArgument(f"preadinto needs a writable buffer, not {type(buffer).__name__}") from None
            if mv.readonly:
                raise InvalidArgument("preadinto needs a writable buffer")
        _get_buffer(buffer, &view)
        try:
            self._check(offset, view.len, &off, &n, IO_LIMIT)
            self._read(<unsigned char *>view.buf, off, n)
        finally:
            PyBuffer_Release(&view)
        return n

    def pwrite(self, data, offset):
        """Write `data` (any buffer) at `offset`; returns its length in bytes."""
        cdef Py_buffer view
        cdef int64_t off, n
        if type(data) is not bytes and type(data) is not bytearray:
            try:
                memoryview(data)
            except TypeError:
                raise InvalidArgument(f"pwrite needs a bytes-like object, not {type(data).__name__}") from None
        _get_buffer(data, &view)
        try:
            self._check(offset, view.len, &off, &n, IO_LIMIT)
            self._check_writable()
            self._write(<const unsigned char *>view.buf, off, n)
        finally:
            PyBuffer_Release(&view)
        return n

    def write_zeroes(self, offset, length):
        """Make a range read as zeros without allocating space for them."""
        cdef int64_t off, n
        self._check(offset, length, &off, &n, IO_LIMIT)
        self._check_writable()
        self._write(NULL, off, n)
