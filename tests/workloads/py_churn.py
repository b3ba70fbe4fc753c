"""Churns memory without leaking: every round builds and drops request-sized objects
(small objects through pymalloc, 64 KiB buffers through malloc, a 2 MiB mmap through
malloc's mmap path). Nothing survives a round. Runs for about SECONDS seconds."""
import sys
import time

SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0


def one_round(i):
    objs = [(i, str(i), [i]) for _ in range(2000)]
    bufs = [bytearray(64 * 1024) for _ in range(16)]
    big = bytearray(2 * 1024 * 1024)
    big[::4096] = b"x" * len(big[::4096])
    return len(objs) + len(bufs) + len(big)


def main():
    end = time.monotonic() + SECONDS
    i = 0
    while time.monotonic() < end:
        one_round(i)
        i += 1
        time.sleep(0.005)
    print("churned %d rounds" % i, flush=True)


main()
