"""Pages the kernel maps in bulk. Writes a FILE_MIB MiB file in DIR (so its pages are in
the page cache), maps it read-only and reads one byte of every page: fault-around maps 16
pages a fault. Then maps THP_MIB MiB of anonymous memory with MADV_HUGEPAGE and writes
one byte every 2 MiB: each fault can map a transparent huge page (512 pages). Prints one
JSON line with the kernel's own count of each mapping's resident bytes (its smaps `Rss`,
and `AnonHugePages`), then holds both mappings until it exits."""
import json
import mmap
import os
import sys
import time

DIR = sys.argv[1]
FILE_MIB = int(sys.argv[2]) if len(sys.argv) > 2 else 64
THP_MIB = int(sys.argv[3]) if len(sys.argv) > 3 else 32
PAGE = 4096
HUGE = 2 << 20


def smaps(start):
    """Rss and AnonHugePages (bytes) of the mapping starting at `start`."""
    out, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == start
            elif inside and head in ("Rss:", "AnonHugePages:"):
                out[head[:-1]] = int(line.split()[1]) * 1024
    return out


def address(m):
    """Where an mmap object's memory starts."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def read_file(path):
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    total = 0
    for off in range(0, len(m), PAGE):
        total += m[off]  # FILE_LINE
    return m


def touch_huge():
    m = mmap.mmap(-1, THP_MIB << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    for off in range(0, len(m), HUGE):
        m[off] = 1  # THP_LINE
    return m


def main():
    path = os.path.join(DIR, "bulk.bin")
    with open(path, "wb") as f:
        f.write(b"\x01" * (FILE_MIB << 20))
    file_map = read_file(path)
    anon = touch_huge()
    # ctypes' view of a read-only mapping needs a writable buffer: the anonymous one is
    # found in smaps by its address, the file's by its path.
    file_rss = 0
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                inside = parts[-1] == path
            elif inside and parts[0] == "Rss:":
                file_rss += int(parts[1]) * 1024
    a = smaps(address(anon))
    print(json.dumps({"file_bytes": FILE_MIB << 20, "file_rss": file_rss,
                      "anon_rss": a.get("Rss", 0), "anon_huge": a.get("AnonHugePages", 0)}),
          flush=True)
    time.sleep(1.5)
    return file_map, anon


# Both mappings stay mapped until the interpreter shuts down.
held = main()
