"""Seeds for the `python_code` fuzz target: a code object laid out as CPython 3.8 and 3.12
keep it (offsets from pyleak-user/src/python/versions/v3_8.rs and v3_12.rs), its name,
file name and line table, all inside the input, which the target maps at 0x7f0000000000.
Run from fuzz/: python3 seeds/python_code_seeds.py"""
import struct

BASE = 0x7F0000000000


def seed(layout, table, lasti):
    buf = bytearray(1024)
    code = 64
    struct.pack_into("<II", buf, 0, code, lasti)

    def ascii_str(at, text):
        struct.pack_into("<q", buf, at + 16, len(text))
        struct.pack_into("<I", buf, at + 32, (1 << 5) | (1 << 6) | (1 << 2))
        buf[at + layout["sizeof_ascii"]: at + layout["sizeof_ascii"] + len(text)] = text

    ascii_str(512, b"leak_here")
    ascii_str(640, b"/srv/app.py")
    struct.pack_into("<q", buf, 768 + 16, len(table))
    buf[768 + 32: 768 + 32 + len(table)] = table
    struct.pack_into("<i", buf, code + layout["firstlineno"], 10)
    struct.pack_into("<I", buf, code + layout["flags"], 0x3)
    struct.pack_into("<Q", buf, code + layout["filename"], BASE + 640)
    struct.pack_into("<Q", buf, code + layout["name"], BASE + 512)
    if layout.get("qualname"):
        struct.pack_into("<Q", buf, code + layout["qualname"], BASE + 512)
    struct.pack_into("<Q", buf, code + layout["linetable"], BASE + 768)
    return bytes(buf)


v38 = dict(firstlineno=40, flags=36, filename=104, name=112, linetable=120, sizeof_ascii=48)
v312 = dict(firstlineno=68, flags=48, filename=112, name=120, qualname=128, linetable=136,
            sizeof_ascii=40)
# co_lnotab: (byte delta, line delta) pairs; 3.11+ location table entries.
open("corpus/python_code/v3_8", "wb").write(seed(v38, bytes([0, 1, 6, 1, 8, 2]), 12))
open("corpus/python_code/v3_12", "wb").write(
    seed(v312, bytes([0x80 | (14 << 3) | 0, 0, 0xF8 | 1, 0x80 | (11 << 3) | 1, 2, 4, 8]), 200))
