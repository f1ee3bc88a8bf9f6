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


cdef int data_write(State *st, const unsigned char *buf, uint64_t n, uint64_t off, Err *err) noexcept nogil:
    if fd_pwrite_full(st.fd, buf, n, off, err) < 0:
        return -1
    view_grow(st, off + n)
    return 0


cdef inline bint copies_in(State *st, uint32_t slot, uint64_t n, uint64_t off) noexcept nogil:
    """An overwrite of bytes the file holds in `slot` goes through the mapping."""
    return st.view_writable and off + n <= st.file_size and slot_is_fresh(st, slot)


cdef int data_overwrite(State *st, uint32_t slot, const unsigned char *buf, uint64_t n, uint64_t off,
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
    return data_write(st, buf, n, off, err)


cdef void data_close(State *st) noexcept nogil:
    """End I/O: later reads and writes fail with E_CLOSED, and the mapping goes."""
    st.closed = 1
    view_drop(st)


cdef int data_sync(int fd, Err *err) noexcept nogil:
    cdef int rc = fsync(fd)
    while rc < 0 and errno == EINTR:
        rc = fsync(fd)
    if rc < 0:
        err.kind = E_OS
        err.errnum = errno
        return -1
    return 0
