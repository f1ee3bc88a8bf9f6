# cython: language_level=3
"""Declarations of `cowstore.fuse._cserver`: the part of libfuse 3's low-level API it uses
(ext/include/cs_fuse.h pins FUSE_USE_VERSION), and its Server class."""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from posix.stat cimport struct_stat
from posix.types cimport dev_t, mode_t, off_t

from cowstore.engines._cengine cimport Key


cdef extern from "<sys/statvfs.h>" nogil:
    cdef struct statvfs:
        unsigned long f_bsize
        unsigned long f_frsize
        unsigned long f_blocks
        unsigned long f_bfree
        unsigned long f_bavail
        unsigned long f_files
        unsigned long f_ffree
        unsigned long f_favail
        unsigned long f_namemax


cdef extern from "cs_fuse.h" nogil:
    ctypedef uint64_t fuse_ino_t
    ctypedef struct fuse_req:
        pass
    ctypedef fuse_req *fuse_req_t
    cdef struct fuse_session:
        pass
    cdef struct fuse_args:
        int argc
        char **argv
        int allocated
    cdef struct fuse_loop_config:
        pass

    cdef struct fuse_file_info:
        int flags
        unsigned int writepage
        unsigned int direct_io
        unsigned int keep_cache
        unsigned int nonseekable
        unsigned int noflush
        uint64_t fh

    cdef struct fuse_conn_info:
        unsigned proto_major
        unsigned proto_minor
        unsigned max_write
        unsigned max_read
        unsigned max_readahead
        unsigned capable
        unsigned want
        unsigned max_background
        unsigned congestion_threshold
        unsigned time_gran

    cdef struct fuse_entry_param:
        fuse_ino_t ino
        uint64_t generation
        struct_stat attr
        double attr_timeout
        double entry_timeout

    enum fuse_buf_flags:
        FUSE_BUF_IS_FD
        FUSE_BUF_FD_SEEK
        FUSE_BUF_FD_RETRY
    enum fuse_buf_copy_flags:
        FUSE_BUF_NO_SPLICE
    cdef struct fuse_buf:
        size_t size
        fuse_buf_flags flags
        void *mem
        int fd
        off_t pos
    cdef struct fuse_bufvec:
        size_t count
        size_t idx
        size_t off
        fuse_buf buf[1]

    enum:
        FUSE_CAP_ASYNC_READ
        FUSE_CAP_SPLICE_WRITE
        FUSE_CAP_SPLICE_MOVE
        FUSE_CAP_SPLICE_READ
        FUSE_CAP_AUTO_INVAL_DATA
        FUSE_CAP_READDIRPLUS
        FUSE_CAP_ASYNC_DIO
        FUSE_CAP_WRITEBACK_CACHE
        FUSE_CAP_HANDLE_KILLPRIV
        FUSE_CAP_EXPLICIT_INVAL_DATA
        FUSE_SET_ATTR_MODE
        FUSE_SET_ATTR_UID
        FUSE_SET_ATTR_GID
        FUSE_SET_ATTR_SIZE

    cdef struct fuse_lowlevel_ops:
        void (*init)(void *userdata, fuse_conn_info *conn) noexcept nogil
        void (*lookup)(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept nogil
        void (*getattr)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept nogil
        void (*setattr)(fuse_req_t req, fuse_ino_t ino, struct_stat *attr, int to_set,
                        fuse_file_info *fi) noexcept nogil
        void (*mknod)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev) noexcept nogil
        void (*mkdir)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode) noexcept nogil
        void (*unlink)(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept nogil
        void (*rmdir)(fuse_req_t req, fuse_ino_t parent, const char *name) noexcept nogil
        void (*symlink)(fuse_req_t req, const char *link, fuse_ino_t parent, const char *name) noexcept nogil
        void (*rename)(fuse_req_t req, fuse_ino_t parent, const char *name, fuse_ino_t newparent,
                       const char *newname, unsigned int flags) noexcept nogil
        void (*link)(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *newname) noexcept nogil
        void (*open)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept nogil
        void (*read)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info *fi) noexcept nogil
        void (*flush)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept nogil
        void (*release)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept nogil
        void (*fsync)(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info *fi) noexcept nogil
        void (*opendir)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept nogil
        void (*readdir)(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info *fi) noexcept nogil
        void (*releasedir)(fuse_req_t req, fuse_ino_t ino, fuse_file_info *fi) noexcept nogil
        void (*statfs)(fuse_req_t req, fuse_ino_t ino) noexcept nogil
        void (*setxattr)(fuse_req_t req, fuse_ino_t ino, const char *name, const char *value, size_t size,
                         int flags) noexcept nogil
        void (*getxattr)(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size) noexcept nogil
        void (*listxattr)(fuse_req_t req, fuse_ino_t ino, size_t size) noexcept nogil
        void (*removexattr)(fuse_req_t req, fuse_ino_t ino, const char *name) noexcept nogil
        void (*access)(fuse_req_t req, fuse_ino_t ino, int mask) noexcept nogil
        void (*create)(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                       fuse_file_info *fi) noexcept nogil
        void (*write_buf)(fuse_req_t req, fuse_ino_t ino, fuse_bufvec *bufv, off_t off,
                          fuse_file_info *fi) noexcept nogil
        void (*fallocate)(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                          fuse_file_info *fi) noexcept nogil
        void (*lseek)(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info *fi) noexcept nogil

    fuse_session *fuse_session_new(fuse_args *args, const fuse_lowlevel_ops *op, size_t op_size, void *userdata)
    void fuse_session_destroy(fuse_session *se)
    int fuse_session_loop_mt(fuse_session *se, fuse_loop_config *config)
    fuse_loop_config *fuse_loop_cfg_create()
    void fuse_loop_cfg_destroy(fuse_loop_config *config)
    void fuse_loop_cfg_set_idle_threads(fuse_loop_config *config, unsigned int value)
    int fuse_loop_cfg_set_max_threads(fuse_loop_config *config, unsigned int value)
    void fuse_loop_cfg_set_clone_fd(fuse_loop_config *config, unsigned int value)

    void *fuse_req_userdata(fuse_req_t req)
    int fuse_reply_err(fuse_req_t req, int err)
    void fuse_reply_none(fuse_req_t req)
    int fuse_reply_entry(fuse_req_t req, const fuse_entry_param *e)
    int fuse_reply_attr(fuse_req_t req, const struct_stat *attr, double attr_timeout)
    int fuse_reply_open(fuse_req_t req, const fuse_file_info *fi)
    int fuse_reply_write(fuse_req_t req, size_t count)
    int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size)
    int fuse_reply_xattr(fuse_req_t req, size_t count)
    int fuse_reply_statfs(fuse_req_t req, const statvfs *stbuf)
    int fuse_reply_lseek(fuse_req_t req, off_t off)
    size_t fuse_add_direntry(fuse_req_t req, char *buf, size_t bufsize, const char *name,
                             const struct_stat *stbuf, off_t off)
    size_t fuse_buf_size(const fuse_bufvec *bufv)
    ssize_t fuse_buf_copy(fuse_bufvec *dst, fuse_bufvec *src, fuse_buf_copy_flags flags)

    void cs_fuse_thread_init()
    unsigned char *cs_fuse_buffer(size_t n)
    int cs_fuse_session_fd(fuse_session *se, int fd)


# An open file's state, in fi->fh: what a read or a write needs, without the GIL.
cdef struct Handle:
    void *volume        # the Volume; Server._files holds it (by this handle's address)
    void *engine        # its Engine, borrowed through the volume
    Key map
    int64_t size
    bint readonly


cdef class Server:
    cdef fuse_session *se
    cdef readonly object namespace
    cdef dict _files    # Handle address -> Volume, every file open
    cdef dict _dirs     # fi->fh of an open directory -> its listing
    cdef unsigned threads
    cdef unsigned max_write
    cdef bint clone_fd
    cdef bint direct_io
    cdef bint splice_read
    cdef bint writeback_cache
    cdef unsigned max_readahead
    cdef unsigned max_background
    cdef double attr_timeout
    cdef bint running

    cdef void _finish(self) noexcept
