# Pages and maps: a page is one malloc'd block shared by the maps that name it
# (refcounted), copied before a write into it while shared (copy on write of pages); maps
# are found by id in a hash table; pages and maps changed since the last take_changes are
# dirty, listed for it.

cdef uint32_t DIRTY_LIMIT = 0xFFFFFFF0u


cdef inline uint32_t *ents(Page *p) noexcept nogil:
    return <uint32_t *>(p + 1)


cdef inline uint32_t *sums(State *st, Page *p) noexcept nogil:
    return <uint32_t *>(p + 1) + st.pe


cdef inline uint32_t map_entry(State *st, Map *m, uint64_t chunk) noexcept nogil:
    """The slot of a chunk inside the map."""
    cdef Page *p = m.pages[chunk / st.pe]
    if p == NULL:
        return 0
    return ents(p)[chunk % st.pe]


cdef inline uint32_t map_entry_any(State *st, Map *m, uint64_t chunk) noexcept nogil:
    """The slot of any chunk: 0 beyond the map's end."""
    if chunk >= m.nchunks:
        return 0
    return map_entry(st, m, chunk)


cdef inline Page *map_span_page(Map *m, uint64_t p, uint64_t end, Page *partial) noexcept nogil:
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


cdef int dirty_pages_reserve(State *st, size_t k) noexcept nogil:
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


cdef inline void page_mark_dirty(State *st, Page *p) noexcept nogil:
    if p.dirty == 0:
        st.dirty_pages.a[st.dirty_pages.n] = p
        st.dirty_pages.n += 1
        p.dirty = <uint32_t>st.dirty_pages.n


cdef inline void map_mark_dirty(State *st, Map *m) noexcept nogil:
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
        page_mark_dirty(st, page)
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
                st.refs[e[i] & FMT_SLOT_MASK] += 1
        page.refs -= 1
    page_mark_dirty(st, fresh)
    m.pages[index] = fresh
    map_mark_dirty(st, m)
    return fresh


cdef void page_unref(State *st, Page *page) noexcept nogil:
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
            slot_decref(st, e[i] & FMT_SLOT_MASK)
    if page.dirty:
        st.dirty_pages.a[page.dirty - 1] = NULL
    st.dead.a[st.dead.n] = page.id
    st.dead.n += 1
    free(page)


cdef void map_free(Map *m) noexcept nogil:
    free(m.pages)
    free(m)


cdef bytes directory_bytes(State *st, Map *m):
    """The map's stored directory (with the GIL: bytes are not tracked by the GC, so no
    finalizer runs here, under the lock)."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(FMT_PAGE_ID_BYTES * m.npages))
    cdef uint64_t *ids = <uint64_t *>PyBytes_AS_STRING(out)
    cdef uint64_t i
    cdef uint64_t v
    for i in range(m.npages):
        v = m.pages[i].id if m.pages[i] != NULL else 0
        cs_le64_copy(&ids[i], &v, 1)
    return out


cdef inline Map *map_find(State *st, Key key) noexcept nogil:
    """The map with this id; NULL when there is none."""
    return <Map *>ht_get(&st.maps, key.id) if key.valid else NULL


cdef Map *map_new(uint64_t npages) noexcept nogil:
    """A zeroed map with room for `npages` page pointers (all NULL); NULL when out of memory."""
    cdef Map *m = <Map *>calloc(1, sizeof(Map))
    if m == NULL:
        return NULL
    m.pages = <Page **>calloc(npages + 1, sizeof(Page *))
    if m.pages == NULL:
        free(m)
        return NULL
    m.npages = npages
    return m


cdef int map_ref_pages(Map *m, Err *err) noexcept nogil:
    """Count the map's references to its pages; none, and E_REFS, if a refcount would overflow."""
    cdef uint64_t i, j
    for i in range(m.npages):
        if m.pages[i] != NULL:
            if m.pages[i].refs == 0xFFFFFFFFu:
                for j in range(i):
                    if m.pages[j] != NULL:
                        m.pages[j].refs -= 1
                err.kind = E_REFS
                return -1
            m.pages[i].refs += 1
    return 0


cdef int map_create(State *st, int64_t key, uint64_t nchunks, Err *err) noexcept nogil:
    """A new map of `nchunks` unallocated chunks."""
    cdef Map *m
    if ht_get(&st.maps, key) != NULL:
        err.kind = E_EXISTS
        return -1
    m = map_new((nchunks + st.pe - 1) / st.pe)
    if m == NULL or ht_reserve(&st.maps, 1) or ptr_reserve(&st.dirty_maps, 1):
        if m != NULL:
            map_free(m)
        err.kind = E_NOMEM
        return -1
    m.id = key
    m.nchunks = nchunks
    ht_put(&st.maps, key, m)
    map_mark_dirty(st, m)
    return 0


cdef int map_clone(State *st, int64_t key, Key source, bint as_child, Err *err) noexcept nogil:
    """A new map sharing every page of `source`: no entry or chunk is copied. As a child,
    its parent is the source; else the source's parent (it takes the source's place)."""
    cdef Map *src = map_find(st, source)
    cdef Map *m
    if ht_get(&st.maps, key) != NULL:
        err.kind = E_EXISTS
        return -1
    if src == NULL:
        err.kind = E_KEY
        err.a = 1
        return -1
    m = map_new(src.npages)
    if m == NULL or ht_reserve(&st.maps, 1) or ptr_reserve(&st.dirty_maps, 1):
        if m != NULL:
            map_free(m)
        err.kind = E_NOMEM
        return -1
    m.id = key
    m.nchunks = src.nchunks
    memcpy(m.pages, src.pages, src.npages * sizeof(Page *))
    if map_ref_pages(m, err) < 0:
        map_free(m)
        return -1
    m.parent = src if as_child else src.parent
    if m.parent != NULL:
        m.parent.children += 1
    ht_put(&st.maps, key, m)
    map_mark_dirty(st, m)
    return 0


cdef int map_drop(State *st, Key key, Err *err) noexcept nogil:
    """Drop a map: pages it alone names die and release their slots."""
    cdef Map *m = map_find(st, key)
    cdef Page *p
    cdef uint64_t i, j, dying = 0, slots = 0
    cdef uint32_t *e
    if m == NULL:
        err.kind = E_KEY
        return -1
    if st.loading:
        err.kind = E_LOADING
        return -1
    if m.children:
        err.kind = E_CHILDREN_DROP
        err.a = <int64_t>m.children
        return -1
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
        err.kind = E_NOMEM
        return -1
    st.running = 1
    ht_del(&st.maps, key.id)
    for i in range(m.npages):
        if m.pages[i] != NULL:
            page_unref(st, m.pages[i])
    if m.dirty:
        st.dirty_maps.a[m.dirty - 1] = NULL
    if m.parent != NULL:
        m.parent.children -= 1
    map_free(m)
    return 0


cdef object changes_take(State *st, bint refcounts):
    """Everything changed since the last call, as a `Changes` (with the slot refcounts of
    the same moment if asked), and the state that it is handed over (under the exclusive
    lock, with the GIL)."""
    cdef size_t i
    cdef Page *p
    cdef Map *m
    cdef bytes blob
    pages = []
    for i in range(st.dirty_pages.n):
        p = <Page *>st.dirty_pages.a[i]
        if p != NULL:
            blob = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(2 * FMT_ENTRY_BYTES * st.pe))
            cs_le32_copy(PyBytes_AS_STRING(blob), ents(p), 2 * st.pe)
            pages.append((p.id, blob))
    maps = []
    for i in range(st.dirty_maps.n):
        m = <Map *>st.dirty_maps.a[i]
        if m != NULL:
            maps.append((m.id, directory_bytes(st, m)))
    maps.sort()
    changes = Changes(pages, [st.dead.a[i] for i in range(st.dead.n)], maps,
                      [st.pending.a[i] for i in range(st.pending.n)],
                      refcounts_bytes(st) if refcounts else None)
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


cdef void state_free(State *st) noexcept nogil:
    """Free every page, map and list (the engine is going away)."""
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
            map_free(m)
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
