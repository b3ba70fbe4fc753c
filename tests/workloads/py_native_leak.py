"""Leaks known amounts below Python: C-heap blocks through ctypes' malloc and anonymous
mappings whose every page is touched. For pyleak's integration tests.

Usage: py_native_leak.py MALLOC_MIB MMAP_MIB [--wait FILE]
  MALLOC_MIB blocks of 1 MiB from libc malloc, never freed;
  MMAP_MIB MiB in one anonymous mapping, every page written, kept alive;
  --wait FILE: wait for FILE to exist before leaking, then print "leaked" and sleep
  (for attaching with --pid); otherwise exit right after leaking.
"""
import ctypes
import mmap
import os
import sys
import time

KEEP = []
PAGE = 4096


def leak_malloc(mib):
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    for _ in range(mib):
        KEEP.append(libc.malloc(1 << 20))


def leak_mmap(mib):
    if mib == 0:
        return
    m = mmap.mmap(-1, mib << 20)
    for off in range(0, len(m), PAGE):
        m[off] = 1
    KEEP.append(m)


def main():
    malloc_mib, mmap_mib = int(sys.argv[1]), int(sys.argv[2])
    wait = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--wait" else None
    if wait:
        while not os.path.exists(wait):
            time.sleep(0.01)
    leak_malloc(malloc_mib)
    leak_mmap(mmap_mib)
    if wait:
        print("leaked", flush=True)
        while True:
            time.sleep(1)


main()
