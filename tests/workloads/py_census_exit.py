"""Fills REGISTRY with 20 000 entries (a str key and a tuple of two str each) in its first
fraction of a second, then exits normally: growth samples (every 2 s) never see it, and
after exit its heap is gone. Only a census taken as the interpreter starts shutting down
(`Py_FinalizeEx`, before teardown clears the module) names REGISTRY as the holder.

Usage: py_census_exit.py [--slow-teardown | --os-exit]
  --slow-teardown: also keeps 300 objects whose __del__ sleeps 5 ms, so the interpreter's
  teardown lasts 1.5 s: censuses taken during it would see a heap half freed.
  --os-exit: ends with os._exit(0): no shutdown at all, only the exit."""
import os
import sys
import time

REGISTRY = {}


class Slow:
    def __del__(self):
        time.sleep(0.005)


def fill(n):
    for i in range(n):
        REGISTRY[f"k{i}"] = (f"v{i}", f"w{i}")  # the holder's line


fill(20_000)
SLOW = [Slow() for _ in range(300)] if "--slow-teardown" in sys.argv else []
if "--os-exit" in sys.argv:
    os._exit(0)
