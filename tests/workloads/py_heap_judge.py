"""Ground truth for judging sampled pymalloc blocks from outside (pyleak's `heap` module).

Phase 1 makes objects of several types and size classes and prints, for each, its block
(`id()` minus what precedes the object: `sys.getsizeof(o) - o.__sizeof__()`), the size
requested from pymalloc and its type:   sample LABEL BLOCK SIZE TYPE KEPT
then `ready1`, and waits for a line on stdin (the reader fingerprints the blocks then).
Phase 2 drops the samples not kept (every other one, and a whole group spanning arenas),
churns: makes and keeps objects of other types in the same size classes, which take the
freed blocks, and prints them:          new BLOCK SIZE TYPE
then `ready2`, and waits until killed. Nothing runs while it waits.
"""

import sys

N = 400


class Obj:
    def __init__(self, i):
        self.i = i


class Other:
    # Slots: no dict of its own that could take a freed block unseen.
    __slots__ = ("i",)

    def __init__(self, i):
        self.i = i


def block_and_size(o):
    pre = sys.getsizeof(o) - o.__sizeof__()
    if type(o) is list:
        # list.__sizeof__ counts its item array, a block of its own.
        size = list.__basicsize__ + pre
    else:
        size = sys.getsizeof(o)
    return id(o) - pre, size


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
# arrays are 72 bytes (no group is in that class).
CHURN = {
    "bytes300": lambda i: tuple([i % 250] * 36),
    "tuple2": lambda i: (i, "b"),
    "tuple25": lambda i: tuple([i % 250, 7] * 12 + [1]),
    "obj": lambda i: Other(i),
    "bigint": lambda i: 2**100 + 10**6 + i,
    "float": lambda i: i + 0.25,
    "str60": lambda i: b"%06d" % i + b"z" * 64,
    "list": lambda i: [i] * 9,
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
    sys.stdout.write("\n".join(lines) + "\nready1\n")
    sys.stdout.flush()
    del lines, b, s, o
    sys.stdin.readline()

    kept = {label: objs[::2] for label, objs in groups.items()}
    del groups, objs
    del arena_group
    churned = [CHURN[label](i) for label in MAKERS for i in range(N // 2)]
    lines = ["new %d %d list" % block_and_size(churned)]
    for o in churned:
        b, s = block_and_size(o)
        lines.append("new %d %d %s" % (b, s, type(o).__name__))
    sys.stdout.write("\n".join(lines) + "\nready2\n")
    sys.stdout.flush()
    del lines, b, s, o
    sys.stdin.readline()
    return kept, churned


if __name__ == "__main__":
    main()
