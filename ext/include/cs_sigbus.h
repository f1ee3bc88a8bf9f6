/* SIGBUS guard for copies through a mapping of the data file.

   Reads copy from a mapping of the data file. Should the file shrink under us (someone
   else truncated it despite the lock) or the disk fail, the copy faults with SIGBUS; the
   handler turns that fault into an error return instead of the end of the process. A
   SIGBUS outside a guarded copy goes to the handler that was there before. */
#ifndef COWSTORE_CS_SIGBUS_H
#define COWSTORE_CS_SIGBUS_H

#include <setjmp.h>
#include <signal.h>
#include <string.h>

static __thread sigjmp_buf *volatile cs_bus_jump;
static struct sigaction cs_bus_previous;

static void cs_bus_handler(int sig, siginfo_t *info, void *context) {
    sigjmp_buf *jump = cs_bus_jump;
    if (jump != NULL) {
        cs_bus_jump = NULL;
        siglongjmp(*jump, 1);
    }
    if (cs_bus_previous.sa_flags & SA_SIGINFO) {
        cs_bus_previous.sa_sigaction(sig, info, context);
    } else if (cs_bus_previous.sa_handler != SIG_DFL && cs_bus_previous.sa_handler != SIG_IGN) {
        cs_bus_previous.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

/* Puts the handler in place unless it is already; 0 on success. Called whenever an
   engine maps a file, since others (Python's faulthandler) may have replaced it. */
static int cs_bus_guard_install(void) {
    struct sigaction action, current;
    if (sigaction(SIGBUS, NULL, &current) != 0) return -1;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == cs_bus_handler) return 0;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = cs_bus_handler;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGBUS, &action, &cs_bus_previous);
}

/* memcpy that returns -1 instead of dying when the source or destination faults. */
static int cs_guarded_copy(void *dst, const void *src, size_t n) {
    sigjmp_buf jump;
    if (sigsetjmp(jump, 0)) return -1;
    cs_bus_jump = &jump;
    memcpy(dst, src, n);
    cs_bus_jump = NULL;
    return 0;
}

#endif
