# Small C containers: growable vectors and an open-addressing hash table int64 -> pointer.
# They return -1 when out of memory; their callers report E_NOMEM.

cdef int vec_grow(void **a, size_t *cap, size_t need, size_t size) noexcept nogil:
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
    return vec_grow(<void **>&v.a, &v.cap, v.n + k, sizeof(uint32_t))


cdef inline int u64_reserve(U64Vec *v, size_t k) noexcept nogil:
    return vec_grow(<void **>&v.a, &v.cap, v.n + k, sizeof(uint64_t))


cdef inline int ptr_reserve(PtrVec *v, size_t k) noexcept nogil:
    return vec_grow(<void **>&v.a, &v.cap, v.n + k, sizeof(void *))


cdef inline size_t ht_hash(int64_t key) noexcept nogil:
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
    i = ht_hash(key) & h.mask
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
            j = ht_hash(old[i].key) & h.mask
            while tab[j].val != NULL:
                j = (j + 1) & h.mask
            tab[j] = old[i]
    free(old)
    return 0


cdef void ht_put(HTable *h, int64_t key, void *val) noexcept nogil:
    """Insert a key known to be absent; the caller has reserved room."""
    cdef size_t i = ht_hash(key) & h.mask
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
    i = ht_hash(key) & h.mask
    while h.tab[i].val != NULL and h.tab[i].key != key:
        i = (i + 1) & h.mask
    if h.tab[i].val == NULL:
        return
    j = i
    while True:
        j = (j + 1) & h.mask
        if h.tab[j].val == NULL:
            break
        k = ht_hash(h.tab[j].key) & h.mask
        # The entry at j stays unless its home k lies cyclically outside (i, j].
        if (i < k <= j) if i <= j else (i < k or k <= j):
            continue
        h.tab[i] = h.tab[j]
        i = j
    h.tab[i].val = NULL
    h.n -= 1
