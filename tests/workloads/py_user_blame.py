"""Blame on the user's own line: user code keeps what library code allocated. Each round
gathers TASKS coroutines (asyncio's gather makes a Task for each inside the standard
library) and keeps the gathering future, which holds the tasks; and keeps a copy of a
50-key dict made by copy.copy (the new keys table is allocated inside copy.py). Prints one
JSON line with the truth, then idles a moment."""
import asyncio
import copy
import json
import sys
import time

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 100
TASKS = 100
TEMPLATE = {"key%d" % i: i for i in range(50)}

kept_futures = []
kept_dicts = []


async def job(i):
    await asyncio.sleep(0)
    return i


async def serve(n):
    fut = asyncio.gather(*[job(n * TASKS + k) for k in range(TASKS)])  # GATHER_LINE
    kept_futures.append(fut)
    await fut


def remember(d):
    kept_dicts.append(copy.copy(d))  # COPY_LINE


async def main():
    for n in range(ROUNDS):
        await serve(n)
        remember(TEMPLATE)
        await asyncio.sleep(0.005)


asyncio.run(main())
# What a copy's keys table asks malloc for: its size beyond an empty dict's.
keys = sys.getsizeof(kept_dicts[0]) - sys.getsizeof({})
print(json.dumps({"rounds": ROUNDS, "tasks": ROUNDS * TASKS, "keys_bytes": keys}), flush=True)
time.sleep(1.5)
