"""Ground truth for judging sampled pymalloc blocks from outside (pyleak's `heap` module).

Phase 1 makes objects of several types and size classes and prints, for each, its block
(`id()` minus what precedes the object: `sys.getsizeof(o) - o.__sizeof__()`), the size
requested from pymalloc and its type:   sample LABEL BLOCK SIZE TYPE KEPT
then `ready1`, and waits for SIGUSR1 (the reader fingerprints the blocks then).
Phase 2 drops the samples not kept (every other one, and a whole group spanning arenas),
churns: makes and keeps objects of other types in the same size classes, which take the
freed blocks, and prints them:          new BLOCK SIZE TYPE
then `ready2`, and waits until killed. Nothing runs while it waits, and waiting
(`sigwait`) allocates nothing.
"""

import gc
import signal
import sys

N = 400
SIGNALS = {signal.SIGUSR1}
signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


class Obj:
    def __init__(self, i):
        self.i = i


class Other:
    # Slots: no dict of its own that could take a freed block unseen.
    __slots__ = ("i",)

    def __init__(self, i):
        self.i = i


INLINE_VALUES = 1 << 2  # Py_TPFLAGS_INLINE_VALUES (3.13+)


def block_and_size(o):
    pre = sys.getsizeof(o) - type(o).__sizeof__(o)
    block = id(o) - pre
    if type(o) is list:
        # list.__sizeof__ counts its item array, a block of its own.
        size = list.__basicsize__ + pre
    elif sys.version_info >= (3, 13) and type(o).__flags__ & INLINE_VALUES:
        # 3.13 keeps an instance's attribute values in its block, as many as its class's
        # shared keys had room for when it was made; sys.getsizeof does not count them.
        # The size class is in the pool's header (`szidx`, a uint at 36).
        import ctypes

        pool = block & ~(16384 - 1)
        size = (ctypes.c_uint.from_address(pool + 36).value + 1) * 16
    else:
        size = sys.getsizeof(o)
    return block, size


MAKERS = {
    "bytes300": lambda i: b"%06d" % i + b"x" * 294,
    "tuple2": lambda i: (i + 100000, "a"),
    "tuple25": lambda i: tuple(range(i * 1000, i * 1000 + 25)),
    "obj": lambda i: Obj(i),
    "bigint": lambda i: 2**100 + i,
    "float": lambda i: i + 0.5,
    "str60": lambda i: "s%05d" % i + "y" * 54,
    "list": lambda i: [i, i, i],
}

# Churn: for each group, what takes its freed blocks (same size class). Everything it
# keeps is printed, so it holds nothing else: items are small ints (cached), list item
# arrays are 88 bytes (no group is in that class).
CHURN = {
    "bytes300": lambda i: tuple([i % 250] * 36),
    "tuple2": lambda i: (i, "b"),
    "tuple25": lambda i: tuple([i % 250, 7] * 12 + [1]),
    "obj": lambda i: Other(i),
    "bigint": lambda i: 2**100 + 10**6 + i,
    "float": lambda i: i + 0.25,
    "str60": lambda i: b"%06d" % i + b"z" * 64,
    "list": lambda i: [i] * 11,
}


def main():
    groups = {label: [make(i) for i in range(N)] for label, make in MAKERS.items()}
    # 20000 blocks of 512 bytes (~10 MiB over several arenas), all dropped later.
    arena_group = [b"%06d" % i + b"w" * 464 for i in range(20000)]
    lines = []
    for label, objs in groups.items():
        for i, o in enumerate(objs):
            b, s = block_and_size(o)
            lines.append("sample %s %d %d %s %d" % (label, b, s, type(o).__name__, 1 - i % 2))
    for o in arena_group[::97]:
        b, s = block_and_size(o)
        lines.append("sample arena %d %d %s 0" % (b, s, type(o).__name__))
    text = "\n".join(lines) + "\nready1\n"
    del lines, b, s, o
    # Only now: the reader judges as soon as it reads the marker.
    sys.stdout.write(text)
    sys.stdout.flush()
    del text
    signal.sigwait(SIGNALS)

    kept = {label: objs[::2] for label, objs in groups.items()}
    del groups, objs
    del arena_group
    # Half as many 2-tuples as were dropped: the rest stay dead in the tuple free list.
    counts = {label: N // 4 if label == "tuple2" else N // 2 for label in MAKERS}
    churned = [CHURN[label](i) for label in MAKERS for i in range(counts[label])]
    # And every object the collector tracks: lists the interpreter made on its own too.
    lines = []
    tracked = gc.get_objects()
    for seen in (churned, tracked):
        for o in seen:
            if o is not tracked and o is not lines:
                b, s = block_and_size(o)
                lines.append("new %d %d %s" % (b, s, type(o).__name__))
    del tracked, seen
    text = "\n".join(lines) + "\nready2\n"
    del lines, b, s, o
    # Only now: the reader judges as soon as it reads the marker.
    sys.stdout.write(text)
    sys.stdout.flush()
    del text
    signal.sigwait(SIGNALS)
    return kept, churned


if __name__ == "__main__":
    main()
