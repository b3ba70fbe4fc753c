/* A target that leaks a known amount, then meets a fault, for tests/tests/faults.rs.
 * Every mode calls leak_before_fault() first (wait: once FILE exists): 10 blocks of 1000
 * bytes, never freed.
 * Usage: faults segv | kill9 | exec PROGRAM ARGS... | fork N | wait FILE | grow MIB | many N
 *   segv: dereference NULL; kill9: raise(SIGKILL); exec: execv PROGRAM;
 *   fork N: N children, each mallocs 500 bytes and exits, all reaped, then exit 0;
 *   wait FILE: wait for FILE, print "faults: ready", pause (killed by the test);
 *   grow MIB: touch MIB mebibytes of malloc'd memory, 1 MiB at a time (the OOM killer's
 *   prey in a memory-limited cgroup);
 *   many N: N blocks of 16 bytes, all kept (more live blocks than pyleak's table and
 *   overflow map hold when the test shrinks the map). No stdio before the fault (its
 *   buffers malloc). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

void *kept[10]; /* not static: the allocations must stay */

__attribute__((noinline)) void leak_before_fault(void) {
    for (int i = 0; i < 10; i++) kept[i] = malloc(1000);
}

static void say(const char *s) { write(1, s, strlen(s)); }

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (strcmp(argv[1], "wait") == 0 && argc == 3) {
        while (access(argv[2], F_OK) != 0) usleep(10000);
        leak_before_fault();
        say("faults: ready\n");
        for (;;) pause();
    }
    leak_before_fault();
    if (strcmp(argv[1], "segv") == 0) {
        volatile int *p = 0;
        return *p;
    }
    if (strcmp(argv[1], "kill9") == 0) {
        raise(SIGKILL);
    }
    if (strcmp(argv[1], "exec") == 0 && argc >= 3) {
        execv(argv[2], argv + 2);
        return 127;
    }
    if (strcmp(argv[1], "fork") == 0 && argc == 3) {
        long n = atol(argv[2]);
        for (long i = 0; i < n; i++) {
            pid_t p = fork();
            if (p == 0) {
                void *volatile q = malloc(500);
                (void)q;
                _exit(0);
            }
        }
        while (wait(NULL) > 0) {}
        say("faults: children reaped\n");
        return 0;
    }
    if (strcmp(argv[1], "grow") == 0 && argc == 3) {
        long mib = atol(argv[2]);
        for (long i = 0; i < mib; i++) {
            char *p = malloc(1 << 20);
            if (!p) return 3;
            memset(p, 1, 1 << 20);
        }
        say("faults: grew\n");
        return 0;
    }
    if (strcmp(argv[1], "many") == 0 && argc == 3) {
        long n = atol(argv[2]);
        void **all = malloc(n * sizeof(void *));
        if (!all) return 3;
        for (long i = 0; i < n; i++) all[i] = malloc(16);
        say("faults: kept\n");
        return 0;
    }
    return 2;
}
