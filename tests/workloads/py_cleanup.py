"""A command with Ctrl-C, hang-up and SIGTERM handlers: prints `running`, waits; on
SIGINT (KeyboardInterrupt), SIGHUP or SIGTERM prints `cleaning up`, takes half a second,
prints `cleanup done` and exits with status 4. A second such signal during the cleanup
would end it with a traceback instead."""
import signal
import sys
import time


class Hangup(Exception):
    """SIGHUP or SIGTERM, raised as Ctrl-C raises KeyboardInterrupt."""


def on_hangup(signum, frame):
    raise Hangup


signal.signal(signal.SIGHUP, on_hangup)
signal.signal(signal.SIGTERM, on_hangup)
try:
    print("running", flush=True)
    time.sleep(60)
except (KeyboardInterrupt, Hangup):
    print("cleaning up", flush=True)
    time.sleep(0.5)
    print("cleanup done", flush=True)
    sys.exit(4)
