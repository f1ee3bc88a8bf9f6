/* The engine's lock: a pthread rwlock in which writers do not starve behind readers, and a
   guard against a thread waiting for a lock it holds itself.

   The engine builds Python objects under its lock in a few calls (take_changes, take_free,
   map_directory, refcounts). An allocation there may run a finalizer that calls the same
   engine on the same thread: that call must fail, not deadlock. The guard is per thread,
   so it is read without the GIL and without a race. */
#ifndef COWSTORE_CS_RWLOCK_H
#define COWSTORE_CS_RWLOCK_H

#include <pthread.h>
#include <stddef.h>

static __thread const pthread_rwlock_t *cs_rwlock_python;

/* 0 when the lock is ready; -1 when it cannot be created. */
static int cs_rwlock_init(pthread_rwlock_t *lock) {
    pthread_rwlockattr_t attr;
    int rc;
    if (pthread_rwlockattr_init(&attr) != 0) return -1;
#if defined(__GLIBC__)
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
#endif
    rc = pthread_rwlock_init(lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    return rc == 0 ? 0 : -1;
}

/* Takes the lock, shared or exclusive, waiting for it: 0. -1 at once, without taking it,
   when this thread holds it to run Python code. */
static inline int cs_rwlock_take(pthread_rwlock_t *lock, int exclusive) {
    if (cs_rwlock_python == lock) return -1;
    if (exclusive) pthread_rwlock_wrlock(lock);
    else pthread_rwlock_rdlock(lock);
    return 0;
}

/* Takes the lock if it is free at once: 0; else (or when this thread holds it) -1. */
static inline int cs_rwlock_try(pthread_rwlock_t *lock, int exclusive) {
    if (cs_rwlock_python == lock) return -1;
    return (exclusive ? pthread_rwlock_trywrlock(lock) : pthread_rwlock_tryrdlock(lock)) == 0 ? 0 : -1;
}

/* The lock this thread holds while it runs Python code (NULL: none); returns the previous. */
static inline const pthread_rwlock_t *cs_rwlock_mark_python(const pthread_rwlock_t *lock) {
    const pthread_rwlock_t *previous = cs_rwlock_python;
    cs_rwlock_python = lock;
    return previous;
}

#endif
