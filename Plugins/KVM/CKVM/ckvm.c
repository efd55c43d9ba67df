/* ckvm.c - non-variadic ioctl(2) and the kick signal for the KVM plugin. */
#include "ckvm.h"

#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>

int ckvm_ioctl(int fd, unsigned long req, void *arg) { return ioctl(fd, req, arg); }
int ckvm_ioctl_int(int fd, unsigned long req, unsigned long arg) { return ioctl(fd, req, arg); }

static int kick_signal;
static pthread_once_t kick_once = PTHREAD_ONCE_INIT;

static void kick_handler(int sig) { (void)sig; }

static void kick_install(void) {
    /* A real-time signal a process is unlikely to use for anything else (QEMU uses SIGUSR1). */
    kick_signal = SIGRTMIN + 5;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN must return EINTR */
    sigaction(kick_signal, &sa, NULL);
}

int ckvm_kick_signal_install(void) {
    pthread_once(&kick_once, kick_install);
    return kick_signal;
}

int ckvm_kick_thread(pthread_t thread) { return pthread_kill(thread, ckvm_kick_signal_install()); }

static __thread const void *current_host;
void ckvm_set_current_host(const void *host) { current_host = host; }
const void *ckvm_current_host(void) { return current_host; }
