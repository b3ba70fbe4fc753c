"""A multiprocessing Pool whose workers each leak a known number of 1 MiB C-heap blocks
(libc malloc through ctypes); the parent leaks nothing. For pyleak's follow tests.

Usage: py_pool_follow.py METHOD OUT [--wait FILE]
  METHOD: the start method, fork or spawn;
  OUT: where the parent writes {"parent": PID, "leaked": {"PID": BYTES, ...}}, what each
  worker leaked at the leak line;
  --wait FILE: wait for FILE to exist before making the pool (to attach first).
Prints "done" once the workers have exited.

The workers wait a second for their first task: pyleak attaches a new process's probes
tens of milliseconds after its fork or exec, and the leak must come after that.
"""
import ctypes
import json
import multiprocessing
import os
import sys
import time

BLOCK = 1 << 20
KEEP = []


def leak_blocks(n):
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    for _ in range(n):
        KEEP.append(libc.malloc(BLOCK))  # LEAK LINE
    return os.getpid(), n * BLOCK


def main():
    method, out = sys.argv[1], sys.argv[2]
    opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))
    wait = opts.get("--wait")
    if wait:
        while not os.path.exists(wait):
            time.sleep(0.01)
    leaked = {}
    pool = multiprocessing.get_context(method).Pool(2)
    time.sleep(1.0)
    for pid, n in pool.map(leak_blocks, [3, 5, 2, 4], chunksize=1):
        leaked[str(pid)] = leaked.get(str(pid), 0) + n
    pool.close()
    pool.join()
    with open(out, "w") as f:
        json.dump({"parent": os.getpid(), "leaked": leaked}, f)
    print("done", flush=True)


if __name__ == "__main__":
    main()
