# Loading a stored engine: pages, then maps naming them, then finish_load, which derives
# the slot refcounts from the pages (so they can never disagree with the maps) and links
# each map to its parent.

cdef int page_load(State *st, int64_t page_id, const void *blob, Err *err) noexcept nogil:
    """Register a stored page (`page_bytes` little-endian bytes); only before finish_load."""
    cdef Page *page
    if st.running:
        err.kind = E_LOADED
        return -1
    if ht_get(&st.loaded, page_id) != NULL:
        err.kind = E_PAGE_TWICE
        return -1
    page = <Page *>malloc(st.page_bytes)
    if page == NULL or ht_reserve(&st.loaded, 1) or ptr_reserve(&st.loaded_order, 1):
        free(page)
        err.kind = E_NOMEM
        return -1
    page.id = <uint64_t>page_id
    page.refs = 0
    page.dirty = 0
    cs_le32_copy(ents(page), blob, 2 * st.pe)
    ht_put(&st.loaded, page_id, page)
    st.loaded_order.a[st.loaded_order.n] = page
    st.loaded_order.n += 1
    if st.next_page_id <= <uint64_t>page_id:
        st.next_page_id = <uint64_t>page_id + 1
    st.loading = 1
    return 0


cdef int map_load(State *st, int64_t key, uint64_t nchunks, const void *directory, uint64_t npages,
                  bint has_parent, int64_t parent, Err *err) noexcept nogil:
    """Register a stored map whose pages are loaded (`directory`: npages little-endian page
    ids); its parent is linked by finish_load."""
    cdef Map *m
    cdef uint64_t i, pid
    cdef Page *p
    if st.running:
        err.kind = E_LOADED
        return -1
    if ht_get(&st.maps, key) != NULL:
        err.kind = E_MAP_TWICE
        return -1
    m = map_new(npages)
    if m == NULL:
        err.kind = E_NOMEM
        return -1
    for i in range(npages):
        cs_le64_copy(&pid, <const unsigned char *>directory + FMT_PAGE_ID_BYTES * i, 1)
        if pid == 0:
            continue
        p = <Page *>ht_get(&st.loaded, <int64_t>pid) if pid <= <uint64_t>INT64_MAX else NULL
        if p == NULL:
            map_free(m)
            err.kind = E_NO_PAGE
            err.a = <int64_t>pid
            return -1
        m.pages[i] = p
    if ht_reserve(&st.maps, 1):
        map_free(m)
        err.kind = E_NOMEM
        return -1
    if map_ref_pages(m, err) < 0:
        map_free(m)
        return -1
    m.id = key
    m.nchunks = nchunks
    m.parent_key = parent
    m.has_parent_key = has_parent
    ht_put(&st.maps, key, m)
    st.loading = 1
    return 0


cdef int load_check(State *st, uint64_t n, uint64_t *ndead, Err *err) noexcept nogil:
    """finish_load's checks: every page names slots of a pool of `n`; every named parent
    exists, is no larger than its child (a child may have grown), and no chain loops. Counts the unreferenced pages."""
    cdef size_t i, j
    cdef uint64_t steps
    cdef uint32_t *e
    cdef Page *p
    cdef Map *m
    cdef Map *up
    for i in range(st.loaded_order.n):
        p = <Page *>st.loaded_order.a[i]
        if p.refs == 0:
            ndead[0] += 1
            continue
        e = ents(p)
        for j in range(st.pe):
            if (e[j] & FMT_SLOT_MASK) > n:
                err.kind = E_SLOT_BEYOND
                err.a = <int64_t>p.id
                err.b = e[j] & FMT_SLOT_MASK
                return -1
    for i in range(st.maps.mask + 1 if st.maps.tab != NULL else 0):
        m = <Map *>st.maps.tab[i].val
        if m == NULL or not m.has_parent_key:
            continue
        up = m
        steps = 0
        while up != NULL and up.has_parent_key:
            err.a = up.id
            err.b = up.parent_key
            up = <Map *>ht_get(&st.maps, up.parent_key)
            steps += 1
            if up == NULL or up.nchunks > m.nchunks or up == m or steps > st.maps.n:
                err.kind = E_BAD_PARENT
                return -1
    err.a = err.b = 0
    return 0


cdef int load_finish(State *st, int64_t nslots, Err *err) noexcept nogil:
    """Derive slot refcounts from the loaded pages of a pool of `nslots`; unreferenced pages
    become dead. Everything is checked before anything changes."""
    cdef uint64_t n, s, used = 0, ndead = 0
    cdef size_t i, j
    cdef uint32_t *refs = NULL
    cdef uint8_t *bits = NULL
    cdef uint8_t *fresh = NULL
    cdef uint32_t *e
    cdef Page *p
    cdef Map *m
    cdef struct_stat sb
    if nslots > st.max_slots:
        err.kind = E_POOL_LIMIT
        return -1
    if nslots < 0:
        err.kind = E_POOL_INVALID
        return -1
    if st.running:
        err.kind = E_FINISHED
        return -1
    n = <uint64_t>nslots
    if load_check(st, n, &ndead, err) < 0:
        return -1
    refs = <uint32_t *>calloc(n + 1, sizeof(uint32_t))
    bits = <uint8_t *>calloc(bit_bytes(n + 1), 1)
    fresh = <uint8_t *>calloc(bit_bytes(n + 1), 1)
    if refs == NULL or bits == NULL or fresh == NULL or u64_reserve(&st.dead, ndead):
        free(refs)
        free(bits)
        free(fresh)
        err.kind = E_NOMEM
        return -1
    for i in range(st.loaded_order.n):
        p = <Page *>st.loaded_order.a[i]
        if p.refs:
            e = ents(p)
            for j in range(st.pe):
                if e[j]:
                    refs[e[j] & FMT_SLOT_MASK] += 1
    for s in range(1, n + 1):
        if refs[s]:
            used += 1
    if vec_grow(<void **>&st.free.a, &st.free.cap, n - used, sizeof(uint32_t)):
        free(refs)
        free(bits)
        free(fresh)
        err.kind = E_NOMEM
        return -1
    free(st.refs)
    free(st.freebit)
    free(st.freshbit)
    st.refs = refs
    st.freebit = bits
    st.freshbit = fresh
    st.nfresh = 0
    st.slot_cap = n + 1
    st.nslots = n
    if fstat(st.fd, &sb) == 0:
        view_grow(st, <uint64_t>sb.st_size)
    st.used = used
    st.free.n = 0
    s = n
    while s >= 1:
        if st.refs[s] == 0:
            slot_free_push(st, <uint32_t>s)
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
    return 0
