"""A million small objects, 100k of them printed as samples (`BLOCK SIZE`), for measuring
what judging sampled pymalloc blocks from outside costs. After `ready1` and SIGUSR1 it
drops every other object, prints `ready2` and waits."""

import random
import signal
import sys


SIGNALS = {signal.SIGUSR1}
signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


class Obj:
    def __init__(self, i):
        self.i = i


MAKERS = [
    lambda i: (i, i + 1),
    lambda i: b"%08d" % i * 4,
    lambda i: Obj(i),
    lambda i: i + 0.5,
    lambda i: "k%07d" % i,
]
objs = [MAKERS[i % len(MAKERS)](i * 1000) for i in range(1_000_000)]
random.seed(1)
out = []
for i in random.sample(range(len(objs)), 100_000):
    o = objs[i]
    pre = sys.getsizeof(o) - o.__sizeof__()
    out.append("%d %d" % (id(o) - pre, sys.getsizeof(o)))
sys.stdout.write("\n".join(out) + "\nready1\n")
sys.stdout.flush()
del out
signal.sigwait(SIGNALS)
del objs[::2]
sys.stdout.write("ready2\n")
sys.stdout.flush()
signal.sigwait(SIGNALS)
