"""Runs one pyperformance benchmark's own workload function in this process (no pyperf
worker processes, so a tracer sees the work) and prints its run time and CPU time.

Usage: pyperf_subset.py NAME [LOOPS]
NAME: float, json_dumps, deltablue, raytrace, go, richards (benchmark programs shipped in
the pyperformance package, imported from its data-files, so their code is pyperformance's).
"""
import importlib.util
import os
import sys
import time

import pyperformance

NAME = sys.argv[1]
LOOPS = int(sys.argv[2]) if len(sys.argv) > 2 else 1
path = os.path.join(os.path.dirname(pyperformance.__file__), "data-files", "benchmarks",
                    "bm_" + NAME, "run_benchmark.py")
spec = importlib.util.spec_from_file_location("bm_" + NAME, path)
bm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bm)  # __name__ is not "__main__": no pyperf.Runner

if NAME == "float":
    def once():
        bm.benchmark(bm.POINTS)
elif NAME == "json_dumps":
    data = [(obj, range(n)) for obj, n in (bm.EMPTY, bm.SIMPLE, bm.NESTED, bm.HUGE)]

    def once():
        bm.bench_json_dumps(data)
elif NAME == "deltablue":
    def once():
        bm.delta_blue(100)
elif NAME == "raytrace":
    def once():
        bm.bench_raytrace(1, bm.DEFAULT_WIDTH, bm.DEFAULT_HEIGHT, None)
elif NAME == "go":
    def once():
        bm.versus_cpu()
elif NAME == "richards":
    def once():
        bm.Richards().run(1)
else:
    sys.exit(f"unknown benchmark {NAME}: use float, json_dumps, deltablue, raytrace, go, richards")

start, cpu = time.perf_counter(), time.process_time()
for _ in range(LOOPS):
    once()
# cpu_seconds: this process's user + system CPU (a tracer's probes run in it and count;
# other work sharing the machine's cores does not).
print("seconds %.4f" % (time.perf_counter() - start), flush=True)
print("cpu_seconds %.4f" % (time.process_time() - cpu), flush=True)
