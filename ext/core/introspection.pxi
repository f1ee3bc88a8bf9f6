# Introspection: which layer supplies each chunk (depth_runs), where two maps differ
# (diff_runs), and what a map holds that its parent does not (exclusive_chunks). Maps that
# share a page compare equal on its whole span without looking at its entries.

cdef int depth_runs_add(DepthRuns *r, uint64_t count, uint32_t depth, uint32_t allocated) noexcept nogil:
    if r.n and r.a[r.n - 1].depth == depth and r.a[r.n - 1].allocated == allocated:
        r.a[r.n - 1].count += count
        return 0
    if vec_grow(<void **>&r.a, &r.cap, r.n + 1, sizeof(DepthRun)):
        return -1
    r.a[r.n].count = count
    r.a[r.n].depth = depth
    r.a[r.n].allocated = allocated
    r.n += 1
    return 0


cdef int depth_runs_scan(State *st, Map **maps, size_t nmaps, uint64_t first, uint64_t count,
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
            a = map_span_page(maps[k0], p, pend, partial)
            b = map_span_page(maps[k0 + 1], p, pend, partial)
            if a != b or a == partial:
                break
            k0 += 1
        if k0 + 1 == nmaps and map_span_page(maps[k0], p, pend, partial) == NULL:
            if depth_runs_add(runs, pend - c, 0, 0):
                return -1
            c = pend
            continue
        for ch in range(c, pend):
            depth = 0
            for k in range(k0, nmaps):
                e = map_entry_any(st, maps[k], ch)
                below = map_entry_any(st, maps[k + 1], ch) if k + 1 < nmaps else 0
                if e != below:
                    depth = <uint32_t>(k + 1)
                    break
            if depth_runs_add(runs, 1, depth, map_entry_any(st, maps[0], ch) != 0):
                return -1
        c = pend
    return 0


cdef int diff_runs_scan(State *st, Map *a, Map *b, DiffRuns *runs) noexcept nogil:
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
        pa = map_span_page(a, p, pend, partial)
        pb = map_span_page(b, p, pend, partial)
        if pa != pb or pa == partial:
            for ch in range(c, pend):
                if map_entry_any(st, a, ch) != map_entry_any(st, b, ch):
                    if runs.n and runs.a[runs.n - 1].first + runs.a[runs.n - 1].count == ch:
                        runs.a[runs.n - 1].count += 1
                    else:
                        if vec_grow(<void **>&runs.a, &runs.cap, runs.n + 1, sizeof(DiffRun)):
                            return -1
                        runs.a[runs.n].first = ch
                        runs.a[runs.n].count = 1
                        runs.n += 1
        c = pend
    return 0


cdef uint64_t exclusive_scan(State *st, Map *m, Map *parent) noexcept nogil:
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
        if parent != NULL and map_span_page(parent, p, pend, <Page *>m) == pg:
            continue
        e = ents(pg)
        for ch in range(c, pend):
            slot = e[ch - c]
            if slot and (parent == NULL or map_entry_any(st, parent, ch) != slot):
                count += 1
    return count


cdef int depth_runs_collect(State *st, const Key *keys, Map **maps, size_t nmaps, bint fits, int64_t first,
                            int64_t count, DepthRuns *runs, Err *err) noexcept nogil:
    """depth_runs for the chain of maps `keys` (maps: room for nmaps pointers)."""
    cdef size_t i
    for i in range(nmaps):
        maps[i] = map_find(st, keys[i])
        if maps[i] == NULL:
            err.kind = E_KEY
            err.a = <int64_t>i
            return -1
    if not fits or first < 0 or count < 0 or <uint64_t>first > maps[0].nchunks or \
            <uint64_t>count > maps[0].nchunks - <uint64_t>first:
        err.kind = E_CHUNK_RANGE
        return -1
    if depth_runs_scan(st, maps, nmaps, <uint64_t>first, <uint64_t>count, runs):
        err.kind = E_NOMEM
        return -1
    return 0


cdef int diff_runs_collect(State *st, Key a, Key b, DiffRuns *runs, Err *err) noexcept nogil:
    cdef Map *ma = map_find(st, a)
    cdef Map *mb = map_find(st, b)
    if ma == NULL or mb == NULL:
        err.kind = E_KEY
        err.a = 0 if ma == NULL else 1
        return -1
    if diff_runs_scan(st, ma, mb, runs):
        err.kind = E_NOMEM
        return -1
    return 0


cdef int exclusive_count(State *st, Key key, bint has_parent, Key parent, uint64_t *count,
                         Err *err) noexcept nogil:
    cdef Map *m = map_find(st, key)
    cdef Map *up = map_find(st, parent) if has_parent else NULL
    if m == NULL or (has_parent and up == NULL):
        err.kind = E_KEY
        err.a = 0 if m == NULL else 1
        return -1
    count[0] = exclusive_scan(st, m, up)
    return 0
