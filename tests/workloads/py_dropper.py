"""Free-list hand-overs across window edges, launched: 60 rounds, each making and dropping
1 500 2-tuples in `dropper` (they go to the tuple free list), then keeping 1 500 2-tuples
in `keeper` (taken from that free list), then a short sleep. The keeper holds 90 000
tuples (5 040 000 bytes in pymalloc) at the end; the dropper holds none. Runs ~6 s."""
import time

KEPT = []


def dropper(n, x):
    tmp = [(x, x) for _ in range(n)]  # MARK:dropper
    del tmp


def keeper(n, x):
    KEPT.extend([(x, x) for _ in range(n)])  # MARK:keeper


x = object()
for _ in range(60):
    dropper(1500, x)
    keeper(1500, x)
    time.sleep(0.1)
print("done", flush=True)
