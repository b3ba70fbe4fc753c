"""A block a thread made, dropped to a free list and took back at once, with no pymalloc
allocation between. Each step, one function makes a one-key dict (a new dict object, then
its keys table at the first insert) and drops it: both go to their free lists. Then another
function makes an empty dict (the object off the free list) and inserts one key (the keys
table off its free list) and keeps it. The making line holds nothing at the end; the
keeping lines hold N dicts: their objects at the `{}` line, their keys tables at the insert.
Prints one JSON line with the truth: the dicts kept, the bytes of one (object and keys
table) and of its object alone."""
import json
import sys
import time

N = 100000
ROUNDS = 20
KEPT = []


def make_and_drop(i):
    d = {"a": i}  # MAKE_LINE
    del d


def keep(i):
    d = {}  # KEEP_LINE
    d["k"] = i  # INSERT_LINE
    KEPT.append(d)


def main():
    for _ in range(ROUNDS):
        for i in range(N // ROUNDS):
            make_and_drop(i)
            keep(i)
        time.sleep(0.1)
    # An empty dict has no keys table of its own: its size is the object's.
    truth = {"kept": len(KEPT), "dict_bytes": sys.getsizeof(KEPT[0]), "object_bytes": sys.getsizeof({})}
    print(json.dumps(truth), flush=True)
    time.sleep(1.0)


main()
