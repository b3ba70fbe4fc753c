"""Workloads for sampled pymalloc tracing, each with a known truth. Waits for the file given
as the second argument before working (so pyleak can attach first), works for a fixed
number of steps paced over a few seconds, prints `done` and then waits to be killed.

Usage: py_sampled.py MODE GO_FILE
  registry: keeps 480 000 entries (a 2-tuple and a str each) in a module-level dict.
  churn:    makes and drops ~50 MiB of small objects; keeps nothing.
  reuse:    one function makes and drops 2-tuples, another keeps 2-tuples, interleaved
            (the tuple free list hands the dropped ones to the keeper).
  threads:  two threads keep small objects from two functions (240 000 each).
  cache:    keeps 24 000 bytes objects of 600 bytes each (a request above pymalloc's
            512-byte threshold: malloc's block) in a module-level dict.
"""
import os
import sys
import threading
import time

REGISTRY = {}
KEPT = []
STEPS = 60
PER_STEP = 4000
# The registry runs twice as long: more windows, a steadier estimate on every CPython.
REGISTRY_STEPS = 120


def register(i):
    REGISTRY[i] = (i, "key-" + str(i))  # MARK:registry


def registry():
    n = 0
    for _ in range(REGISTRY_STEPS):
        for _ in range(PER_STEP):
            register(n)
            n += 1
        time.sleep(0.08)


def churn():
    for _ in range(STEPS):
        tmp = [("t%d" % j, j * 1.5) for j in range(PER_STEP * 3)]  # MARK:churn
        del tmp
        time.sleep(0.08)


def drop_pairs(n):
    for j in range(n):
        pair = (j, j + 1)  # MARK:drop
        del pair


def keep_pairs(base, n):
    for j in range(n):
        KEPT.append((base + j, -j))  # MARK:keep


def reuse():
    for step in range(STEPS):
        for _ in range(PER_STEP // 100):
            drop_pairs(100)
            keep_pairs(step * PER_STEP, 100)
        time.sleep(0.08)


def leak_a(out):
    for i in range(STEPS * PER_STEP):
        out.append(("a", i))  # MARK:thread_a
        if i % 2000 == 0:
            time.sleep(0.08)


def leak_b(out):
    for i in range(STEPS * PER_STEP):
        out.append(["b", i])  # MARK:thread_b
        if i % 2000 == 0:
            time.sleep(0.08)


def threads():
    a, b = [], []
    ta = threading.Thread(target=leak_a, args=(a,))
    tb = threading.Thread(target=leak_b, args=(b,))
    ta.start(); tb.start()
    ta.join(); tb.join()
    KEPT.extend([a, b])


CACHE = {}


def cache():
    for step in range(STEPS):
        for j in range(PER_STEP // 10):
            key = step * PER_STEP + j
            CACHE[key] = bytes(567)  # MARK:cache
        time.sleep(0.08)


def main():
    mode, go = sys.argv[1], sys.argv[2]
    while not os.path.exists(go):
        time.sleep(0.01)
    {"registry": registry, "churn": churn, "reuse": reuse, "threads": threads,
     "cache": cache}[mode]()
    print("done", flush=True)
    time.sleep(600)


main()
