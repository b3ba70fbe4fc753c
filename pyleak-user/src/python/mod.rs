//! CPython knowledge: finding the runtime in a process's files, telling its version from
//! the binary, the frame layout the kernel walks, and reading code objects for names.

pub mod code;
pub mod layouts;

use std::{collections::HashMap, path::PathBuf};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};
use pyleak_common::PyFrame;

use self::code::{CodeInfo, CodeLayout, Memory, ProcMem};

/// The file holding a process's Python runtime, and what pyleak needs from it.
#[derive(Debug, Clone)]
pub struct PythonRuntime {
    /// The file (libpython, or the python executable).
    pub file: PathBuf,
    /// CPython (major, minor).
    pub version: (u8, u8),
    /// Link-time address of `_PyRuntime`.
    pub runtime_vaddr: u64,
    /// Lowest link-time address of a loaded segment (to compute the load bias).
    pub base_vaddr: u64,
}

/// What detection found in a file that holds a Python runtime.
#[derive(Debug, Clone)]
pub enum Detected {
    /// A supported CPython.
    Supported(PythonRuntime),
    /// A CPython pyleak cannot walk (too old, or an unknown layout).
    Unsupported {
        /// The file.
        file: PathBuf,
        /// What was found.
        version: String,
    },
}

/// Looks through `files` for the one defining `_PyRuntime` and tells its version.
pub fn detect(files: &[PathBuf]) -> Option<Detected> {
    files.iter().find_map(|f| detect_via(f, f))
}

/// Whether `file` holds a Python runtime, reading it through `via` (an open file's
/// `/proc/self/fd/N`, which stays valid when the process that mapped it exits).
pub fn detect_via(file: &std::path::Path, via: &std::path::Path) -> Option<Detected> {
    let f = &file.to_owned();
    let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !(name.starts_with("libpython") || name.starts_with("python")) {
        return None;
    }
    let Ok(data) = std::fs::read(via) else {
        return None;
    };
    let Ok(obj) = object::File::parse(&*data) else {
        return None;
    };
    let find = |want: &str| {
        obj.dynamic_symbols()
            .chain(obj.symbols())
            .find(|s| s.is_definition() && s.name() == Ok(want))
    };
    let version = find("Py_Version")
        .and_then(|s| read_u32_at(&obj, s.address()))
        .map(|hex| (((hex >> 24) & 0xff) as u8, ((hex >> 16) & 0xff) as u8))
        .or_else(|| version_from_name(name));
    let Some(runtime) = find("_PyRuntime") else {
        // Python 3.6 and older have no _PyRuntime.
        if name.starts_with("libpython") || find("Py_Initialize").is_some() {
            return Some(Detected::Unsupported {
                file: f.clone(),
                version: version
                    .map(|(a, b)| format!("{a}.{b}"))
                    .unwrap_or_else(|| name.to_owned()),
            });
        }
        return None;
    };
    let base_vaddr = obj.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff;
    let Some(version) = version else {
        return Some(Detected::Unsupported {
            file: f.clone(),
            version: "unknown".into(),
        });
    };
    if layouts::for_version(version).is_none() {
        return Some(Detected::Unsupported {
            file: f.clone(),
            version: format!("{}.{}", version.0, version.1),
        });
    }
    Some(Detected::Supported(PythonRuntime {
        file: f.clone(),
        version,
        runtime_vaddr: runtime.address(),
        base_vaddr,
    }))
}

fn read_u32_at(obj: &object::File<'_>, addr: u64) -> Option<u32> {
    for sec in obj.sections() {
        if sec.address() <= addr && addr + 4 <= sec.address() + sec.size() {
            let data = sec.data().ok()?;
            let off = (addr - sec.address()) as usize;
            return Some(u32::from_le_bytes(data.get(off..off + 4)?.try_into().ok()?));
        }
    }
    None
}

/// `python3.9`, `libpython3.10.so.1.0` → (3, 9), (3, 10).
fn version_from_name(name: &str) -> Option<(u8, u8)> {
    let rest = name
        .strip_prefix("libpython")
        .or_else(|| name.strip_prefix("python"))?;
    let mut parts = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The pid namespace of `pid` as (device, inode) when it is not pyleak's own (a
/// container's), for the kernel to translate thread ids.
pub fn pid_namespace(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (theirs.ino() != ours.ino() || theirs.dev() != ours.dev()).then(|| (theirs.dev(), theirs.ino()))
}

/// Where `file` is loaded in `pid` minus its link-time base, from `/proc/PID/maps`.
pub fn load_bias(pid: u32, rt: &PythonRuntime) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let want = rt.file.to_string_lossy();
    let want = want
        .split_once("/root")
        .filter(|(p, _)| p.starts_with("/proc/"))
        .map(|(_, r)| r)
        .unwrap_or(&want);
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), _, Some(off)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if f.nth(2) != Some(want) || u64::from_str_radix(off, 16) != Ok(0) {
            continue;
        }
        let start = u64::from_str_radix(range.split_once('-')?.0, 16).ok()?;
        return Some(start - rt.base_vaddr);
    }
    None
}

/// Reads code objects of traced processes and turns Python frames into
/// `qualname (path:line)`, caching by (process, code address, signature).
#[derive(Default)]
pub struct Resolver {
    procs: HashMap<u32, (CodeLayout, Option<ProcMem>)>,
    cache: HashMap<(u32, u64, u32), Option<CodeInfo>>,
}

impl Resolver {
    /// Starts resolving frames of `pid`, a CPython `version`.
    pub fn add_process(&mut self, pid: u32, version: (u8, u8)) {
        if let Some(layout) = CodeLayout::for_version(version) {
            // Memory is opened at first use: a launched command has not exec'd yet.
            self.procs.insert(pid, (layout, None));
        }
    }

    /// Whether frames of `pid` can be resolved (its CPython version is known).
    pub fn knows(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// Reads the code objects of `frames` not seen yet (call while the process lives).
    pub fn learn(&mut self, pid: u32, frames: &[PyFrame]) {
        let Some((layout, mem)) = self.procs.get_mut(&pid) else {
            return;
        };
        if mem.is_none() {
            *mem = ProcMem::open(pid).ok();
        }
        let Some(mem) = mem.as_ref() else { return };
        for f in frames {
            self.cache.entry((pid, f.code, f.sig)).or_insert_with(|| {
                let info = code::read_code(mem as &dyn Memory, layout, f.code)?;
                // A reused address shows as a different first line: not our code object.
                (info.firstlineno == f.sig).then_some(info)
            });
        }
    }

    /// `qualname (path:line)`, or a placeholder when the code object could not be read.
    pub fn frame(&self, pid: u32, f: &PyFrame) -> String {
        let layout = self.procs.get(&pid).map(|p| &p.0);
        match (self.cache.get(&(pid, f.code, f.sig)), layout) {
            (Some(Some(info)), Some(layout)) => {
                format!(
                    "{} ({}:{})",
                    info.qualname,
                    info.filename,
                    code::line_for(layout, info, f.lasti)
                )
            }
            _ => format!("[python code {:#x}] (?:{})", f.code, f.sig),
        }
    }
}

/// `CPython 3.12 (/path/libpython3.12.so)`, for messages.
pub fn describe(rt: &PythonRuntime) -> String {
    format!(
        "CPython {}.{} ({})",
        rt.version.0,
        rt.version.1,
        rt.file.display()
    )
}
