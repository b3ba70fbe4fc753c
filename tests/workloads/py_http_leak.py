"""A long-running HTTP service (stdlib, loopback only) with a leak and a warm cache.

    py_http_leak.py serve            prints its port, serves until killed
    py_http_leak.py client PORT N    N rounds of GET /leak + GET /page/<i % 40>, 25 a second

GET /leak keeps a 10000-byte body per request forever (the leak, at LEAK_LINE); GET /page/K
renders page K once into a cache of 40 pages (fills within 40 rounds, then stays flat).
GET /small keeps SMALL_PER_REQUEST small objects per request (2-tuples of an int and a str,
at SMALL_LINE): a leak served from pymalloc's arenas.

    py_http_leak.py small-client PORT N    N rounds of GET /small, 25 a second
"""
import http.server
import sys
import time
import urllib.request

LEAK_SIZE = 10000
PAGE_SIZE = 20000
LEAKED = []
CACHE = {}
SMALL_PER_REQUEST = 2000
SESSIONS = []


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/leak":
            body = bytes(LEAK_SIZE)  # LEAK_LINE
            LEAKED.append(body)
        elif self.path == "/small":
            base = len(SESSIONS)
            for i in range(SMALL_PER_REQUEST):
                SESSIONS.append((base + i, "session-%d" % (base + i)))  # SMALL_LINE
        else:
            key = self.path
            if key not in CACHE:
                page = bytes(PAGE_SIZE)  # CACHE_LINE
                CACHE[key] = page
            body = CACHE[key]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def serve():
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def client(port, rounds):
    for i in range(rounds):
        for path in ("/leak", "/page/%d" % (i % 40)):
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path)) as r:
                r.read()
        time.sleep(0.04)
    print("leak requests: %d" % rounds, flush=True)


def small_client(port, rounds):
    for _ in range(rounds):
        with urllib.request.urlopen("http://127.0.0.1:%d/small" % port) as r:
            r.read()
        time.sleep(0.04)
    print("small requests: %d" % rounds, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "small-client":
        small_client(int(sys.argv[2]), int(sys.argv[3]))
    else:
        client(int(sys.argv[2]), int(sys.argv[3]))
