"""A leaking service with process churn, for `cargo xtask soak`: a pool of 4 worker
processes, each replaced after 50 tasks (multiprocessing's maxtasksperchild), serving
tasks forever. Each task keeps one 1000-byte bytes object in its worker (the leak) and
builds and drops some garbage (the churn). The parent only dispatches."""
import multiprocessing
import time

KEPT = []


def task(i):
    KEPT.append(bytes(1000))
    garbage = [str(j) * 10 for j in range(200)]
    del garbage
    time.sleep(0.01)
    return i


if __name__ == "__main__":
    with multiprocessing.Pool(4, maxtasksperchild=50) as pool:
        i = 0
        while True:
            pool.map(task, range(i, i + 40))
            i += 40
