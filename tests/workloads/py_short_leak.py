"""Builds KEPT, N (default 600 000) 2-tuples of an int and its str, in under a second,
then exits: a launched run whose sampling windows all fall in the build, and whose last
window's samples can only be judged as the interpreter starts shutting down.

Usage: py_short_leak.py [N]"""
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 600_000


def build(n):
    return [(i, str(i)) for i in range(n)]  # the leak


KEPT = build(N)
