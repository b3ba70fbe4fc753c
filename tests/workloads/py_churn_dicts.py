"""Churn only, of objects a fingerprint cannot tell apart: each round makes 30 000
(int, str, dict) triples on one line and drops them all, the same values each round, and
pymalloc hands the freed blocks back in the same order, so the same addresses hold equal
objects again (a dict keeps no word that tells two equal ones apart). Keeps nothing.
Runs ~8 s (rounds paced by short sleeps), then exits: launched, not attached.
"""
import time


def work(n):
    tmp = []
    for i in range(n):
        tmp.append((i, str(i), {"k": i}))  # MARK:churn
    return len(tmp)


t0 = time.time()
while time.time() - t0 < 8:
    work(30000)
    time.sleep(0.05)
print("done", flush=True)
