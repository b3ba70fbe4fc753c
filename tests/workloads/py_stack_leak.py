"""Leaks known Python objects at known lines, and records where, for pyleak's Python-stack
tests. Prints one JSON line: {"expected": {tag: [[name, line], ...root first]}, ...}.

Usage: py_stack_leak.py [--tracemalloc]
  --tracemalloc: also report tracemalloc's live bytes per leak line (for cross-checks).
"""
import json
import os
import sys
import threading
import traceback

KEEP = []
EXPECTED = {}
N = 400
SIZE = 10000


def mark(tag):
    """Remember the caller's stack (root first) under `tag`."""
    EXPECTED[tag] = [[f.name, f.lineno] for f in traceback.extract_stack()[:-1]]


def leak_bytearrays():
    for _ in range(N):
        KEEP.append(bytearray(SIZE)); mark("main")  # noqa: E702 (same line on purpose)


def thread_a_leak():
    for _ in range(N):
        KEEP.append(bytearray(SIZE)); mark("thread_a")  # noqa: E702


def thread_b_leak():
    for _ in range(N // 2):
        KEEP.append(bytearray(2 * SIZE)); mark("thread_b")  # noqa: E702


def lister(path):
    # opendir/readdir run with the GIL released; their malloc is attributed here.
    os.listdir(path); mark("gil_released")  # noqa: E702


def recurse(depth):
    if depth == 0:
        KEEP.append(bytearray(30 * SIZE)); mark("deep")  # noqa: E702
        return
    recurse(depth - 1)


def main():
    trace = "--tracemalloc" in sys.argv
    if trace:
        import tracemalloc
        tracemalloc.start(1)
    leak_bytearrays()
    ta = threading.Thread(target=thread_a_leak)
    tb = threading.Thread(target=thread_b_leak)
    ta.start(); tb.start(); ta.join(); tb.join()  # noqa: E702
    lister("/usr/lib")
    recurse(200)
    out = {"expected": EXPECTED, "file": os.path.abspath(__file__)}
    if trace:
        snap = tracemalloc.take_snapshot()
        per_line = {}
        for stat in snap.statistics("lineno"):
            frame = stat.traceback[0]
            per_line[frame.lineno] = per_line.get(frame.lineno, 0) + stat.size
        out["tracemalloc"] = {tag: per_line.get(stack[-1][1], 0) for tag, stack in EXPECTED.items()}
    print(json.dumps(out), flush=True)


main()
