"""Freed dicts reused through CPython's free lists. Each step, a helper copies a small dict
COPIES times with dict.copy (a C function) and drops every copy at once, filling the dict
and dict-keys free lists (80 each); then another function keeps KEEP new small dicts,
which take their objects and keys tables from those free lists first. The copying line
holds nothing at the end; the keeping line holds STEPS * ROUNDS * KEEP dicts (each with
its keys table and two ints) and the list's item array. Prints one JSON line with the truth."""
import json
import sys
import time

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 30
ROUNDS = 20
COPIES = 100
KEEP = 100
TEMPLATE = {"id": 0, "v": 0}
KEPT = []


def copy_and_drop(d):
    copies = [d.copy() for _ in range(COPIES)]  # COPY_LINE
    del copies


def keep_dicts(base):
    for j in range(KEEP):
        KEPT.append({"id": base + j, "v": -j})  # KEEP_LINE


def main():
    n = 0
    for _ in range(STEPS):
        for _ in range(ROUNDS):
            copy_and_drop(TEMPLATE)
            keep_dicts(1000 + n)
            n += KEEP
        time.sleep(0.05)
    # The list's item array (allocated at the keeping line too).
    array_bytes = sys.getsizeof(KEPT) - sys.getsizeof([])
    print(
        json.dumps(
            {"kept": len(KEPT), "dict_bytes": sys.getsizeof(KEPT[0]), "array_bytes": array_bytes}
        ),
        flush=True,
    )
    time.sleep(1.0)


main()
