/* libfuse 3's low-level API at the version cowstore.fuse._cserver is written for, and the
 * per-thread state of its worker threads (libfuse creates them; the server sees them only
 * when they call it). */
#ifndef CS_FUSE_H
#define CS_FUSE_H

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>

#include <pthread.h>
#include <stdlib.h>
#include <sys/prctl.h>

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

#endif
