"""A small "service" with a leak, for `cargo xtask demo`.

Each request builds a response; the handler keeps every request's 64 KiB payload in a
module-level list it never trims (the leak), while a bounded LRU cache of rendered pages
fills up and then stays flat (not a leak). Serves 400 requests over about 4 seconds (so
pyleak sees the leak grow) and exits.
"""
import collections
import time

HISTORY = []                       # grows forever: the leak
CACHE = collections.OrderedDict()  # bounded: fills, then plateaus
CACHE_SIZE = 50


def render(page):
    if page in CACHE:
        CACHE.move_to_end(page)
        return CACHE[page]
    body = ("<p>%d</p>" % page) * 200
    CACHE[page] = body
    if len(CACHE) > CACHE_SIZE:
        CACHE.popitem(last=False)
    return body


def handle_request(i):
    payload = bytearray(64 * 1024)  # the request body
    HISTORY.append(payload)         # kept "for auditing": never released
    return render(i % 100)


def main():
    for i in range(400):
        handle_request(i)
        time.sleep(0.01)
    print("served 400 requests; history holds %d payloads" % len(HISTORY))


if __name__ == "__main__":
    main()
