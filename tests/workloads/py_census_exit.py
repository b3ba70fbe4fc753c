"""Fills REGISTRY with 20 000 entries (a str key and a tuple of two str each) in its first
fraction of a second, then exits normally: growth samples (every 2 s) never see it, and
after exit its heap is gone. Only a census taken as the interpreter starts shutting down
(`Py_FinalizeEx`, before teardown clears the module) names REGISTRY as the holder.

Usage: py_census_exit.py"""
REGISTRY = {}


def fill(n):
    for i in range(n):
        REGISTRY[f"k{i}"] = (f"v{i}", f"w{i}")  # the holder's line


fill(20_000)
