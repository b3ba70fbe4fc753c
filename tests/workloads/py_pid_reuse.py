"""Two processes of a traced group with the same pid, one after the other.

Waits for the file argv[1] (pyleak is tracing), then forks a first child that keeps
A_N blocks of SIZE bytes in `first()` and exits. Once pyleak has seen it exit (1.5 s),
the parent asks the kernel for the same pid again (writing pid - 1 to
/proc/sys/kernel/ns_last_pid, as CRIU does: root only; when another process takes the
pid first, that child exits at once and the parent tries again) and forks a second child,
which waits 0.5 s (pyleak learns of the fork meanwhile), keeps B_N blocks in `second()`,
says so and waits for the file argv[2].

Prints one JSON line once the second child has kept its blocks: the pid, whether the
second child got it, the blocks and bytes each kept (a bytearray of SIZE bytes is a
malloc of SIZE + 1).
"""

import json
import os
import sys
import time

A_N, B_N, SIZE = 300, 500, 10000


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.05)


def first():
    kept = [None] * A_N
    for i in range(A_N):
        kept[i] = bytearray(SIZE)
    os._exit(0 if kept else 1)


def second(stop, ready):
    time.sleep(0.5)
    kept = [None] * B_N
    for i in range(B_N):
        kept[i] = bytearray(SIZE)
    os.write(ready, b"x")
    wait_for(stop)
    os._exit(0 if kept else 1)


def main():
    go, stop = sys.argv[1], sys.argv[2]
    wait_for(go)
    pid = os.fork()
    if pid == 0:
        first()
    os.waitpid(pid, 0)
    time.sleep(1.5)
    ready_r, ready_w = os.pipe()
    same = False
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        child = os.fork()
        if child == 0:
            if os.getpid() != pid:
                os._exit(0)
            second(stop, ready_w)
        if child == pid:
            same = True
            break
        os.waitpid(child, 0)
    if same:
        os.read(ready_r, 1)
    print(
        json.dumps(
            {
                "pid": pid,
                "same": same,
                "first": [A_N, A_N * (SIZE + 1)],
                "second": [B_N, B_N * (SIZE + 1)],
            }
        ),
        flush=True,
    )
    wait_for(stop)
    if same:
        os.waitpid(pid, 0)


main()
