"""Leaks 500 bytearrays of 4000 bytes (500 C-heap blocks of 4001 bytes: CPython keeps a
trailing NUL) in its first milliseconds, then exits: nothing of it is seen unless the
probes are in before the interpreter starts. For launches through `env`, `setsid` and
`bash -c`, which exec Python in the process pyleak started.

Usage: py_early_leak.py"""


def early():
    return [bytearray(4000) for _ in range(500)]  # the leak


KEPT = early()
