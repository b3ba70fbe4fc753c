"""Raw-domain allocations (PyMem_RawMalloc/Calloc/Realloc) driven by Python code, a known
number per step, for comparing CPython builds' pymem_raw counts. Each step makes 15 raw
allocations and frees them all (counted on pyenv 3.11.7, where the raw functions are
called, and on Debian's 3.11.2 at each inlined raw copy):

- os.strerror: the C message decoded through the locale, in a wchar_t buffer (1);
- an array of 200 machine integers grown by appends: once over 512 bytes, pymalloc hands
  its buffer to the raw domain (a malloc), which reallocates it as it grows (9 reallocs);
- %-formatting 300 values: the result's buffer, over 512 bytes (a malloc, 2 reallocs);
- a bytes object of 1000 bytes, over pymalloc's 512 (1).

At the end it holds one array of 200000 machine integers (1.6 MB), grown by appends: a
live raw block whose C-heap block below it is made on its behalf.

Usage: py_raw_count.py [N]  (default 20000 steps). Prints N when done."""
import array
import os
import sys

N = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
FMT = "%s" * 300
ARGS = tuple(range(300))
X = bytes([120])


def step():
    os.strerror(2)
    a = array.array("q")
    for j in range(200):
        a.append(j)
    FMT % ARGS
    X * 1000


for _ in range(N):
    step()
HELD = array.array("q")
for j in range(200_000):
    HELD.append(j)
print(N, flush=True)
