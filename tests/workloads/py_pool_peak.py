"""A peak, not a leak: a pool of worker threads builds RESULTS results of RESULT bytes
each (RESULTS * RESULT in all, ~100 MiB by default), the main thread holds them for HOLD
seconds, then drops every one and idles IDLE seconds. Prints one JSON line with the truth
once the results are held."""
import json
import sys
import time
from multiprocessing.pool import ThreadPool

RESULTS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
RESULT = 1 << 20
HOLD = 1.5
IDLE = 2.0


def work(i):
    return b"r" * RESULT  # RESULT_LINE


def main():
    with ThreadPool(4) as pool:
        results = pool.map(work, range(RESULTS))
    # A bytes object of n bytes asks for n + 33 (its header and trailing NUL).
    print(json.dumps({"results": len(results), "bytes": len(results) * (RESULT + 33)}), flush=True)
    time.sleep(HOLD)
    del results
    time.sleep(IDLE)


main()
