"""The main thread returns at once; a non-daemon worker thread, which Python joins as it
shuts down, then keeps N (default 50 000) 200-byte bytes objects in KEPT (a 233-byte
pymalloc request each: 32 bytes of header, the 200, a NUL) and exits.

Usage: py_thread_outlives_main.py [N]"""
import sys
import threading
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
KEPT = []


def worker(n):
    time.sleep(0.3)  # the main thread has returned by now
    for _ in range(n):
        KEPT.append(bytes(200))  # the worker's leak


threading.Thread(target=worker, args=(N,)).start()
