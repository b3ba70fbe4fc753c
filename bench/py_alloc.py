"""An allocation-heavy Python workload for `cargo xtask bench`: builds and drops small
objects (tuples, dicts, lists, strings, floats) like the pyperformance benchmarks
(float, json_dumps, deltablue) do, and prints its own run time and CPU time.

Usage: py_alloc.py [LOOPS] (LOOPS rounds of 20 000 records; 1 by default)."""
import json
import sys
import time


def work(n):
    out = []
    for i in range(n):
        d = {"id": i, "name": "item%d" % i, "tags": [i, i + 1, i + 2], "score": i * 1.5}
        out.append(json.dumps(d))
        if len(out) > 1000:
            out.clear()
    return len(out)


start, cpu = time.perf_counter(), time.process_time()
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    work(20_000)
print("seconds %.4f" % (time.perf_counter() - start))
print("cpu_seconds %.4f" % (time.process_time() - cpu))
