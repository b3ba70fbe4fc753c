/* N malloc(64)/free pairs; prints the loop's own time in ns per pair (start-up and probe
 * attachment excluded). Built -O2; the pointer escapes through a volatile so the compiler
 * keeps every call. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

void *volatile sink;

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++) {
        sink = malloc(64);
        free(sink);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("ns_per_pair %.2f\n", ns / n);
    return 0;
}
