"""Allocator retention, not a leak: THREADS threads each churn PER_THREAD bytes of
BUF-byte buffers (below malloc's mmap threshold, so each thread's own glibc arena serves
them), keep the last one and drop the rest. What stays live is THREADS buffers; what
stays resident is most of every thread's arena, because the kept buffer sits at the top
of its heap and glibc only gives a heap's top back. Prints one JSON line with the truth,
then waits HOLD seconds so the plateau is seen."""
import json
import sys
import threading
import time

THREADS = 8
PER_THREAD = 20 << 20
BUF = 48 << 10
HOLD = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0

kept = []
lock = threading.Lock()
start = threading.Barrier(THREADS)


def churn():
    start.wait()
    bufs = [bytearray(BUF) for _ in range(PER_THREAD // BUF)]  # CHURN_LINE
    with lock:
        kept.append(bufs[-1])
    del bufs


def main():
    threads = [threading.Thread(target=churn) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # bytearray(n) asks for n + 1 bytes (its trailing NUL).
    print(json.dumps({"kept": len(kept), "bytes": len(kept) * (BUF + 1)}), flush=True)
    time.sleep(HOLD)


main()
