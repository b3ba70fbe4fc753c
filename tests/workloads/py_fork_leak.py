"""Forks children that leak at once, for pyleak's churn tests: each child keeps one
200,000-byte bytes object (200,033 bytes asked of malloc through pymalloc) right after
fork, before pyleak can have found it, then lives LINGER seconds and exits.

Usage: py_fork_leak.py CHILDREN DELAY LINGER
  DELAY: seconds the parent waits before forking (pyleak places its runtime meanwhile).
Prints "forked" once every child has exited.
"""
import os
import sys
import time

KEEP = []


def leak_in_child():
    KEEP.append(bytes(200000))  # LEAK LINE


def main():
    children, delay, linger = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    time.sleep(delay)
    pids = []
    for _ in range(children):
        pid = os.fork()
        if pid == 0:
            leak_in_child()
            time.sleep(linger)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    print("forked", flush=True)
    time.sleep(0.5)


main()
