/* A C program whose allocations are known to the byte, for pyleak's integration tests.
 *
 * Every allocator pyleak probes is called here with fixed sizes; the expected totals are in
 * tests/tests/c_workload.rs. No stdio (its buffers would malloc): output goes through write.
 * Built with -O0 and frame pointers (see tests/src/lib.rs) so that no call is optimised
 * away and each stack names the function below that allocated.
 * Usage: alloc_workload [--wait FILE]  (waits for FILE to exist before starting)
 *        alloc_workload --many N  (only many_blocks(N), below)
 *        alloc_workload --handoff N  (only handoff(N), below). */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

void *keep[64]; /* not static: the compiler must not drop the allocations */
int nkeep;

__attribute__((noinline)) void leak_malloc(void) {
    for (int i = 0; i < 10; i++) keep[nkeep++] = malloc(100);      /* 10 live, 1000 B */
    for (int i = 0; i < 5; i++) free(malloc(200));                 /* 5 allocs, 5 frees */
    free(NULL);                                                    /* ignored */
}

__attribute__((noinline)) void leak_calloc(void) {
    for (int i = 0; i < 3; i++) keep[nkeep++] = calloc(4, 25);     /* 3 live, 300 B */
}

__attribute__((noinline)) void leak_realloc(void) {
    void *p = malloc(64);                                          /* alloc 64 */
    p = realloc(p, 128);                                           /* free 64, alloc 128 */
    p = realloc(p, 100000);                                        /* free 128, alloc 100000 */
    keep[nkeep++] = p;                                             /* live 100000 */
    keep[nkeep++] = realloc(NULL, 50);                             /* alloc 50, live */
    void *q = malloc(70);                                          /* alloc 70 */
    q = realloc(q, 0);                                             /* glibc frees q, NULL */
    keep[nkeep++] = reallocarray(NULL, 10, 30);                    /* alloc 300, live */
}

__attribute__((noinline)) void leak_aligned(void) {
    void *p = NULL;
    if (posix_memalign(&p, 64, 1000) == 0) keep[nkeep++] = p;      /* 1000 live */
    keep[nkeep++] = aligned_alloc(64, 512);                        /* 512 live */
    keep[nkeep++] = memalign(32, 96);                              /* 96 live */
    keep[nkeep++] = valloc(5000);                                  /* 5000 live */
    keep[nkeep++] = pvalloc(5000);                                 /* 8192 live (page-rounded) */
}

__attribute__((noinline)) void touch(char *p, size_t len) {
    for (size_t off = 0; off < len; off += PAGE) p[off] = 1;
}

__attribute__((noinline)) void vm_partial(void) {
    char *p = mmap(NULL, 10 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    touch(p, 10 * PAGE);                                           /* 10 pages faulted */
    munmap(p + 2 * PAGE, 3 * PAGE);                                /* 7 pages stay */
}

__attribute__((noinline)) void vm_remap(void) {
    char *p = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    touch(p, 4 * PAGE);                                            /* 4 pages faulted */
    p = mremap(p, 4 * PAGE, 8 * PAGE, MREMAP_MAYMOVE);
    touch(p, 8 * PAGE);                                            /* 4 more pages */
}

__attribute__((noinline)) void vm_unmapped(void) {
    char *p = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    touch(p, 2 * PAGE);
    munmap(p, 2 * PAGE);                                           /* nothing stays */
}

/* N blocks of 24 bytes, then every other one freed: more blocks than pyleak's live table
 * has slots, so some go to its overflow map, and frees must find them in either. */
__attribute__((noinline)) void many_blocks(long n) {
    void **blocks = mmap(NULL, n * sizeof(void *), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (long i = 0; i < n; i++) blocks[i] = malloc(24);
    for (long i = 1; i < n; i += 2) free(blocks[i]);
}

/* Blocks allocated on one thread and freed on another: N blocks of 40 bytes handed from
 * main to a second thread through a ring, which frees all but every tenth. */
#define RING 1024
static void *ring[RING];
static volatile long produced, consumed;
static long handoff_n;
static void *kept[1 << 16];
static long nkept;

static void *consumer(void *arg) {
    (void)arg;
    for (long i = 0; i < handoff_n; i++) {
        while (__atomic_load_n(&produced, __ATOMIC_ACQUIRE) == i) {}
        void *p = ring[i % RING];
        if (i % 10 == 0) kept[nkept++] = p;
        else free(p);
        __atomic_store_n(&consumed, i + 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

__attribute__((noinline)) void handoff(long n) {
    pthread_t t;
    handoff_n = n;
    pthread_create(&t, NULL, consumer, NULL);
    for (long i = 0; i < n; i++) {
        while (i - __atomic_load_n(&consumed, __ATOMIC_ACQUIRE) >= RING) {}
        ring[i % RING] = malloc(40);
        __atomic_store_n(&produced, i + 1, __ATOMIC_RELEASE);
    }
    pthread_join(t, NULL);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--many") == 0) {
        many_blocks(atol(argv[2]));
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "--handoff") == 0) {
        handoff(atol(argv[2]));
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "--wait") == 0) {
        while (access(argv[2], F_OK) != 0) usleep(10000);
    }
    leak_malloc();
    leak_calloc();
    leak_realloc();
    leak_aligned();
    vm_partial();
    vm_remap();
    vm_unmapped();
    static const char done[] = "alloc_workload: done\n";
    write(1, done, sizeof done - 1);
    if (argc == 3 && strcmp(argv[1], "--wait") == 0) {
        pause(); /* attached mode: stay alive until pyleak has read its state */
    }
    return 0;
}
