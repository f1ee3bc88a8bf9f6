# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, overflowcheck=False, binding=True
# cython: auto_pickle=False, autotestdict=False
"""The FUSE server of the Cython engine: libfuse 3's low-level request loop, in C.

READ and WRITE go from libfuse's worker threads straight to the engine (`Engine.io_pread`,
`Engine.io_pwrite`) without the GIL, with what they need in a malloc'd `Handle` in
fi->fh. Everything else (names, attributes, open, fsync, lseek, fallocate, statfs) takes
the GIL and asks `cowstore.fuse.namespace.Namespace`, the policy the pure-Python server
shares. The Python side must never be called with the engine's lock held: a write that
finds the pool full releases it, takes the GIL for `Volume._reclaim` and retries once.

Mounting and unmounting are `cowstore.fuse.kernel`'s: libfuse gets the /dev/fuse
descriptor with its I/O functions (`fuse_session_custom_io`, ext/include/cs_fuse.h, which
also asks the kernel to allow shared mappings of direct-I/O files), so it neither mounts
nor unmounts; the loop ends when the kernel ends the connection (ENODEV, after an unmount
or an abort).
"""

from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.errno cimport (EACCES, EINVAL, EIO, ENODATA, ENOMEM, ENOSPC, ENOTDIR, EPERM, EROFS)
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset
from posix.stat cimport S_IFDIR, S_IFMT, struct_stat
from posix.types cimport dev_t, mode_t, off_t
from posix.unistd cimport W_OK

from cowstore.engines._cengine cimport Engine, Err, Key, VolumeBase

import logging
import os

from cowstore.errors import Error as _CowstoreError
from cowstore.fuse.namespace import ROOT as _ROOT
from cowstore.fuse.namespace import errno_of as _errno_of

_log = logging.getLogger("cowstore.fuse")

ENTRY_TIMEOUT = 0.0
"""Seconds the kernel may trust a name: none, snapshots come and go under it."""
ATTR_TIMEOUT = 1.0
"""Seconds the kernel may trust attributes: the size never changes, st_blocks may lag."""

TUNING = {
    "clone_fd": 1,
    "direct_io": 1,
    "splice_read": 0,
    "writeback_cache": 0,
    "max_readahead": 1 << 20,
    "max_background": 64,
}
"""Options chosen by measurement (benchmarks/fuse_probe.py), read by each new Server; a
probe changes them to compare."""


# -- helpers (GIL held) -------------------------------------------------------

cdef int failed(object exc, object what) noexcept:
    """The errno for `exc`; one that is neither an OSError nor a cowstore error is a bug,
    logged with its traceback (the "cowstore.fuse" logger, as the pure-Python server does)."""
    cdef int code = EIO
    try:
        code = _errno_of(exc)
        if not isinstance(exc, (OSError, _CowstoreError)):
            _log.error("FUSE request failed in %s", what, exc_info=exc)
    except BaseException:
        pass
    return code if code > 0 else EIO


cdef int fill_stat(object attr, struct_stat *st) except -1:
    """An Attr of the namespace as a struct stat."""
    memset(st, 0, sizeof(struct_stat))
    st.st_ino = attr.ino
    st.st_mode = attr.mode
    st.st_nlink = attr.nlink
    st.st_size = attr.size
    st.st_blocks = attr.blocks
    st.st_blksize = 4096
    st.st_uid = attr.uid
    st.st_gid = attr.gid
    st.st_mtim.tv_sec = attr.mtime_ns // 1000000000
    st.st_mtim.tv_nsec = attr.mtime_ns % 1000000000
    st.st_ctim = st.st_mtim
    st.st_atim = st.st_mtim
    return 0


cdef inline Server server_of(fuse_req_t req):
    return <Server>fuse_req_userdata(req)


cdef inline Handle *handle_of(fuse_file_info *fi) noexcept nogil:
    return <Handle *><size_t>fi.fh


# Replies are written to /dev/fuse without the GIL.

cdef void reply_err(fuse_req_t req, int code) noexcept:
    with nogil:
        fuse_reply_err(req, code)


cdef int reply_entry(fuse_req_t req, object attr, double attr_timeout) except -1:
    cdef fuse_entry_param e
    memset(&e, 0, sizeof(e))
    fill_stat(attr, &e.attr)
    e.ino = attr.ino
    e.attr_timeout = attr_timeout
    e.entry_timeout = ENTRY_TIMEOUT
    with nogil:
        fuse_reply_entry(req, &e)
    return 0


cdef int reply_attr(fuse_req_t req, object attr, double attr_timeout) except -1:
    cdef struct_stat st
    fill_stat(attr, &st)
    with nogil:
        fuse_reply_attr(req, &st, attr_timeout)
    return 0


# -- connection ---------------------------------------------------------------

cdef void op_init(void *userdata, fuse_conn_info *conn) noexcept with gil:
    cdef Server server = <Server>userdata
    conn.want &= ~(FUSE_CAP_AUTO_INVAL_DATA | FUSE_CAP_READDIRPLUS)
    conn.want |= FUSE_CAP_ASYNC_READ & conn.capable
    conn.want |= FUSE_CAP_ASYNC_DIO & conn.capable
    if server.splice_read:
        conn.want |= FUSE_CAP_SPLICE_READ & conn.capable
    else:
        conn.want &= ~FUSE_CAP_SPLICE_READ
    conn.want &= ~(FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE)
    if server.writeback_cache:
        conn.want |= FUSE_CAP_WRITEBACK_CACHE & conn.capable
    else:
        conn.want &= ~FUSE_CAP_WRITEBACK_CACHE
    conn.max_write = server.max_write
    conn.max_readahead = server.max_readahead
    if server.max_background:
        conn.max_background = server.max_background
        conn.congestion_threshold = server.max_background * 3 // 4


# -- the hot path: no GIL -------------------------------------------------------

cdef void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info *fi) noexcept nogil:
    cdef Handle *h = handle_of(fi)
    cdef Err err
    cdef unsigned char *buf
    cdef int64_t n
    cs_fuse_thread_init()
    if off < 0:
        fuse_reply_err(req, EINVAL)
        return
    if off >= h.size or size == 0:
        fuse_reply_buf(req, NULL, 0)
        return
    n = h.size - off
    if <uint64_t>n > size:
        n = <int64_t>size
    buf = cs_fuse_buffer(<size_t>n)
    if buf == NULL:
        fuse_reply_err(req, ENOMEM)
        return
    memset(&err, 0, sizeof(err))
    (<Engine>h.engine).io_pread(h.map, off, n, buf, &err)
    if err.kind:
        fuse_reply_err(req, (<Engine>h.engine).io_errno(&err))
    else:
        fuse_reply_buf(req, <const char *>buf, <size_t>n)


cdef bint reclaim(Handle *h) noexcept with gil:
    """After a full pool: make room (pending frees made durable); true to retry."""
    try:
        return bool((<object>h.volume)._reclaim())
    except BaseException as exc:
        failed(exc, "cowstore.fuse._cserver: Volume._reclaim")
        return False


cdef void op_write_buf(fuse_req_t req, fuse_ino_t ino, fuse_bufvec *bufv, off_t off,
                       fuse_file_info *fi) noexcept nogil:
    cdef Handle *h = handle_of(fi)
    cdef Err err
    cdef const unsigned char *data
    cdef unsigned char *buf
    cdef fuse_bufvec dst
    cdef size_t size = fuse_buf_size(bufv)
    cdef ssize_t copied
    cdef int64_t n
    cdef int attempt, code
    cs_fuse_thread_init()
    if h.readonly:
        fuse_reply_err(req, EROFS)
        return
    if off < 0:
        fuse_reply_err(req, EINVAL)
        return
    if size == 0:
        fuse_reply_write(req, 0)
        return
    if off >= h.size:
        fuse_reply_err(req, ENOSPC)
        return
    n = h.size - off
    if <uint64_t>n > size:
        n = <int64_t>size
    if bufv.count == 1 and bufv.idx == 0 and not (bufv.buf[0].flags & FUSE_BUF_IS_FD):
        data = <const unsigned char *>bufv.buf[0].mem + bufv.off
    else:
        buf = cs_fuse_buffer(<size_t>n)
        if buf == NULL:
            fuse_reply_err(req, ENOMEM)
            return
        memset(&dst, 0, sizeof(dst))
        dst.count = 1
        dst.buf[0].size = <size_t>n
        dst.buf[0].mem = buf
        copied = fuse_buf_copy(&dst, bufv, <fuse_buf_copy_flags>0)
        if copied < 0:
            fuse_reply_err(req, <int>-copied)
            return
        n = copied
        data = buf
    for attempt in range(2):
        memset(&err, 0, sizeof(err))
        (<Engine>h.engine).io_pwrite(h.map, off, n, data, &err)
        code = (<Engine>h.engine).io_errno(&err)
        if code != ENOSPC or attempt or not reclaim(h):
            break
    if code:
        fuse_reply_err(req, code)
    else:
        fuse_reply_write(req, <size_t>n)


# -- everything else: the namespace, with the GIL ------------------------------------

cdef void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept with gil:
    server = server_of(req)
    try:
        attr = server.namespace.lookup(parent, <bytes>name)
        reply_entry(req, attr, server.attr_timeout)
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: lookup"))


cdef void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    server = server_of(req)
    try:
        reply_attr(req, server.namespace.getattr(ino), server.attr_timeout)
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: getattr"))


cdef void op_setattr(fuse_req_t req, fuse_ino_t ino, struct_stat *attr, int to_set,
                     fuse_file_info *fi) noexcept with gil:
    server = server_of(req)
    try:
        changed = server.namespace.setattr(
            ino,
            attr.st_size if to_set & FUSE_SET_ATTR_SIZE else None,
            mode=attr.st_mode if to_set & FUSE_SET_ATTR_MODE else None,
            uid=attr.st_uid if to_set & FUSE_SET_ATTR_UID else None,
            gid=attr.st_gid if to_set & FUSE_SET_ATTR_GID else None,
        )
        reply_attr(req, changed, server.attr_timeout)
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: setattr"))


cdef void op_access(fuse_req_t req, fuse_ino_t ino, int mask) noexcept with gil:
    server = server_of(req)
    try:
        attr = server.namespace.getattr(ino)
        reply_err(req, EACCES if mask & W_OK and not attr.mode & 0o200 else 0)
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: access"))


cdef void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    cdef Handle *h
    cdef VolumeBase base
    cdef int rc
    cs_fuse_thread_init()
    server = server_of(req)
    try:
        volume = server.namespace.open(ino, fi.flags)
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: open"))
        return
    h = <Handle *>calloc(1, sizeof(Handle))
    if h == NULL:
        volume.close()
        reply_err(req, ENOMEM)
        return
    base = <VolumeBase?>volume
    h.volume = <void *>volume
    h.engine = <void *>base._engine
    h.map = base._map
    h.size = base._size
    h.readonly = base._readonly
    server._files[<size_t>h] = volume
    fi.fh = <uint64_t><size_t>h
    # A read-only snapshot never changes: its cached pages stay valid across opens.
    fi.keep_cache = h.readonly
    fi.direct_io = server.direct_io and not h.readonly
    with nogil:
        rc = fuse_reply_open(req, fi)
    if rc != 0:
        release_handle(server, h)


cdef void release_handle(Server server, Handle *h) noexcept:
    volume = server._files.pop(<size_t>h, None)
    free(h)
    if volume is not None:
        try:
            volume.close()
        except BaseException as exc:
            failed(exc, "cowstore.fuse._cserver: Volume.close")


cdef void op_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    release_handle(server_of(req), handle_of(fi))
    reply_err(req, 0)


cdef void op_flush(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept nogil:
    fuse_reply_err(req, 0)


cdef void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info *fi) noexcept with gil:
    cdef Handle *h = handle_of(fi)
    cs_fuse_thread_init()
    try:
        server_of(req).namespace.fsync(<object>h.volume)
        reply_err(req, 0)
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: fsync"))


cdef void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info *fi) noexcept with gil:
    cdef Handle *h = handle_of(fi)
    try:
        pos = server_of(req).namespace.seek(<object>h.volume, off, whence)
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: lseek"))
        return
    cdef off_t found = pos
    with nogil:
        fuse_reply_lseek(req, found)


cdef void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                       fuse_file_info *fi) noexcept with gil:
    cdef Handle *h = handle_of(fi)
    try:
        server_of(req).namespace.allocate(<object>h.volume, mode, offset, length)
        reply_err(req, 0)
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: fallocate"))


cdef void op_statfs(fuse_req_t req, fuse_ino_t ino) noexcept with gil:
    cdef statvfs st
    memset(&st, 0, sizeof(st))
    try:
        bsize, blocks, bfree, bavail, files, ffree, namemax = server_of(req).namespace.statfs()
        st.f_bsize = st.f_frsize = bsize
        st.f_blocks = blocks
        st.f_bfree = bfree
        st.f_bavail = bavail
        st.f_files = files
        st.f_ffree = st.f_favail = ffree
        st.f_namemax = namemax
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: statfs"))
        return
    with nogil:
        fuse_reply_statfs(req, &st)


# -- the directory: the mount point -----------------------------------------------------

cdef void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    """The listing is taken once, at opendir, so that READDIR at any offset sees one list."""
    cdef int rc
    server = server_of(req)
    try:
        if ino != _ROOT:
            server.namespace.getattr(ino)
            reply_err(req, ENOTDIR)
            return
        root = server.namespace.root()
        entries = [(b".", root.ino, root.mode), (b"..", root.ino, root.mode)]
        entries += [(name, attr.ino, attr.mode) for name, attr in server.namespace.listdir()]
    except BaseException as exc:
        reply_err(req, failed(exc, "cowstore.fuse._cserver: opendir"))
        return
    key = id(entries)
    server._dirs[key] = entries
    fi.fh = key
    with nogil:
        rc = fuse_reply_open(req, fi)
    if rc != 0:
        del server._dirs[key]


cdef void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info *fi) noexcept with gil:
    cdef char *buf
    cdef size_t used = 0, step
    cdef struct_stat st
    cdef Py_ssize_t i
    entries = server_of(req)._dirs.get(fi.fh)
    if entries is None:
        reply_err(req, EIO)
        return
    buf = <char *>malloc(size if size else 1)
    if buf == NULL:
        reply_err(req, ENOMEM)
        return
    memset(&st, 0, sizeof(st))
    i = off if off > 0 else 0
    while i < len(entries):
        name, ino_i, mode = entries[i]
        st.st_ino = ino_i
        st.st_mode = mode & S_IFMT
        step = fuse_add_direntry(req, buf + used, size - used, name, &st, i + 1)
        if step > size - used:
            break
        used += step
        i += 1
    with nogil:
        fuse_reply_buf(req, buf, used)
    free(buf)


cdef void op_releasedir(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept with gil:
    server_of(req)._dirs.pop(fi.fh, None)
    reply_err(req, 0)


# -- what changes the directory: refused --------------------------------------------------

cdef void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev) noexcept nogil:
    fuse_reply_err(req, EPERM)


cdef void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) noexcept nogil:
    fuse_reply_err(req, EPERM)


cdef void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept nogil:
    fuse_reply_err(req, EPERM)


cdef void op_symlink(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name) noexcept nogil:
    fuse_reply_err(req, EPERM)


cdef void op_rename(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                    const char *newname, unsigned int flags) noexcept nogil:
    fuse_reply_err(req, EPERM)


cdef void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname) noexcept nogil:
    fuse_reply_err(req, EPERM)


cdef void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                    fuse_file_info *fi) noexcept nogil:
    fuse_reply_err(req, EPERM)


cdef void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
                      int flags) noexcept nogil:
    fuse_reply_err(req, EPERM)


cdef void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name) noexcept nogil:
    fuse_reply_err(req, EPERM)


# -- extended attributes: a file has none ---------------------------------------------------
# (ENODATA and an empty list rather than ENOSYS, which the kernel turns into EOPNOTSUPP:
# `cp -a`, `ls` and tar ask, and "no attributes" is the true answer.)

cdef void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) noexcept nogil:
    fuse_reply_err(req, ENODATA)


cdef void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) noexcept nogil:
    if size == 0:
        fuse_reply_xattr(req, 0)
    else:
        fuse_reply_buf(req, NULL, 0)


cdef fuse_lowlevel_ops OPS
memset(&OPS, 0, sizeof(OPS))
OPS.init = op_init
OPS.lookup = op_lookup
OPS.getattr = op_getattr
OPS.setattr = op_setattr
OPS.access = op_access
OPS.open = op_open
OPS.read = op_read
OPS.write_buf = op_write_buf
OPS.flush = op_flush
OPS.release = op_release
OPS.fsync = op_fsync
OPS.lseek = op_lseek
OPS.fallocate = op_fallocate
OPS.statfs = op_statfs
OPS.opendir = op_opendir
OPS.readdir = op_readdir
OPS.releasedir = op_releasedir
OPS.mknod = op_mknod
OPS.mkdir = op_mkdir
OPS.unlink = op_unlink
OPS.rmdir = op_unlink
OPS.symlink = op_symlink
OPS.rename = op_rename
OPS.link = op_link
OPS.create = op_create
OPS.setxattr = op_setxattr
OPS.removexattr = op_removexattr
OPS.getxattr = op_getxattr
OPS.listxattr = op_listxattr


cdef class Server:
    """Serves one FUSE connection (a /dev/fuse descriptor) for a namespace, with libfuse."""

    def __init__(self, namespace, int fd, *, int threads, int max_write):
        """Take the descriptor: from here on the server closes it (once `run` is done, or
        when the server goes unrun); if this raises, the caller still owns it."""
        cdef fuse_args args
        cdef char *argv[2]
        cdef int rc
        if self.se != NULL:
            raise RuntimeError("a Server is initialised once")
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if max_write < 4096:
            raise ValueError(f"max_write must be at least 4096, not {max_write}")
        os.fstat(fd)
        tuning = dict(TUNING)
        self.namespace = namespace
        self._files = {}
        self._dirs = {}
        self.threads = threads
        self.max_write = max_write
        self.clone_fd = tuning["clone_fd"]
        self.direct_io = tuning["direct_io"]
        self.splice_read = tuning["splice_read"]
        self.writeback_cache = tuning["writeback_cache"]
        self.max_readahead = tuning["max_readahead"]
        self.max_background = tuning["max_background"]
        self.attr_timeout = ATTR_TIMEOUT
        argv[0] = b"cowstore"
        argv[1] = NULL
        args.argc = 1
        args.argv = argv
        args.allocated = 0
        self.se = fuse_session_new(&args, &OPS, sizeof(OPS), <void *>self)
        if self.se == NULL:
            raise OSError(EIO, "libfuse could not create a session")
        rc = cs_fuse_session_fd(self.se, fd)
        if rc != 0:
            fuse_session_destroy(self.se)   # it holds no descriptor yet: fd stays the caller's
            self.se = NULL
            raise OSError(-rc, f"libfuse refused the descriptor {fd}")

    def run(self):
        """Serve until the kernel ends the connection; raises OSError on any other end."""
        cdef fuse_loop_config *config
        cdef int rc
        if self.se == NULL:
            raise RuntimeError("the server has run already")
        if self.running:
            raise RuntimeError("the server is running")
        config = fuse_loop_cfg_create()
        if config == NULL:
            raise MemoryError()
        fuse_loop_cfg_set_max_threads(config, self.threads)
        fuse_loop_cfg_set_idle_threads(config, self.threads)
        fuse_loop_cfg_set_clone_fd(config, self.clone_fd)
        self.running = True
        try:
            with nogil:
                rc = fuse_session_loop_mt(self.se, config)
        finally:
            self.running = False
            fuse_loop_cfg_destroy(config)
            self._finish()
        if rc < 0:
            raise OSError(-rc, f"the FUSE request loop failed: {os.strerror(-rc)}")
        if rc > 0:
            raise OSError(EIO, f"the FUSE request loop ended on signal {rc}")

    cdef void _finish(self) noexcept:
        """Close the session (and with it the descriptor) and every file the kernel left open."""
        cdef fuse_session *se = self.se
        self.se = NULL
        if se != NULL:
            with nogil:
                fuse_session_destroy(se)
        for address in list(self._files):
            release_handle(self, <Handle *><size_t>address)
        self._dirs.clear()

    def __dealloc__(self):
        if self.se != NULL:
            fuse_session_destroy(self.se)
            self.se = NULL
        for address in self._files or ():
            free(<Handle *><size_t>address)
