# The read and write paths: runs of chunks, copy on write of chunks (whole, or only the
# sub-blocks a write touches when the parent holds the chunk: a partial chunk), writes in
# place, zeros, and the sums that seal computes and verified reads check.

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


cdef int map_read(State *st, Map *m, unsigned char *buf, uint64_t off, uint64_t n, Err *err,
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
        slot = map_entry(st, m, chunk)
        run = piece
        if slot & FMT_PARTIAL:
            if partial_read(st, m, chunk, within, piece, buf + pos, err, tmp) < 0:
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
            if fd_pread_full(st.fd, whole, cs, (slot - 1) * cs, err) < 0:
                return -1
            if chunk_crc(whole, cs) != want:
                err.kind = E_CHECKSUM
                err.a = <int64_t>chunk
                err.b = <int64_t>slot
                return -1
            if whole != buf + pos:
                memcpy(buf + pos, whole + within, piece)
        elif slot == 0:
            while pos + run < n and map_entry(st, m, chunk + 1) == 0:
                chunk += 1
                run += cs if n - pos - run > cs else n - pos - run
            memset(buf + pos, 0, run)
        else:
            foff = (slot - 1) * cs + within
            while pos + run < n:
                nxt = map_entry(st, m, chunk + 1)
                if nxt != slot + 1 or checked_sum(st, m, chunk + 1):
                    break
                slot = nxt
                chunk += 1
                run += cs if n - pos - run > cs else n - pos - run
            if data_read(st, buf + pos, run, foff, err) < 0:
                return -1
        pos += run
    return 0


cdef inline uint32_t parent_entry(State *st, Map *m, uint64_t chunk) noexcept nogil:
    return map_entry_any(st, m.parent, chunk) if m.parent != NULL else 0


cdef inline uint32_t sub_block_bits(State *st, uint64_t lo, uint64_t hi) noexcept nogil:
    """The bitmap of the sub-blocks in the sub-block-aligned range lo..hi of a chunk."""
    return <uint32_t>((((<uint64_t>1) << ((hi - lo) / st.sub)) - 1) << (lo / st.sub))


cdef int parent_read(State *st, Map *m, uint64_t chunk, uint64_t within, uint64_t n, unsigned char *buf,
                     Err *err, unsigned char **tmp) noexcept nogil:
    """Bytes of the chunk as the map's parent holds them (zeros without a parent, or past
    the end of a parent smaller than its grown child)."""
    if n == 0:
        return 0
    if m.parent == NULL or chunk >= m.parent.nchunks:
        memset(buf, 0, n)
        return 0
    return map_read(st, m.parent, buf, chunk * st.cs + within, n, err, tmp)


cdef int partial_read(State *st, Map *m, uint64_t chunk, uint64_t within, uint64_t n, unsigned char *buf,
                      Err *err, unsigned char **tmp) noexcept nogil:
    """A piece of a partial chunk: runs of its own sub-blocks from its slot, the rest
    through the parent."""
    cdef Page *page = m.pages[chunk / st.pe]
    cdef uint32_t bits = sums(st, page)[chunk % st.pe]
    cdef uint64_t base = (<uint64_t>(ents(page)[chunk % st.pe] & FMT_SLOT_MASK) - 1) * st.cs
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
            if data_read(st, buf + (pos - within), stop - pos, base + pos, err) < 0:
                return -1
        elif parent_read(st, m, chunk, pos, stop - pos, buf + (pos - within), err, tmp) < 0:
            return -1
        pos = stop
    return 0


cdef int partial_fill(State *st, Map *m, uint64_t chunk, uint32_t slot, uint32_t bits, Err *err) noexcept nogil:
    """Copy a partial chunk's missing sub-blocks from the parent into its slot (st.scratch
    is free to use)."""
    cdef uint64_t k = 0, first, sub = st.sub, base = (<uint64_t>slot - 1) * st.cs
    cdef unsigned char *tmp = NULL
    cdef int rc = 0
    while k < FMT_SUB_BLOCKS and rc == 0:
        if (bits >> k) & 1:
            k += 1
            continue
        first = k
        while k < FMT_SUB_BLOCKS and not (bits >> k) & 1:
            k += 1
        rc = parent_read(st, m, chunk, first * sub, (k - first) * sub, st.scratch, err, &tmp)
        if rc == 0:
            rc = data_overwrite(st, slot, st.scratch, (k - first) * sub, base + first * sub, err)
    free(tmp)
    return rc


cdef int partial_fill_edge(State *st, Map *m, uint64_t chunk, uint64_t within, uint64_t n, uint32_t slot,
                           Err *err) noexcept nogil:
    """Bring the parent's bytes into part of a sub-block a write covers only partly."""
    cdef unsigned char *tmp = NULL
    cdef unsigned char *edge = <unsigned char *>malloc(n)
    cdef int rc
    if edge == NULL:
        err.kind = E_NOMEM
        return -1
    rc = parent_read(st, m, chunk, within, n, edge, err, &tmp)
    if rc == 0:
        rc = data_overwrite(st, slot, edge, n, (<uint64_t>slot - 1) * st.cs + within, err)
    free(tmp)
    free(edge)
    return rc


cdef int chunk_write_reserve(State *st, bint partial) noexcept nogil:
    """Room for everything one chunk write can append, so no step fails half-way."""
    if dirty_pages_reserve(st, 1) or ptr_reserve(&st.dirty_maps, 1):
        return -1
    if u32_reserve(&st.pending, 1) or u32_reserve(&st.free, 1):
        return -1
    if st.free.n == 0 and <int64_t>st.nslots < st.max_slots and slots_ensure(st, st.nslots + 1):
        return -1
    if partial and st.scratch == NULL:
        st.scratch = <unsigned char *>malloc(st.cs)
        if st.scratch == NULL:
            return -1
    return 0


cdef inline bint chunk_in_place(State *st, Page *page, uint64_t i, uint32_t old) noexcept nogil:
    """python.py's _in_place: the page and the slot are this map's alone and the chunk
    carries no sum (a summed chunk is copied on write, so a durable sum always matches the
    durable bytes, even where a commit that sealed the chunk failed)."""
    return (old != 0 and page != NULL and page.refs == 1 and st.refs[old & FMT_SLOT_MASK] == 1
            and ((old & FMT_PARTIAL) != 0 or sums(st, page)[i] == 0))


cdef int chunk_write_in_place(State *st, Map *m, Page *page, uint64_t chunk, uint64_t within,
                              const unsigned char *piece, uint64_t n, Err *err) noexcept nogil:
    """python.py's _write_in_place (piece NULL: zeros): a chunk without a sum is overwritten;
    a partial chunk gains the sub-blocks written, and is whole once it has all."""
    cdef uint64_t i = chunk % st.pe, lo, hi, sub = st.sub
    cdef uint32_t e = ents(page)[i]
    cdef uint32_t *s = sums(st, page)
    cdef uint64_t base = (<uint64_t>(e & FMT_SLOT_MASK) - 1) * st.cs
    cdef uint32_t bits
    if piece == NULL and st.scratch == NULL:
        st.scratch = <unsigned char *>malloc(st.cs)
        if st.scratch == NULL:
            err.kind = E_NOMEM
            return -1
    if e & FMT_PARTIAL:
        if dirty_pages_reserve(st, 1):
            err.kind = E_NOMEM
            return -1
    if piece == NULL:
        memset(st.scratch, 0, n)
        piece = st.scratch
    if not e & FMT_PARTIAL:
        return data_overwrite(st, e, piece, n, base + within, err)
    lo = within / sub * sub
    hi = (within + n + sub - 1) / sub * sub
    bits = s[i]
    if within > lo and not (bits >> (lo / sub)) & 1:
        if partial_fill_edge(st, m, chunk, lo, within - lo, e & FMT_SLOT_MASK, err) < 0:
            return -1
    if within + n < hi and not (bits >> (hi / sub - 1)) & 1:
        if partial_fill_edge(st, m, chunk, within + n, hi - within - n, e & FMT_SLOT_MASK, err) < 0:
            return -1
    if data_overwrite(st, e & FMT_SLOT_MASK, piece, n, base + within, err) < 0:
        return -1
    if bits | sub_block_bits(st, lo, hi) == bits:
        return 0
    bits |= sub_block_bits(st, lo, hi)
    if bits == FMT_FULL_BITS:
        ents(page)[i] = e & FMT_SLOT_MASK
        s[i] = 0
    else:
        s[i] = bits
    page_mark_dirty(st, page)
    return 0


cdef int chunk_write(State *st, Map *m, uint64_t chunk, uint64_t within, const unsigned char *piece,
                     uint64_t n, Err *err) noexcept nogil:
    """python.py's _write_chunk; piece NULL writes zeros."""
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
    if not (full and zero) and chunk_in_place(st, page, i, old):
        return chunk_write_in_place(st, m, page, chunk, within, piece, n, err)
    if chunk_write_reserve(st, not full):
        err.kind = E_NOMEM
        return -1
    page = page_for_write(st, m, index)
    if page == NULL:
        err.kind = E_NOMEM
        return -1
    old = ents(page)[i]
    if not (full and zero):
        # (python.py's in-place branch here is unreachable: a page just made exclusive
        # by copying holds each of its slots at least twice)
        if full:
            src = piece
        else:
            if st.sub and old == parent_entry(st, m, chunk):
                # Partial copy on write: only the sub-blocks the write touches.
                lo = within / st.sub * st.sub
                hi = (within + n + st.sub - 1) / st.sub * st.sub
                rc = parent_read(st, m, chunk, lo, within - lo, st.scratch, err, &tmp)
                if rc == 0:
                    rc = parent_read(st, m, chunk, within + n, hi - within - n, st.scratch + (within + n - lo),
                                     err, &tmp)
                bits = sub_block_bits(st, lo, hi)
                dst = st.scratch + (within - lo)
            else:
                rc = map_read(st, m, st.scratch, chunk * cs, cs, err, &tmp)
                dst = st.scratch + within
            free(tmp)
            if rc < 0:
                return -1
            if piece == NULL:
                memset(dst, 0, n)
            else:
                memcpy(dst, piece, n)
            src = st.scratch
        if slot_alloc(st, &new, err) < 0:
            return -1
        if data_write(st, src, hi - lo, (<uint64_t>new - 1) * cs + lo, err) < 0:
            st.refs[new] = 0
            st.used -= 1
            slot_free_push(st, new)
            return -1
    if bits and bits != FMT_FULL_BITS:
        ents(page)[i] = new | FMT_PARTIAL
        sums(st, page)[i] = bits
    else:
        ents(page)[i] = new
        sums(st, page)[i] = 0
    if old:
        slot_decref(st, old & FMT_SLOT_MASK)
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
        if not ((old == 0 and zero) or (full and zero) or chunk_in_place(st, page, chunk % st.pe, old)):
            need += 1
        pos += piece
    return need


cdef int map_write(State *st, Map *m, const unsigned char *data, uint64_t off, uint64_t n, Err *err) noexcept nogil:
    """Write (data NULL: zero) a validated range. NoSpace is decided before any change."""
    cdef uint64_t pos = 0, chunk, within, piece, avail, need, cs = st.cs
    if n == 0:
        return 0
    avail = st.free.n
    if st.max_slots > <int64_t>st.nslots:
        avail += <uint64_t>(st.max_slots - <int64_t>st.nslots)
    if ((off + n - 1) >> st.cs_shift) - (off >> st.cs_shift) + 1 > avail:
        need = slots_needed(st, m, data, off, n)
        if need > avail:
            err.kind = E_NOSPACE_WRITE
            err.a = <int64_t>need
            err.b = <int64_t>avail
            return -1
    st.running = 1
    while pos < n:
        chunk = (off + pos) >> st.cs_shift
        within = (off + pos) & st.cs_mask
        piece = cs - within
        if piece > n - pos:
            piece = n - pos
        if chunk_write(st, m, chunk, within, data + pos if data != NULL else NULL, piece, err):
            return -1
        pos += piece
    return 0


cdef Map *io_map(State *st, Key key, bint fits, int64_t off, int64_t n, Err *err) noexcept nogil:
    """The map an I/O call works on, once the engine is open and the range is inside it."""
    cdef Map *m
    if not key.valid:
        err.kind = E_KEY
        return NULL
    if st.closed:
        err.kind = E_CLOSED
        return NULL
    m = <Map *>ht_get(&st.maps, key.id)
    if m == NULL:
        err.kind = E_KEY
    elif not range_ok(st, m, fits, off, n):
        err.kind = E_RANGE
        m = NULL
    return m


cdef void io_read(State *st, Key key, bint fits, int64_t off, int64_t n, unsigned char *buf, Err *err,
                  unsigned char **tmp) noexcept nogil:
    """Engine.read: the checks, then (unless buf is NULL: read-only memory) the bytes."""
    cdef Map *m = io_map(st, key, fits, off, n, err)
    if m != NULL and n and buf != NULL:
        map_read(st, m, buf, <uint64_t>off, <uint64_t>n, err, tmp)


cdef void io_write(State *st, Key key, bint fits, int64_t off, int64_t n, const unsigned char *data,
                   Err *err) noexcept nogil:
    """Engine.write (data NULL: Engine.zero)."""
    cdef Map *m = io_map(st, key, fits, off, n, err)
    if m == NULL:
        return
    if st.loading:
        err.kind = E_LOADING
    elif m.children:
        err.kind = E_CHILDREN
        err.a = <int64_t>m.children
    else:
        map_write(st, m, data, <uint64_t>off, <uint64_t>n, err)


cdef int io_overwrite_fresh(State *st, Key key, bint fits, int64_t off, int64_t n, const unsigned char *data,
                            Err *err) noexcept nogil:
    """1 when the write was done (or failed) as an overwrite of a fresh slot through the
    mapping; 0, with nothing changed, when it needs the general path (it allocates, copies,
    crosses a chunk, clears a sum, needs the parent's bytes, or the slot is not fresh).

    A write into a partial chunk may bring it sub-blocks it lacks when it covers them
    whole (chunk_write_in_place's case without edges): random 4 KiB writes into a layer
    mostly land so, in chunks an earlier write allocated."""
    cdef Map *m = io_map(st, key, fits, off, n, err)
    cdef uint64_t chunk, within, lo, hi, sub = st.sub
    cdef Page *page
    cdef uint32_t slot, want, bits = 0
    cdef bint gains = 0
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
    if slot & FMT_PARTIAL:
        lo = within / sub * sub
        hi = (within + <uint64_t>n + sub - 1) / sub * sub
        want = sub_block_bits(st, lo, hi)
        bits = sums(st, page)[chunk % st.pe]
        if (bits & want) != want:
            # Sub-blocks the chunk lacks, covered whole: nothing to bring from the parent.
            if within > lo and not (bits >> (lo / sub)) & 1:
                return 0
            if within + <uint64_t>n < hi and not (bits >> (hi / sub - 1)) & 1:
                return 0
            gains = 1
        slot &= FMT_SLOT_MASK
    elif sums(st, page)[chunk % st.pe]:
        return 0
    if slot == 0 or st.refs[slot] != 1:
        return 0
    if not copies_in(st, slot, <uint64_t>n, (<uint64_t>slot - 1) * st.cs + within):
        return 0
    if <uint64_t>n == st.cs and is_zero(data, <uint64_t>n):
        return 0
    if gains and dirty_pages_reserve(st, 1):
        return 0
    st.running = 1
    if data_overwrite(st, slot, data, <uint64_t>n, (<uint64_t>slot - 1) * st.cs + within, err) < 0 or not gains:
        return 1
    # The entry claims the new sub-blocks only once their bytes are written.
    bits |= want
    if bits == FMT_FULL_BITS:
        ents(page)[chunk % st.pe] = slot
        sums(st, page)[chunk % st.pe] = 0
    else:
        sums(st, page)[chunk % st.pe] = bits
    page_mark_dirty(st, page)
    return 1


cdef void reads_set_verify(State *st, bint verify) noexcept nogil:
    st.verify = verify


cdef int map_seal(State *st, Key key, uint64_t *count, Err *err) noexcept nogil:
    """Fill the map's partial chunks in and compute its missing chunk sums (at commit); how
    many sums it computed in *count."""
    cdef Map *m = NULL
    cdef Page *p
    cdef uint64_t i, j
    cdef uint32_t *e
    cdef uint32_t *s
    count[0] = 0
    if st.closed:
        err.kind = E_CLOSED
        return -1
    if key.valid:
        m = <Map *>ht_get(&st.maps, key.id)
    if m == NULL:
        err.kind = E_KEY
        return -1
    if st.scratch == NULL:
        st.scratch = <unsigned char *>malloc(st.cs)
        if st.scratch == NULL:
            err.kind = E_NOMEM
            return -1
    for i in range(m.npages):
        p = m.pages[i]
        if p == NULL:
            continue
        e = ents(p)
        s = sums(st, p)
        for j in range(st.pe):
            if (e[j] and not s[j]) or e[j] & FMT_PARTIAL:
                if dirty_pages_reserve(st, 1):
                    err.kind = E_NOMEM
                    return -1
                if e[j] & FMT_PARTIAL:
                    if partial_fill(st, m, i * st.pe + j, e[j] & FMT_SLOT_MASK, s[j], err) < 0:
                        return -1
                    e[j] &= FMT_SLOT_MASK
                    s[j] = 0
                if data_read(st, st.scratch, st.cs, (<uint64_t>e[j] - 1) * st.cs, err) < 0:
                    return -1
                s[j] = chunk_crc(st.scratch, st.cs)
                page_mark_dirty(st, p)
                count[0] += 1
    return 0
