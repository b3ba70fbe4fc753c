//! Userspace resolution of the Python frames that the BPF walk captures as
//! `(code object address, lasti, signature)`: read the `PyCodeObject` out of the target's
//! memory; the version's module (`versions`) then turns `lasti` into a line with its line
//! table (docs/python-stacks.md, sections 2 and 3). x86_64, release builds.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Longest string (in characters) we accept; anything longer is treated as garbage.
const MAX_STR_CHARS: usize = 4096;
/// Largest line table (in bytes) we accept.
const MAX_LINETABLE: usize = 1 << 20;
/// `PyASCIIObject.length` / `.state`, `PyVarObject.ob_size` / `PyBytesObject.ob_sval`.
const STR_LENGTH: usize = 16;
const STR_STATE: usize = 32;
const BYTES_SIZE: usize = 16;
const BYTES_DATA: u64 = 32;
/// `state` bits (interned:2, kind:3, compact:1, ascii:1 on every supported version).
const STATE_COMPACT: u32 = 1 << 5;
const STATE_ASCII: u32 = 1 << 6;

/// Reads bytes of another process's memory (implemented by the caller with /proc/PID/mem;
/// tests implement it on a Vec). Returns None when unreadable.
pub trait Memory {
    /// Reads exactly `len` bytes at `addr`, or returns None.
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>>;
}

/// /proc/PID/mem reader.
pub struct ProcMem {
    file: File,
}

impl ProcMem {
    /// Opens `/proc/PID/mem` read-only (needs ptrace access to `pid`, e.g. root).
    pub fn open(pid: u32) -> std::io::Result<ProcMem> {
        File::open(format!("/proc/{pid}/mem")).map(|file| ProcMem { file })
    }
}

impl Memory for ProcMem {
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, addr).ok()?;
        Some(buf)
    }
}

/// What a code object says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeInfo {
    /// `co_qualname` on 3.11+, `co_name` before (3.8–3.10 have no qualname).
    pub qualname: String,
    /// `co_filename`.
    pub filename: String,
    /// `co_firstlineno`.
    pub firstlineno: u32,
    /// Raw line table: `co_lnotab` (3.8/3.9) or `co_linetable` (3.10+).
    pub linetable: Vec<u8>,
    /// What identifies the object cheaply: its first line and the addresses of its name,
    /// file name and line table (a code object freed and another made at the same address
    /// differs in these).
    pub identity: CodeIdentity,
    /// A function's code (`CO_NEWLOCALS`), which lives as long as its function. Module
    /// and class bodies run once and are freed: their addresses get reused.
    pub is_function: bool,
}

/// `CO_NEWLOCALS`: the code gets a fresh locals dict, i.e. is a function's.
const CO_NEWLOCALS: u32 = 0x2;

/// First line and the name, file name and line table pointers of a code object.
pub type CodeIdentity = (u32, [u64; 3]);

/// Reads just what identifies the code object at `code_addr` (one read).
pub fn read_identity(
    mem: &dyn Memory,
    layout: &CodeLayout,
    code_addr: u64,
) -> Option<CodeIdentity> {
    let name_off = layout.qualname.unwrap_or(layout.name);
    let end = [
        layout.firstlineno,
        layout.filename,
        name_off,
        layout.linetable,
    ]
    .into_iter()
    .max()?
        + 8;
    let hdr = mem.read(code_addr, end)?;
    identity_of(&hdr, layout)
}

fn identity_of(hdr: &[u8], layout: &CodeLayout) -> Option<CodeIdentity> {
    let name_off = layout.qualname.unwrap_or(layout.name);
    let firstlineno = u32::try_from(i32::from_le_bytes(field(hdr, layout.firstlineno)?)).ok()?;
    Some((
        firstlineno,
        [
            ptr_at(hdr, name_off)?,
            ptr_at(hdr, layout.filename)?,
            ptr_at(hdr, layout.linetable)?,
        ],
    ))
}

/// Where one CPython version keeps what pyleak reads in code objects (offsets of
/// PyCodeObject fields, sizes of PyASCIIObject/PyCompactUnicodeObject); each version's
/// module gives its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeLayout {
    /// Offset of `co_firstlineno` (a C `int`).
    pub firstlineno: usize,
    /// Offset of `co_flags` (a C `int`).
    pub flags: usize,
    /// Offset of `co_filename`.
    pub filename: usize,
    /// Offset of `co_name`.
    pub name: usize,
    /// Offset of `co_qualname` (3.11+ only).
    pub qualname: Option<usize>,
    /// Offset of `co_lnotab` (3.8/3.9) or `co_linetable` (3.10+).
    pub linetable: usize,
    /// Offset of `co_code_adaptive` (= `PyCode_Type.tp_basicsize`, 3.11+), else 0.
    pub code_adaptive: u32,
    /// `sizeof(PyASCIIObject)`: where compact ASCII data starts.
    pub sizeof_ascii: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where compact non-ASCII data starts.
    pub sizeof_compact: u64,
}

fn field<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    buf.get(off..off.checked_add(N)?)?.try_into().ok()
}

fn ptr_at(buf: &[u8], off: usize) -> Option<u64> {
    field(buf, off).map(u64::from_le_bytes).filter(|&p| p != 0)
}

/// Reads a compact `str` object (ASCII or UCS1/2/4), bounded to `MAX_STR_CHARS`.
fn read_str(mem: &dyn Memory, layout: &CodeLayout, addr: u64) -> Option<String> {
    let hdr = mem.read(addr, STR_STATE + 4)?;
    let len = usize::try_from(i64::from_le_bytes(field(&hdr, STR_LENGTH)?)).ok()?;
    let state = u32::from_le_bytes(field(&hdr, STR_STATE)?);
    let kind = ((state >> 2) & 7) as usize;
    if len > MAX_STR_CHARS || state & STATE_COMPACT == 0 || ![1, 2, 4].contains(&kind) {
        return None;
    }
    if state & STATE_ASCII != 0 {
        let data = mem.read(addr.checked_add(layout.sizeof_ascii)?, len)?;
        return (kind == 1 && data.len() == len && data.is_ascii())
            .then(|| data.iter().map(|&b| char::from(b)).collect());
    }
    let data = mem.read(addr.checked_add(layout.sizeof_compact)?, len * kind)?;
    if data.len() != len * kind {
        return None;
    }
    let unit = |c: &[u8]| match kind {
        1 => u32::from(c[0]),
        2 => u32::from(u16::from_le_bytes([c[0], c[1]])),
        _ => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
    };
    let to_char = |c| char::from_u32(unit(c)).unwrap_or(char::REPLACEMENT_CHARACTER);
    Some(data.chunks_exact(kind).map(to_char).collect())
}

/// Reads a `bytes` object's payload, bounded to `MAX_LINETABLE`.
fn read_bytes(mem: &dyn Memory, addr: u64) -> Option<Vec<u8>> {
    let hdr = mem.read(addr, BYTES_SIZE + 8)?;
    let len = usize::try_from(i64::from_le_bytes(field(&hdr, BYTES_SIZE)?)).ok()?;
    if len > MAX_LINETABLE {
        return None;
    }
    mem.read(addr.checked_add(BYTES_DATA)?, len)
        .filter(|d| d.len() == len)
}

/// Reads a code object. On 3.8–3.10 there is no co_qualname: use co_name.
pub fn read_code(mem: &dyn Memory, layout: &CodeLayout, code_addr: u64) -> Option<CodeInfo> {
    let name_off = layout.qualname.unwrap_or(layout.name);
    let end = [
        layout.firstlineno,
        layout.flags,
        layout.filename,
        name_off,
        layout.linetable,
    ]
    .into_iter();
    let end = end.max()? + 8;
    let hdr = mem.read(code_addr, end)?;
    let identity = identity_of(&hdr, layout)?;
    let flags = u32::from_le_bytes(field(&hdr, layout.flags)?);
    Some(CodeInfo {
        is_function: flags & CO_NEWLOCALS != 0,
        qualname: read_str(mem, layout, ptr_at(&hdr, name_off)?)?,
        filename: read_str(mem, layout, ptr_at(&hdr, layout.filename)?)?,
        firstlineno: identity.0,
        linetable: read_bytes(mem, ptr_at(&hdr, layout.linetable)?)?,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::{lines::LineFormat, versions};
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    struct Fake(Vec<u8>);
    impl Memory for Fake {
        fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
            let off = usize::try_from(addr.checked_sub(0x1000)?).ok()?;
            self.0.get(off..off.checked_add(len)?).map(<[u8]>::to_vec)
        }
    }

    #[test]
    fn bounds_and_procmem() {
        let l = versions::for_version((3, 13)).unwrap().code_layout();
        let mut m = Fake(vec![0; 256]);
        m.0[16..24].copy_from_slice(&2i64.to_le_bytes());
        m.0[32..36].copy_from_slice(&(STATE_COMPACT | 4 << 2).to_le_bytes());
        m.0[56..64].copy_from_slice(&[0xe9, 0, 0, 0, 0, 0, 2, 0]);
        assert_eq!(read_str(&m, &l, 0x1000).as_deref(), Some("é𠀀"));
        m.0[16..24].copy_from_slice(&(1i64 << 40).to_le_bytes());
        assert_eq!(read_str(&m, &l, 0x1000), None, "garbage length");
        assert_eq!(read_bytes(&m, 0x1000), None, "garbage length");
        assert_eq!(read_code(&m, &l, 0x9000), None, "unreadable");
        let data = b"pyleak-procmem".to_vec();
        let mem = ProcMem::open(std::process::id()).unwrap();
        assert_eq!(mem.read(data.as_ptr() as u64, data.len()), Some(data));
        assert_eq!(mem.read(8, 8), None);
    }

    /// Prints META (version, tp_basicsize, str header sizes), CODE (id, firstlineno, hex
    /// qualname, hex filename, expected line per code unit) and FRAME (code id, lasti as
    /// the kernel would capture it, f_lineno) lines, then waits for stdin to close.
    const CHILD: &str = r#"import dis, sys, threading, time
def façade():
    def 函数():
        def 𠀀(): return 1
        return 𠀀
    return 函数
class Holder:
    def method(self):
        def inner_gen(x=1):
            yield x
            yield (x +
                   2)
        return inner_gen
    def sleeper(self, ev):
        ev.set()
        time.sleep(1000)
def loops(f, n, t=0):
    while n > 0:
        t, n = t + n, n - 1
    try:
        t /= [j * n
              for j in range(n)].__len__()
    except ZeroDivisionError:
        t = -1
#GAP
    finally:
        return (t,
                f(#ARGS))
def klasti(f):
    if sys.version_info < (3, 11):
        return (f.f_lasti // (2 if sys.version_info >= (3, 10) else 1)) & 0xffffffff
    return type(f.f_code).__basicsize__ + (f.f_lasti if f.f_lasti >= 0 else -2)
def lines_of(code):
    n, line = len(code.co_code), code.co_firstlineno
    out = [0] * (n // 2)
    if hasattr(code, "co_lines"):
        for start, end, line in code.co_lines():
            out[start // 2:end // 2] = [line or 0] * (end // 2 - start // 2)
        return out
    starts = dict(dis.findlinestarts(code))
    for off in range(0, n, 2):
        out[off // 2] = line = starts.get(off, line)
    return out
codes = {}
def walk(c):
    if id(c) not in codes:
        codes[id(c)] = c
        [walk(k) for k in c.co_consts if isinstance(k, type(c))]
def main():
    g, g2 = Holder().method()(), Holder().method()()
    next(g)
    ev = threading.Event()
    t = threading.Thread(target=Holder().sleeper, args=(ev,), daemon=True)
    t.start()
    ev.wait()
    while sys._current_frames()[t.ident].f_lineno != Holder.sleeper.__code__.co_firstlineno + 2:
        time.sleep(0.01)
    frames = [g.gi_frame, g2.gi_frame]
    for f in (sys._current_frames()[t.ident], sys._getframe()):
        while f is not None:
            frames.append(f)
            f = f.f_back
    [walk(f.f_code) for f in frames]
    print("META", *sys.version_info[:2], type(main.__code__).__basicsize__,
          sys.getsizeof("".join("ab")) - 3, sys.getsizeof("".join([chr(0x4e00)] * 3)) - 8)
    for i, c in codes.items():
        q = getattr(c, "co_qualname", c.co_name)
        print("CODE", i, c.co_firstlineno, q.encode().hex(), c.co_filename.encode().hex(),
              ",".join(map(str, lines_of(c))))
    for f in frames:
        print("FRAME", id(f.f_code), klasti(f), f.f_lineno)
    print("END", flush=True)
    sys.stdin.read()
main()
"#;

    fn unhex(s: &str) -> String {
        let hex = |i| u8::from_str_radix(&s[i..i + 2], 16).unwrap();
        String::from_utf8((0..s.len()).step_by(2).map(hex).collect()).unwrap()
    }

    fn e2e(python: &str) {
        if !std::path::Path::new(python).exists() {
            // Every CPython listed is expected on this machine kind: CI fails without it.
            assert!(
                std::env::var_os("CI").is_none(),
                "required under CI: {python}"
            );
            eprintln!("!!!!!!!! NOT RUN: {python} is not installed on this machine !!!!!!!!");
            return;
        }
        let tag: String = python.chars().filter(char::is_ascii_alphanumeric).collect();
        let dir = std::env::temp_dir().join(format!("pyleak-tëst-{}-{tag}", std::process::id()));
        let args: Vec<String> = (0..200).map(|i| i.to_string()).collect();
        let src = CHILD.replace("#GAP\n", &"\n".repeat(300));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("c.py"), src.replace("#ARGS", &args.join(", "))).unwrap();
        let mut cmd = Command::new(python);
        cmd.arg(dir.join("c.py")).stdin(Stdio::piped());
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        let end = |l: &String| l != "END";
        let lines: Vec<String> = out.map_while(Result::ok).take_while(end).collect();
        std::fs::remove_dir_all(&dir).unwrap(); // the child has compiled it already
        let mem = ProcMem::open(child.id()).unwrap();
        let (mut infos, mut checked) = (std::collections::HashMap::new(), 0);
        let num = |s: &str| s.parse::<u32>().unwrap();
        let meta: Vec<u32> = lines[0].split(' ').skip(1).map(num).collect();
        let cp = versions::for_version((meta[0] as u8, meta[1] as u8)).unwrap();
        let (l, format) = (cp.code_layout(), cp.line_format());
        let sizes = [l.sizeof_ascii, l.sizeof_compact].map(|s| s as u32);
        assert_eq!(sizes, meta[3..5], "str header sizes");
        if format == LineFormat::Locations {
            assert_eq!(l.code_adaptive, meta[2], "co_code_adaptive");
        }
        for line in &lines[1..] {
            let w: Vec<&str> = line.split(' ').collect();
            let addr = w[1].parse::<u64>().unwrap();
            if w[0] == "FRAME" {
                assert_eq!(cp.line(&l, &infos[&addr], num(w[2])), num(w[3]), "{line}");
                continue;
            }
            let got = read_code(&mem, &l, addr).expect("read_code");
            let want = (unhex(w[3]), unhex(w[4]), num(w[2]));
            let info = (got.qualname.clone(), got.filename.clone(), got.firstlineno);
            assert_eq!(info, want, "{line}");
            for (i, want) in w[5].split(',').filter(|s| !s.is_empty()).enumerate() {
                let (i, a) = (2 * i as u32, l.code_adaptive);
                let lasti = match format {
                    LineFormat::Lnotab => vec![i, i + 1],
                    LineFormat::Linetable310 => vec![i / 2],
                    LineFormat::Locations => vec![a + i, a + i + 1],
                };
                for x in lasti {
                    assert_eq!(cp.line(&l, &got, x), num(want), "{line} @{x}");
                    checked += 1;
                }
            }
            infos.insert(addr, got);
        }
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        let names: Vec<&str> = infos.values().map(|i| i.qualname.as_str()).collect();
        let genq = ["inner_gen", "Holder.method.<locals>.inner_gen"][meta[1] as usize / 11];
        let want = "façade 函数 𠀀 sleeper _bootstrap <module> loops".split(' ');
        for n in want.chain([genq]) {
            assert!(names.iter().any(|q| q.ends_with(n)), "{n}: {names:?}");
        }
        let (n, frames) = (infos.len(), lines.len() - infos.len() - 1);
        eprintln!("{python}: {n} code objects, {checked} lasti, {frames} frames OK");
    }

    fn pyenv(v: &str) -> String {
        let root = Command::new("pyenv").arg("root").output();
        let root = root.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        format!("{}/versions/{v}/bin/python3", root.unwrap_or_default())
    }

    macro_rules! live {
        ($($name:ident: $path:expr;)*) => {$(
            #[test]
            fn $name() {
                e2e(&$path);
            }
        )*};
    }

    live! {
        live_3_8_18: pyenv("3.8.18");
        live_3_9_18: pyenv("3.9.18");
        live_3_10_13: pyenv("3.10.13");
        live_3_11_7: pyenv("3.11.7");
        live_3_12_1: pyenv("3.12.1");
        live_3_13_0: pyenv("3.13.0");
        live_debian_3_11_2: String::from("/usr/bin/python3.11");
    }
}
