/* A shared library for pyleak's --native test, built at test time with frame pointers
 * (-O1 -fno-omit-frame-pointer): leak_outer() calls leak_inner() COUNT times, and each
 * leak_inner() mallocs SIZE bytes and keeps the block, so the malloc's stack is known:
 * leak_inner (the malloc's caller) under leak_outer under whoever called leak_outer. */
#include <stddef.h>
#include <stdlib.h>

#define MAX_KEPT 4096

/* Exported, so the compiler cannot drop the stores: the blocks stay reachable. */
void *leak_kept[MAX_KEPT];
int leak_kept_count;

__attribute__((noinline)) void *leak_inner(size_t size)
{
    void *p = malloc(size);
    if (p && leak_kept_count < MAX_KEPT)
        leak_kept[leak_kept_count++] = p;
    return p;
}

/* Returns how many blocks were allocated and kept. */
__attribute__((noinline)) int leak_outer(size_t size, int count)
{
    int kept = 0;
    for (int i = 0; i < count && i < MAX_KEPT; i++)
        kept += leak_inner(size) != NULL;
    return kept;
}
