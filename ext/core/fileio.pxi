# The data file: pread and pwrite loops, the mapping reads copy from (SIGBUS-guarded), and
# the rule for overwrites: through the mapping only in fresh slots, else pwrite.

cdef size_t IO_MAX = 1 << 30


cdef uint64_t VIEW_MIN = <uint64_t>1 << 36


cdef int fd_pread_full(int fd, unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
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


cdef int fd_pwrite_full(int fd, const unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    cdef ssize_t r
    while n:
        r = pwrite(fd, buf, n if n < IO_MAX else IO_MAX, <off_t>off)
        if r < 0:
            if errno == EINTR:
                continue
            err.kind = E_FULL if errno == ENOSPC or errno == EDQUOT else E_OS
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


cdef int data_read(State *st, unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    """Data-file bytes: copied from the mapping where the file surely holds them, else pread."""
    if st.view != NULL and off + n <= st.file_size:
        if cs_guarded_copy(buf, st.view + off, n) == 0:
            return 0
        err.kind = E_CORRUPT
        err.a = <int64_t>off
        return -1
    return fd_pread_full(st.fd, buf, n, off, err)


cdef void view_forget(State *st, uint64_t off, uint64_t n) noexcept nogil:
    """Drop the mapping's pages over bytes a pwrite failed to write, so that the next read
    faults them in again from the file.

    A write the file system refuses may still have reached the page cache: FUSE copies a
    write into the cached pages before its server answers, and when the answer is an error
    (ENOSPC) it only marks the pages not up to date. A read through pages the mapping
    still maps would then show bytes the file never held, until the kernel happens to read
    the pages again and they change back without any write. pread reads such pages again
    at once; the mapping does so only at a fault. Only for pages no copy into the mapping
    dirtied (see data_overwrite): a fault reads a page that is not up to date again over
    whatever it holds."""
    cdef uint64_t page = <uint64_t>sysconf(_SC_PAGESIZE), lo, hi
    if st.view == NULL or n == 0 or off >= st.view_len:
        return
    lo = off & ~(page - 1)
    hi = (off + n + page - 1) & ~(page - 1)
    if hi > st.view_len:
        hi = st.view_len
    madvise(<void *>(st.view + lo), hi - lo, MADV_DONTNEED)


cdef int data_write(State *st, const unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    """pwrite into pages no copy into the mapping dirtied; after a failure, reads see the
    file's bytes (view_forget)."""
    st.writes += 1
    if fd_pwrite_full(st.fd, buf, n, off, err) < 0:
        view_forget(st, off, n)
        return -1
    view_grow(st, off + n)
    return 0


cdef inline bint copies_in(State *st, uint32_t slot, uint64_t n, uint64_t off) noexcept nogil:
    """An overwrite of bytes the file holds in `slot` goes through the mapping."""
    return st.view_writable and off + n <= st.file_size and slot_is_fresh(st, slot)


cdef int data_overwrite(State *st, uint32_t slot, const unsigned char *buf, uint64_t n, uint64_t off,
                        Err *err) noexcept nogil:
    """Write bytes of `slot`, a slot a map already names.

    A fresh slot is written by a copy into the mapping as far as the file already holds
    its bytes (so no fault can mean a full disk): a process killed in the middle of the
    copy leaves it torn anywhere, but in a slot that no durable map names. Any other slot
    is written by pwrite, which a kill leaves applied by whole pages. A copy that faults
    (a hole the file system cannot fill on a full disk, or a failing disk) is done again
    by pwrite, which reports which (NoSpace or EIO)."""
    cdef uint64_t inside = 0
    st.writes += 1
    if not (st.view_writable and slot_is_fresh(st, slot)):
        return data_write(st, buf, n, off, err)
    # The slot's pages may hold copies not written back yet, which a pwrite must not meet
    # inside the file (a failed one leaves its pages not up to date, and the kernel reads
    # such a page again over the copies): through the mapping as far as the file holds
    # the bytes, past its end by pwrite, whose failure leaves the mapping alone (reads
    # need no bytes past the end).
    if off < st.file_size:
        inside = st.file_size - off if off + n > st.file_size else n
        if cs_guarded_copy(st.view + off, buf, inside) != 0:
            return data_write(st, buf, n, off, err)
    if inside < n:
        if fd_pwrite_full(st.fd, buf + inside, n - inside, off + inside, err) < 0:
            return -1
        view_grow(st, off + n)
    return 0


cdef void data_close(State *st) noexcept nogil:
    """End I/O: later reads and writes fail with E_CLOSED, and the mapping goes."""
    st.closed = 1
    view_drop(st)


cdef int data_sync(int fd, Err *err) noexcept nogil:
    """The file's bytes and what reading them needs (size, extents), not its times."""
    cdef int rc = fdatasync(fd)
    while rc < 0 and errno == EINTR:
        rc = fdatasync(fd)
    if rc < 0:
        err.kind = E_OS
        err.errnum = errno
        return -1
    return 0
