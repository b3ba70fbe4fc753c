"""Python allocations in bulk, for comparing CPython builds' pymalloc counts: per request a
str built by concatenation (one temporary freed at once), a dict and a list; half of them
kept, half freed. Usage: py_alloc_count.py [N]  (default 200000 requests)."""
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
KEEP = []


def request(i):
    s = str(i) + "-abc"
    d = {"key": s, "n": i, "pad": [i, i + 1, i + 2]}
    if i % 2 == 0:
        KEEP.append(d)


for i in range(N):
    request(i)
print(len(KEEP), flush=True)
