/* libfuse 3's low-level API at the version cowstore.fuse._cserver is written for, and the
 * per-thread state of its worker threads (libfuse creates them; the server sees them only
 * when they call it). */
#ifndef CS_FUSE_H
#define CS_FUSE_H

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

static pthread_key_t cs_fuse_buffer_key;
static pthread_once_t cs_fuse_buffer_once = PTHREAD_ONCE_INIT;
static __thread unsigned char *cs_fuse_buffer_mem;
static __thread size_t cs_fuse_buffer_len;
static __thread int cs_fuse_thread_ready;

static void cs_fuse_buffer_key_init(void)
{
    pthread_key_create(&cs_fuse_buffer_key, free);
}

/* Called by each request that may allocate or write: the first call in a thread marks it an
 * I/O flusher (PR_SET_IO_FLUSHER, best effort): it serves the backing file of loop devices,
 * so its own memory allocations must not wait for writeback to that file. */
static inline void cs_fuse_thread_init(void)
{
    if (!cs_fuse_thread_ready) {
        cs_fuse_thread_ready = 1;
        prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0);
    }
}

/* This thread's I/O buffer of at least `n` bytes (NULL: out of memory), freed when the
 * thread exits. */
static inline unsigned char *cs_fuse_buffer(size_t n)
{
    unsigned char *mem;
    if (cs_fuse_buffer_len >= n)
        return cs_fuse_buffer_mem;
    pthread_once(&cs_fuse_buffer_once, cs_fuse_buffer_key_init);
    mem = malloc(n);
    if (mem == NULL)
        return NULL;
    free(cs_fuse_buffer_mem);
    cs_fuse_buffer_mem = mem;
    cs_fuse_buffer_len = n;
    pthread_setspecific(cs_fuse_buffer_key, mem);
    return mem;
}

/* The session's I/O: plain read and writev on the /dev/fuse descriptors, except that the
 * reply to INIT asks for FUSE_DIRECT_IO_ALLOW_MMAP when the kernel offers it. Without it the
 * kernel refuses shared mappings of a direct-I/O file (an active snapshot's) with ENODEV, and
 * libfuse 3.14 cannot ask for it (3.16 can: FUSE_CAP_DIRECT_IO_ALLOW_MMAP). A worker thread
 * reads a request and answers it before it reads the next, so the INIT a thread read is
 * the one whose reply it writes next: the state is per thread.
 *
 * Offsets are the kernel's (linux/fuse.h): fuse_in_header is 40 bytes (opcode at 4, unique
 * at 8), fuse_init_in has flags at 12 and flags2 at 16; fuse_out_header is 16 bytes (error
 * at 4, unique at 8), fuse_init_out has flags at 12 and flags2 at 32. */
#define CS_FUSE_INIT 26
#define CS_FUSE_IN_HEADER 40
#define CS_FUSE_OUT_HEADER 16
#define CS_FUSE_INIT_EXT (1u << 30)
#define CS_FUSE_DIRECT_IO_ALLOW_MMAP2 (1u << (36 - 32)) /* in flags2 */

static __thread int cs_fuse_init_pending;
static __thread uint64_t cs_fuse_init_unique;
static __thread uint32_t cs_fuse_init_flags2;

static ssize_t cs_fuse_read(int fd, void *buf, size_t len, void *userdata)
{
    const unsigned char *in = buf;
    ssize_t n = read(fd, buf, len);
    uint32_t opcode, flags, flags2 = 0;
    (void)userdata;
    if (n < CS_FUSE_IN_HEADER + 16)
        return n;
    memcpy(&opcode, in + 4, 4);
    if (opcode != CS_FUSE_INIT)
        return n;
    memcpy(&cs_fuse_init_unique, in + 8, 8);
    memcpy(&flags, in + CS_FUSE_IN_HEADER + 12, 4);
    if (flags & CS_FUSE_INIT_EXT && n >= CS_FUSE_IN_HEADER + 20)
        memcpy(&flags2, in + CS_FUSE_IN_HEADER + 16, 4);
    cs_fuse_init_flags2 = flags2;
    cs_fuse_init_pending = 1;
    return n;
}

static ssize_t cs_fuse_writev(int fd, struct iovec *iov, int count, void *userdata)
{
    unsigned char *out;
    uint64_t unique;
    int32_t error;
    uint32_t flags, flags2;
    (void)userdata;
    if (cs_fuse_init_pending && count >= 2 && iov[0].iov_len == CS_FUSE_OUT_HEADER && iov[1].iov_len >= 36) {
        memcpy(&error, (unsigned char *)iov[0].iov_base + 4, 4);
        memcpy(&unique, (unsigned char *)iov[0].iov_base + 8, 8);
        if (unique == cs_fuse_init_unique) {
            cs_fuse_init_pending = 0;
            if (error == 0 && cs_fuse_init_flags2 & CS_FUSE_DIRECT_IO_ALLOW_MMAP2) {
                out = iov[1].iov_base;
                memcpy(&flags, out + 12, 4);
                memcpy(&flags2, out + 32, 4);
                flags |= CS_FUSE_INIT_EXT;
                flags2 |= CS_FUSE_DIRECT_IO_ALLOW_MMAP2;
                memcpy(out + 12, &flags, 4);
                memcpy(out + 32, &flags2, 4);
            }
        }
    }
    return writev(fd, iov, count);
}

/* Serve the already-mounted /dev/fuse descriptor `fd` (the session closes it when destroyed);
 * 0, or -errno with `fd` still the caller's. */
static inline int cs_fuse_session_fd(struct fuse_session *se, int fd)
{
    static const struct fuse_custom_io io = {.writev = cs_fuse_writev, .read = cs_fuse_read};
    return fuse_session_custom_io(se, &io, fd);
}

#endif
