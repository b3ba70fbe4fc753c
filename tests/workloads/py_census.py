"""Programs with known holders, for `pyleak census` (tests/tests/census.rs).

  grow RATE SECS   for SECS seconds after "ready", at RATE items a second (on a schedule
                   from the clock, not from sleeps): REGISTRY[f"k{i}"] = (f"v{i}", f"w{i}")
                   (per item one tuple and three str: only this makes tuples or str), and
                   every 4th item one Registry() appending itself to the class attribute
                   Registry._all, one Seen() appended to a list in HANDLER's closure
                   (`seen`), one Entry() stored in APP.cache (global -> attribute -> dict
                   values). Then prints "done N" (N items in REGISTRY) and idles.
  churn RATE       a bounded cache: 1000 entries, each step adds one (a tuple of two new
                   str) and evicts the oldest, at RATE steps a second, forever.
  thread RATE      a thread named worker-3 whose poll() appends RATE bytes objects a second
                   to its local list `batch` (held by no global), forever.
  output SECS      deterministic work for SECS seconds (allocating, sleeping), prints a
                   digest and exits with status 3.
  exit SECS        prints "ready", lives SECS seconds, exits 0.
"""

import gc
import hashlib
import sys
import time


class Registry:
    _all = []

    def __init__(self, n):
        self.n = n
        Registry._all.append(self)


class Seen:
    def __init__(self, n):
        self.n = n


class Entry:
    def __init__(self, n):
        self.n = n


class App:
    def __init__(self):
        self.cache = {}


def make_handler():
    seen = []

    def handle(n):
        seen.append(Seen(n))

    return handle


REGISTRY = {}
HANDLER = make_handler()
APP = App()


def grow(rate, secs):
    # Start-up's garbage collected now, not while the censuses measure growth.
    gc.collect()
    print("ready", flush=True)
    t0 = time.monotonic()
    i = 0
    while True:
        elapsed = time.monotonic() - t0
        want = int(min(elapsed, secs) * rate)
        while i < want:
            REGISTRY[f"k{i}"] = (f"v{i}", f"w{i}")
            if i % 4 == 0:
                Registry(i)
                HANDLER(i)
                APP.cache[i] = Entry(i)
            i += 1
        if elapsed >= secs:
            break
        time.sleep(0.002)
    print(f"done {len(REGISTRY)}", flush=True)
    while True:
        time.sleep(1)


def churn(rate):
    cache = {}
    size = 1000
    t0 = time.monotonic()
    i = 0
    while True:
        want = int((time.monotonic() - t0) * rate)
        while i < want:
            cache[f"k{i}"] = (f"v{i}", f"w{i}")
            if i >= size:
                del cache[f"k{i - size}"]
            i += 1
            if i == 4 * size:
                print("ready", flush=True)
        time.sleep(0.002)


def poll(rate):
    batch = []
    t0 = time.monotonic()
    while True:
        want = int((time.monotonic() - t0) * rate)
        while len(batch) < want:
            batch.append(bytes(64))
        time.sleep(0.002)


def thread(rate):
    import threading

    worker = threading.Thread(target=poll, args=(rate,), name="worker-3", daemon=True)
    worker.start()
    print("ready", flush=True)
    worker.join()


def output(secs):
    print("ready", flush=True)
    digest = hashlib.sha256()
    t0 = time.monotonic()
    rounds = 0
    while time.monotonic() - t0 < secs:
        data = [str(rounds * 1000 + k) * 3 for k in range(1000)]
        digest.update("".join(data).encode())
        rounds += 1
        time.sleep(0.01)
    # The digest of a fixed amount of work: the rounds done vary with the clock.
    fixed = hashlib.sha256()
    for r in range(50):
        fixed.update("".join(str(r * 1000 + k) * 3 for k in range(1000)).encode())
    print(f"digest {fixed.hexdigest()}", flush=True)
    print(f"rounds>0 {rounds > 0}", flush=True)
    sys.exit(3)


def main():
    mode = sys.argv[1]
    if mode == "grow":
        grow(int(sys.argv[2]), float(sys.argv[3]))
    elif mode == "churn":
        churn(int(sys.argv[2]))
    elif mode == "thread":
        thread(int(sys.argv[2]))
    elif mode == "output":
        output(float(sys.argv[2]))
    elif mode == "exit":
        print("ready", flush=True)
        time.sleep(float(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
