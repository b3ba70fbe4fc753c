"""A leaking service with process churn, for `cargo xtask soak`: a pool of 4 worker
processes (forked), each replaced after 50 tasks (multiprocessing's maxtasksperchild; a
task is a chunk of 3 calls of task()), serving tasks until the file STOP exists. Each call
keeps one 1000-byte bytes object in its worker (the leak: a 1033-byte block, above
pymalloc's 512-byte threshold, so malloc serves it and pyleak's libc layer counts it
exactly) and builds and drops some garbage (the churn). The parent only dispatches.

`soak_service.py [TRUTH STOP]`: each worker appends its truth to TRUTH when it exits, one
JSON line `{"pid": P, "kept": N, "bytes": B}` (N objects kept, B bytes allocated for them
at task()'s first line). The kept objects go into slots of a list made by the parent before
the workers fork, so keeping allocates nothing else at that line (appending would grow the
list's own block there). The parent creates the pool once GO (STOP's name + ".go") exists,
so that every worker is forked while pyleak traces. Once STOP exists the parent closes the
pool, waits for every worker to exit, then idles until killed (pyleak names the Python
frames of a worker that exited between two of its growth samples from the parent's memory,
which holds the same code objects)."""
import json
import multiprocessing
import multiprocessing.util
import os
import sys
import time

SLOTS = 256  # more than a worker's 50 chunks of at most 3 calls
KEPT = [None] * SLOTS
N = [0]


def task(i):
    KEPT[N[0] % SLOTS] = bytes(1000)
    N[0] += 1
    garbage = [str(j) * 10 for j in range(200)]
    del garbage
    time.sleep(0.01)
    return i


def write_truth(path):
    kept = min(N[0], SLOTS)
    line = json.dumps(
        {"pid": os.getpid(), "kept": kept, "bytes": kept * sys.getsizeof(bytes(1000))}
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, (line + "\n").encode())
    os.close(fd)


def start_worker(truth):
    if truth:
        # Run by multiprocessing's exit handler when the worker returns after its last task.
        multiprocessing.util.Finalize(None, write_truth, args=(truth,), exitpriority=10)


if __name__ == "__main__":
    truth, stop = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else (None, None)
    while stop and not os.path.exists(stop + ".go"):
        time.sleep(0.05)
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(4, initializer=start_worker, initargs=(truth,), maxtasksperchild=50)
    i = 0
    while not (stop and os.path.exists(stop)):
        pool.map(task, range(i, i + 40))
        i += 40
    pool.close()
    pool.join()
    while True:
        time.sleep(1)
