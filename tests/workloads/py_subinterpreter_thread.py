"""Creates a subinterpreter (3.12: `_xxsubinterpreters`, 3.13: `_interpreters`), which
becomes the head of the runtime's list of interpreters, then starts a thread of the main
interpreter that keeps N (default 10 000) 200-byte bytes objects in KEPT (233-byte
pymalloc requests); the main thread joins it and exits.

Usage: py_subinterpreter_thread.py [N]"""
import sys
import threading

try:
    import _interpreters as interpreters
except ImportError:
    import _xxsubinterpreters as interpreters

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
KEPT = []


def worker(n):
    for _ in range(n):
        KEPT.append(bytes(200))  # the thread's leak


SUB = interpreters.create()  # kept: 3.12 ends a subinterpreter whose last id is dropped
t = threading.Thread(target=worker, args=(N,))
t.start()
t.join()
