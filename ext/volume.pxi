# The VolumeBase binding: a volume's argument checks and I/O on one map, straight to the
# engine's locked read and write (`Engine.read_into`, `Engine.write_from`).

cdef int64_t IO_LIMIT = 1 << 30
MAX_IO = IO_LIMIT


cdef class VolumeBase:
    """The hot half of `cowstore.Volume`: argument checks and I/O on one map, in C.

    `cowstore.volume.Volume` adds the rest (flush, extents, a file object) and `_reclaim`,
    which makes room when the pool is full so that a write retries once.
    """

    def _attach(self, Engine engine not None, map_id, key, size, bint readonly):
        self._engine = engine
        self._map.id = new_map_id(map_id)
        self._map.valid = 1
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
        if not isinstance(offset, int) or not isinstance(length, int) or type(offset) is bool or type(length) is bool:
            raise InvalidArgument("offset and length must be ints")
        if (not (as_int64(offset, off) & as_int64(length, n)) or off[0] < 0 or n[0] < 0
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

    cdef int _read(self, unsigned char *buf, int64_t off, int64_t n) except -1:
        cdef Err err = NO_ERROR
        self._engine.read_into(self._map, True, off, n, buf, &err)
        if err.kind:
            raise error(&self._engine.st, &err, (self._map.id,), off, n, self._key)
        return 0

    cdef int _write(self, const unsigned char *data, int64_t off, int64_t n) except -1:
        cdef Err err
        cdef int attempt
        for attempt in range(2):
            err = NO_ERROR
            self._engine.write_from(self._map, True, off, n, data, &err)
            if err.kind not in (E_NOSPACE, E_NOSPACE_WRITE, E_FULL) or attempt or not self._reclaim():
                break
        if err.kind:
            raise error(&self._engine.st, &err, (self._map.id,), off, n, self._key)
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
            if not mv.c_contiguous:
                raise InvalidArgument("preadinto needs a contiguous buffer: a strided view cannot be filled in place")
        get_bytes_view(buffer, &view)
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
                mv = memoryview(data)
            except TypeError:
                raise InvalidArgument(f"pwrite needs a bytes-like object, not {type(data).__name__}") from None
            if not mv.c_contiguous:
                data = mv.tobytes()
        get_bytes_view(data, &view)
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
