"""Calls C through ctypes at a known line: leak_outer(SIZE, COUNT) in LIBRARY (built from
native_frames_lib.c) mallocs COUNT blocks of SIZE bytes in leak_inner and keeps them. For
pyleak's --native test. Prints one JSON line: {"expected": [[name, line], ... root first],
"file": this script's path, "kept": blocks kept}.

Usage: py_native_frames.py LIBRARY SIZE COUNT
"""
import ctypes
import json
import os
import sys
import traceback


def call_c(lib, size, count):
    kept = lib.leak_outer(size, count); stack = traceback.extract_stack()  # noqa: E702 (same line on purpose)
    return kept, stack


def main():
    lib = ctypes.CDLL(sys.argv[1])
    lib.leak_outer.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.leak_outer.restype = ctypes.c_int
    size, count = int(sys.argv[2]), int(sys.argv[3])
    # Fills linecache now, so the call's line reads no file and keeps no C-heap block of
    # its own: the leak is all that line holds in malloc.
    traceback.extract_stack()
    kept, stack = call_c(lib, size, count)
    out = {
        "expected": [[f.name, f.lineno] for f in stack],
        "file": os.path.abspath(__file__),
        "kept": kept,
    }
    print(json.dumps(out), flush=True)


main()
