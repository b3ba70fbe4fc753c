"""A long-running HTTP service (stdlib, loopback only) with a leak and a warm cache.

    py_http_leak.py serve            prints its port, serves until killed
    py_http_leak.py client PORT N    N rounds of GET /leak + GET /page/<i % 40>, 25 a second

GET /leak keeps a 10000-byte body per request forever (the leak, at LEAK_LINE); GET /page/K
renders page K once into a cache of 40 pages (fills within 40 rounds, then stays flat).
"""
import http.server
import sys
import time
import urllib.request

LEAK_SIZE = 10000
PAGE_SIZE = 20000
LEAKED = []
CACHE = {}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/leak":
            body = bytes(LEAK_SIZE)  # LEAK_LINE
            LEAKED.append(body)
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


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        client(int(sys.argv[2]), int(sys.argv[3]))
