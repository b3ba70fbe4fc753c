"""Workloads for pyleak's leak analysis; each prints one JSON line of what it did.

    py_analysis.py registry   small objects kept in a registry, over ~3 s (a growing leak)
    py_analysis.py fragment   many small objects, most freed: arenas stay mapped
    py_analysis.py mmap       an anonymous mapping made on one line, touched on another
"""
import json
import mmap
import sys
import time

REGISTRY = []
KEEP = []


def leak_round(n):
    for _ in range(n):
        item = bytes(100)  # REGISTRY_LINE
        REGISTRY.append(item)


def registry():
    rounds, per_round = 30, 2000
    for _ in range(rounds):
        leak_round(per_round)
        time.sleep(0.1)
    return {"objects": rounds * per_round, "bytes": rounds * per_round * sys.getsizeof(bytes(100))}


def fragment():
    objs = [object() for _ in range(800_000)]  # FRAGMENT_LINE
    KEEP.extend(objs[::50])
    del objs
    time.sleep(1.0)
    return {"kept": len(KEEP)}


SIZE = 8 << 20


def touch(m, zeros):
    m[:] = zeros  # TOUCH_LINE


def mapping():
    zeros = bytes(SIZE)
    m = mmap.mmap(-1, SIZE)  # MMAP_LINE
    KEEP.append(m)
    touch(m, zeros)
    time.sleep(1.0)
    return {"bytes": SIZE}


if __name__ == "__main__":
    mode = sys.argv[1]
    result = {"registry": registry, "fragment": fragment, "mmap": mapping}[mode]()  # MAIN_LINE
    print(json.dumps(result), flush=True)
