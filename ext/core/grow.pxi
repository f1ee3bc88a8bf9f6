# Growing a map (Store.resize): the new chunks are unallocated, so only the directory
# grows, by empty pages; no page or chunk is written. A grown map may be larger than its
# parent: reads and partial copies on write through the parent find zeros past its end
# (parent_entry, parent_read), and finish_load accepts a parent no larger than its child.

cdef int map_grow(State *st, Key key, uint64_t nchunks, Err *err) noexcept nogil:
    """Give the map `nchunks` chunks, the new ones unallocated; it shrinks back only over
    unallocated chunks (a grow undone). A map with children cannot change."""
    cdef Map *m = map_find(st, key)
    cdef uint64_t npages = (nchunks + st.pe - 1) / st.pe, i, c, end
    cdef Page **pages
    cdef bint held = 0
    if m == NULL:
        err.kind = E_KEY
        return -1
    if m.children:
        err.kind = E_CHILDREN
        err.a = <int64_t>m.children
        return -1
    if nchunks < m.nchunks:
        for i in range(npages, m.npages):
            if m.pages[i] != NULL:
                held = 1
        end = npages * st.pe if npages * st.pe < m.nchunks else m.nchunks
        for c in range(nchunks, end):
            if map_entry(st, m, c):
                held = 1
        if held:
            err.kind = E_SHRINK
            err.a = <int64_t>nchunks
            return -1
    if ptr_reserve(&st.dirty_maps, 1):
        err.kind = E_NOMEM
        return -1
    if npages > m.npages:
        # One NULL past the last page, as map_new leaves it.
        pages = <Page **>realloc(m.pages, (npages + 1) * sizeof(Page *))
        if pages == NULL:
            err.kind = E_NOMEM
            return -1
        memset(pages + m.npages, 0, (npages + 1 - m.npages) * sizeof(Page *))
        m.pages = pages
    m.npages = npages
    m.nchunks = nchunks
    map_mark_dirty(st, m)
    return 0
