"""A command with a Ctrl-C handler: prints `running`, waits; on KeyboardInterrupt prints
`cleaning up`, takes half a second, prints `cleanup done` and exits with status 4. A
second SIGINT during the cleanup would end it with a traceback instead."""
import sys
import time

try:
    print("running", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("cleaning up", flush=True)
    time.sleep(0.5)
    print("cleanup done", flush=True)
    sys.exit(4)
