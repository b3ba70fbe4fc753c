"""Leaks a known number of 1 MiB C-heap blocks (libc malloc through ctypes), for pyleak's
cgroup tests: each process of a group leaks its own amount.

Usage: py_group_leak.py MIB [--wait FILE] [--delay SECS] [--linger SECS]
  --wait FILE: wait for FILE to exist before leaking (to attach first);
  --delay SECS: sleep that long before leaking;
  --linger SECS: stay alive that long after leaking (default: until killed with --wait,
  else 0). Prints "leaked" once the blocks are taken.
"""
import ctypes
import os
import sys
import time

KEEP = []


def leak_blocks(mib):
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    for _ in range(mib):
        KEEP.append(libc.malloc(1 << 20))  # LEAK LINE


def main():
    mib = int(sys.argv[1])
    opts = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    wait = opts.get("--wait")
    linger = float(opts.get("--linger", "1e9" if wait else "0"))
    if wait:
        while not os.path.exists(wait):
            time.sleep(0.01)
    time.sleep(float(opts.get("--delay", "0")))
    leak_blocks(mib)
    print("leaked", flush=True)
    time.sleep(linger)


main()
