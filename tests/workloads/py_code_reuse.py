"""Code objects freed and replaced at the same addresses by code objects of other lines.

Phase A compiles N functions whose `def` is line 11 of "gen_a.py"; each, called once,
keeps K bytearrays of SIZE bytes (a malloc of SIZE + 1 each, at line 13). Not line 1:
every module's code object starts there, and a function's code object taking the
address of an imported module's (freed once the import ran) would look like it: the
first line is the only signature the kernel keeps. They stay alive HOLD seconds (pyleak
names their frames meanwhile), then are dropped. Phase B compiles N
functions of the same shape whose `def` is line 111 of "gen_b.py" (allocating at line
113): code objects of the same size, so they take the addresses phase A's left. A walk
that took a first line remembered from phase A would name phase B's bytes as phase A's
line.

Prints one JSON line: the lines, the bytes kept at each, and how many of phase B's code
objects took an address one of phase A's had.
"""

import gc
import json
import sys
import time
import types

N, K, SIZE, HOLD = 300, 20, 1000, 2.5
BODY = "def f(keep):\n    for i in range(len(keep)):\n        keep[i] = bytearray(SIZE)\n"
KEPT = []


def phase(filename, blank_lines):
    template = compile("\n" * blank_lines + BODY, filename, "exec").co_consts[0]
    # A code object of its own for each function (a copy of the template's).
    env = {"SIZE": SIZE, "__builtins__": __builtins__}
    funcs = [types.FunctionType(template.replace(), dict(env)) for _ in range(N)]
    for f in funcs:
        slot = [None] * K
        f(slot)
        KEPT.append(slot)
    return funcs


def main():
    a = phase("gen_a.py", 10)
    a_codes = {id(f.__code__) for f in a}
    time.sleep(HOLD)
    del a
    gc.collect()
    b = phase("gen_b.py", 110)
    reused = sum(id(f.__code__) in a_codes for f in b)
    time.sleep(HOLD)
    print(
        json.dumps(
            {
                "a_line": 13,
                "b_line": 113,
                "bytes_each": N * K * (SIZE + 1),
                "blocks_each": N * K,
                "reused": reused,
                "n": N,
            }
        )
    )
    sys.stdout.flush()


main()
