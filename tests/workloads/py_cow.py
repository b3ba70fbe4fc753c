"""Copy-on-write after fork, for pyleak's follow tests: the parent builds a heap of
200,000 small lists, then forks children that allocate nothing of it but run gc.collect(),
which writes the GC header of every inherited list (a copy-on-write fault on every page
they lie on: the child's private resident memory grows by those pages).

Usage: py_cow.py OUT [--wait FILE [--heap-first]] [--leak]
  OUT: where the truth is appended, one JSON line per process:
    a child: {"child": PID, "how": "fork"|"multiprocessing", "private_dirty_growth": BYTES}
      (its /proc/self/smaps_rollup Private_Dirty after the COW LINE minus before it);
    the parent, last: {"parent": PID, "leaked": BYTES} (libc blocks it keeps at PARENT LEAK).
  --wait FILE: wait for FILE to exist before building the heap (to attach first);
  --heap-first: build the heap before waiting (pyleak attaches to a process whose heap
    it never saw made);
  --leak: each child also keeps 2 MiB of libc blocks at CHILD LEAK.
Once the children have exited, the parent collects too (its writes fault on every page
the forks write-protected, copying nothing), keeps its blocks and prints "done".

Each child waits a second first: pyleak attaches a new process's probes tens of
milliseconds after its fork, and the child's leak must come after that. It lives 1.5 s
after the collection, so that pages counted as its own would be old enough to be suspects.
"""
import ctypes
import gc
import json
import multiprocessing
import os
import sys
import time

BLOCK = 1 << 20
HEAP = None
KEEP = []
LIBC = ctypes.CDLL(None)
LIBC.malloc.restype = ctypes.c_void_p
LIBC.malloc.argtypes = [ctypes.c_size_t]


def private_dirty():
    """This process's private dirty bytes (smaps_rollup, kB)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Private_Dirty in /proc/self/smaps_rollup")


def make_private():
    gc.collect()  # COW LINE


def leak_blocks(n):
    for _ in range(n):
        KEEP.append(LIBC.malloc(BLOCK))  # CHILD LEAK


def child(out, how, leak):
    time.sleep(1.0)
    before = private_dirty()
    make_private()
    after = private_dirty()
    if leak:
        leak_blocks(2)
    line = {"child": os.getpid(), "how": how, "private_dirty_growth": after - before}
    with open(out, "a") as f:
        f.write(json.dumps(line) + "\n")
    time.sleep(1.5)


def main():
    out = sys.argv[1]
    opts = sys.argv[2:]
    leak = "--leak" in opts
    global HEAP
    if "--heap-first" in opts:
        HEAP = [[i] for i in range(200000)]
    if "--wait" in opts:
        wait = opts[opts.index("--wait") + 1]
        while not os.path.exists(wait):
            time.sleep(0.01)
    if HEAP is None:
        HEAP = [[i] for i in range(200000)]
    gc.collect()
    pid = os.fork()
    if pid == 0:
        child(out, "fork", leak)
        os._exit(0)
    os.waitpid(pid, 0)
    p = multiprocessing.get_context("fork").Process(
        target=child, args=(out, "multiprocessing", leak)
    )
    p.start()
    p.join()
    gc.collect()  # PARENT GC
    for _ in range(3):
        KEEP.append(LIBC.malloc(BLOCK))  # PARENT LEAK
    with open(out, "a") as f:
        f.write(json.dumps({"parent": os.getpid(), "leaked": 3 * BLOCK}) + "\n")
    print("done", flush=True)


if __name__ == "__main__":
    main()
