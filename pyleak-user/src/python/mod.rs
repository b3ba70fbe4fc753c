//! CPython knowledge: finding the runtime in a process's files, telling its version from
//! the binary, the frame layout the kernel walks, and reading code objects for names.

pub mod census;
pub mod code;
pub mod debug_offsets;
pub mod heap;
pub mod lines;
pub mod release;
pub mod versions;

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use object::{Object, ObjectSegment, ObjectSymbol};
use pyleak_common::{PyFrame, PyProc};

use self::code::{CodeInfo, CodeLayout, Memory, ProcMem};
use self::versions::CPython;

/// The file holding a process's Python runtime, and what pyleak needs from it.
#[derive(Debug, Clone)]
pub struct PythonRuntime {
    /// The file (libpython, or the python executable).
    pub file: PathBuf,
    /// Link-time address of `_PyRuntime`.
    pub runtime_vaddr: u64,
    /// Lowest link-time address of a loaded segment (to compute the load bias).
    pub base_vaddr: u64,
    /// What pyleak knows about this version.
    pub cpython: &'static dyn CPython,
    /// The frame layout for the kernel (runtime address and bias still 0).
    pub walk: PyProc,
    /// Where its code objects keep names and line tables.
    pub code: CodeLayout,
    /// What the user should hear about how the layouts were found (one line), if anything.
    pub warning: Option<String>,
    /// The file's device and inode as read (through the path pyleak opened), if known:
    /// what its uprobes are placed on.
    pub key: Option<(u64, u64)>,
}

/// What detection found in a file that holds a Python runtime.
#[derive(Debug, Clone)]
pub enum Detected {
    /// A supported CPython.
    Supported(Box<PythonRuntime>),
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

/// What an unsupported runtime whose version could not be read is called.
const UNKNOWN: &str = "of unknown version";

/// Whether `file` holds a Python runtime, reading it through `via` (an open file's
/// `/proc/self/fd/N`, which stays valid when the process that mapped it exits). Its version
/// is read from the file's contents (see `release`); the name only picks candidates.
pub fn detect_via(file: &std::path::Path, via: &std::path::Path) -> Option<Detected> {
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !(name.starts_with("libpython") || name.starts_with("python")) {
        return None;
    }
    let mut found = detect_in(file, &std::fs::read(via).ok()?)?;
    if let Detected::Supported(rt) = &mut found {
        rt.key = crate::attach::plan::file_key(via);
    }
    Some(found)
}

/// Whether the ELF file `data` (named `file`) holds a Python runtime; see [`detect_via`].
pub fn detect_in(file: &std::path::Path, data: &[u8]) -> Option<Detected> {
    let f = &file.to_owned();
    let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Ok(obj) = object::File::parse(data) else {
        return None;
    };
    let find = |want: &str| release::defined(&obj, want);
    let version = release::version_of(&obj);
    let Some(runtime) = find("_PyRuntime") else {
        // Python 3.6 and older have no _PyRuntime.
        if name.starts_with("libpython") || find("Py_Initialize").is_some() {
            return Some(Detected::Unsupported {
                file: f.clone(),
                version: version.map_or_else(|| UNKNOWN.to_owned(), version_name),
            });
        }
        return None;
    };
    let base_vaddr = obj.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff;
    let Some(version) = version else {
        return Some(Detected::Unsupported {
            file: f.clone(),
            version: UNKNOWN.into(),
        });
    };
    let Some(cpython) = versions::for_version(version) else {
        return Some(Detected::Unsupported {
            file: f.clone(),
            version: version_name(version),
        });
    };
    let (mut walk, mut code, mut warning) = (cpython.walk_layout(), cpython.code_layout(), None);
    if let Some(layout) = cpython.debug_offsets() {
        let name = version_name(version);
        let read = debug_offsets::read(
            &obj,
            runtime.address(),
            version,
            layout,
            &mut walk,
            &mut code,
        );
        warning = match read {
            Ok(diffs) if diffs.is_empty() => None,
            Ok(diffs) => Some(format!(
                "{}: _Py_DebugOffsets differ from pyleak's CPython {name} table ({}): using the file's",
                f.display(),
                diffs.join(", ")
            )),
            Err(debug_offsets::Problem::FreeThreaded) => {
                return Some(Detected::Unsupported {
                    file: f.clone(),
                    version: format!("{name}t (free-threaded)"),
                });
            }
            Err(e) => Some(format!(
                "{}: {e}: using pyleak's CPython {name} table",
                f.display()
            )),
        };
    }
    Some(Detected::Supported(Box::new(PythonRuntime {
        file: f.clone(),
        runtime_vaddr: runtime.address(),
        base_vaddr,
        cpython,
        walk,
        code,
        warning,
        key: None,
    })))
}

/// The pid namespace of `pid` as (device, inode) when it is not pyleak's own (a
/// container's), for the kernel to translate thread ids.
pub fn pid_namespace(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (theirs.ino() != ours.ino() || theirs.dev() != ours.dev()).then(|| (theirs.dev(), theirs.ino()))
}

/// The layout of a runtime loaded `bias` bytes above its link-time address, as the kernel
/// is told it. A bias of 0 means "not known yet" to the kernel, so a python at its
/// link-time address (not PIE) is described as one page higher with a page less of bias.
pub fn placed(pid: u32, rt: &PythonRuntime, bias: u64, layout: PyProc) -> PyProc {
    let (pidns_dev, pidns_ino) = pid_namespace(pid).unwrap_or((0, 0));
    PyProc {
        runtime_vaddr: rt.runtime_vaddr.wrapping_sub(4096),
        bias: bias.wrapping_add(4096),
        pidns_dev,
        pidns_ino,
        ..layout
    }
}

/// Where the runtime's file is loaded in `pid` minus its link-time base.
pub fn load_bias(pid: u32, rt: &PythonRuntime) -> Option<u64> {
    file_load_bias(pid, &rt.file, rt.base_vaddr)
}

/// Where `file` (linked at `base_vaddr`) is loaded in `pid` minus that base, from
/// `/proc/PID/maps`; a path through `/proc/N/root` is compared as the process names it.
pub fn file_load_bias(pid: u32, file: &std::path::Path, base_vaddr: u64) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let want = file.to_string_lossy();
    let want = want
        .split_once("/root")
        .filter(|(p, _)| p.starts_with("/proc/"))
        .map(|(_, r)| r)
        .unwrap_or(&want);
    let start = crate::proctext::maps(&maps)
        .find(|m| m.path == want && m.offset == 0)?
        .start;
    start.checked_sub(base_vaddr)
}

/// Reads code objects of traced processes and turns Python frames into
/// `qualname (path:line)`. Each stack is resolved when the kernel announces it, while its
/// code objects are alive: a code object freed later and another made at the same address
/// cannot rename the frames of stacks seen before.
#[derive(Default)]
pub struct Resolver {
    procs: HashMap<u32, Proc>,
    /// The code object last seen at (process, address, first line).
    cache: HashMap<(u32, u64, u32), Cached>,
    /// Batches of stacks learnt so far: a cached code object is checked once per batch.
    generation: u64,
    /// Per (process, stack id): the code object of each Python frame, leaf first.
    stacks: HashMap<(u32, u64), Vec<Option<Arc<CodeInfo>>>>,
    /// Forked processes (not exec'd since) → their parent: a fork's code objects are its
    /// parent's, at the same addresses, and the kernel announces a stack once, for the first
    /// process of the family to use it.
    forks: HashMap<u32, u32>,
}

impl Resolver {
    /// Forgets `pids` (retired processes): their memory (closed), code objects, stacks and
    /// fork links.
    pub fn forget(&mut self, pids: &std::collections::HashSet<u32>) {
        self.procs.retain(|p, _| !pids.contains(p));
        self.cache.retain(|(p, _, _), _| !pids.contains(p));
        self.stacks.retain(|(p, _), _| !pids.contains(p));
        self.forks.retain(|c, _| !pids.contains(c));
    }

    /// Processes known, code objects cached, stacks resolved.
    pub fn footprint(&self) -> (usize, usize, usize) {
        (self.procs.len(), self.cache.len(), self.stacks.len())
    }

    /// Starts resolving frames of `pid`, which runs `rt`.
    pub fn add_process(&mut self, pid: u32, rt: &PythonRuntime) {
        // Memory is opened at first use: a launched command has not exec'd yet.
        let proc = Proc {
            cpython: rt.cpython,
            layout: rt.code,
            mem: None,
        };
        self.procs.insert(pid, proc);
    }

    /// Whether stack `stack_id` of `pid` has been resolved (its code objects read).
    pub fn has_stack(&self, pid: u32, stack_id: u64) -> bool {
        self.stacks.contains_key(&(pid, stack_id))
    }

    /// Stops resolving frames of `pid` (it exec'd another program): stacks named so far
    /// keep their names.
    pub fn forget_process(&mut self, pid: u32) {
        self.procs.remove(&pid);
        self.cache.retain(|k, _| k.0 != pid);
        self.forks.remove(&pid);
    }

    /// `child` was forked by `parent` and runs `rt` (its parent's): its frames are named
    /// from what any process of the family read.
    pub fn add_fork(&mut self, child: u32, parent: u32, rt: &PythonRuntime) {
        self.add_process(child, rt);
        self.forks.insert(child, parent);
    }

    /// `child` was forked by `parent`, a process known here, and has not exec'd: its
    /// frames are read as its parent's (the same CPython at the same place) and named from
    /// what any process of the family read. Nothing is done for a `parent` not known here.
    pub fn add_fork_of(&mut self, child: u32, parent: u32) {
        let Some(p) = self.procs.get(&parent).filter(|_| child != parent) else {
            return;
        };
        let proc = Proc {
            cpython: p.cpython,
            layout: p.layout,
            mem: None,
        };
        self.procs.insert(child, proc);
        self.forks.insert(child, parent);
    }

    /// The first process of `pid`'s fork family.
    fn family_root(&self, mut pid: u32) -> u32 {
        // Bounded: a cycle (a pid reused) cannot loop forever.
        for _ in 0..64 {
            match self.forks.get(&pid) {
                Some(&p) if p != pid => pid = p,
                _ => break,
            }
        }
        pid
    }

    /// Whether frames of `pid` can be resolved (its CPython version is known).
    pub fn knows(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// Resolves the Python frames of a newly announced stack (call while the process
    /// lives). A cached function's code object is reused as is; a module's or class
    /// body's (freed once run, its address reused) only if the object at its address still
    /// has its identity, checked with one small read once per batch.
    pub fn learn(&mut self, pid: u32, stack_id: u64, frames: &[PyFrame]) {
        let root = self.family_root(pid);
        for p in [pid, root] {
            if let Some(proc) = self.procs.get_mut(&p) {
                if proc.mem.is_none() {
                    proc.mem = ProcMem::open(p).ok();
                }
            }
        }
        let Some(Proc { layout, mem, .. }) = self.procs.get(&pid) else {
            return;
        };
        // A fork's code objects from before the fork are its family's first process's, at
        // the same addresses: read there what the fork's own memory no longer has (it
        // exited, e.g. a pool's worker that ended between two growth samples), checked
        // by the first line as any read is.
        let family = self
            .procs
            .get(&root)
            .filter(|_| root != pid)
            .and_then(|p| Some((p.mem.as_ref()?, &p.layout)));
        if mem.is_none() && family.is_none() {
            log::debug!("process {pid}: memory unreadable, stack {stack_id:#x} unnamed");
            return;
        }
        let mut resolved = Vec::with_capacity(frames.len());
        for f in frames {
            let key = (pid, f.code, f.sig);
            let gen = self.generation;
            let Some(mem) = mem.as_ref() else {
                let info = self
                    .cache
                    .get(&key)
                    .and_then(|e| e.info.clone())
                    .or_else(|| family.and_then(|(m, l)| read_checked(m, l, f)));
                resolved.push(info);
                continue;
            };
            let info = match self.cache.get(&key).cloned() {
                // A function's code lives as long as the function: no check needed.
                Some(e)
                    if e.checked == gen || e.info.as_ref().is_none_or(|info| info.is_function) =>
                {
                    e.info
                }
                Some(e) => {
                    // Once per batch: is the object at that address still the one read?
                    // (Unreadable now, e.g. the process just exited: keep what was read.)
                    let id = code::read_identity(mem as &dyn Memory, layout, f.code);
                    let reused = e
                        .info
                        .as_ref()
                        .zip(id)
                        .is_some_and(|(info, id)| info.identity != id);
                    if reused {
                        read_checked(mem, layout, f)
                    } else {
                        e.info
                    }
                }
                None => read_checked(mem, layout, f),
            };
            let info = info.or_else(|| family.and_then(|(m, l)| read_checked(m, l, f)));
            self.cache.insert(
                key,
                Cached {
                    info: info.clone(),
                    checked: gen,
                },
            );
            resolved.push(info);
        }
        self.stacks.insert((pid, stack_id), resolved);
    }

    /// Notes that `child` (added) was forked by `parent` and has not exec'd since (a
    /// group's member found by its scan rather than announced by the kernel).
    pub fn note_fork(&mut self, child: u32, parent: u32) {
        if child != parent {
            self.forks.insert(child, parent);
        }
    }

    /// Whether `pid` is a fork (not exec'd since) of a traced process.
    pub fn is_fork(&self, pid: u32) -> bool {
        self.forks.contains_key(&pid)
    }

    /// Starts a batch of newly announced stacks (see [`Resolver::learn`]).
    pub fn next_batch(&mut self) {
        self.generation += 1;
    }

    /// `qualname (path:line)` of frame `i` (leaf first) of stack `stack_id`, or a
    /// placeholder when its code object could not be read.
    pub fn frame(&self, pid: u32, stack_id: u64, i: usize, f: &PyFrame) -> String {
        let proc = self.procs.get(&pid);
        // The stack as resolved, else the code object as read for another stack.
        let read_by = |p: u32| {
            self.stacks
                .get(&(p, stack_id))
                .and_then(|v| v.get(i).cloned().flatten())
                .or_else(|| {
                    self.cache
                        .get(&(p, f.code, f.sig))
                        .and_then(|c| c.info.clone())
                })
        };
        let info = read_by(pid).or_else(|| {
            // Read by its parent, a sibling or a child (the same objects before a fork).
            let root = self.family_root(pid);
            if root == pid && !self.forks.values().any(|&p| p == pid) {
                return None;
            }
            std::iter::once(root)
                .chain(
                    self.forks
                        .keys()
                        .copied()
                        .filter(|&c| c != pid && self.family_root(c) == root),
                )
                .find_map(read_by)
        });
        match (info, proc) {
            (Some(info), Some(p)) => {
                let line = p.cpython.line(&p.layout, &info, f.lasti);
                format!("{} ({}:{line})", info.qualname, info.filename)
            }
            _ => format!("[python code {:#x}] (?:{})", f.code, f.sig),
        }
    }
}

/// A traced process: its version, where its code objects keep things, its memory.
struct Proc {
    cpython: &'static dyn CPython,
    layout: CodeLayout,
    mem: Option<ProcMem>,
}

/// A code object as read, and the batch in which it was last checked.
#[derive(Clone)]
struct Cached {
    info: Option<Arc<CodeInfo>>,
    checked: u64,
}

/// Reads the code object of `f`, if it is still the one the kernel saw (same first line).
fn read_checked(mem: &ProcMem, layout: &CodeLayout, f: &PyFrame) -> Option<Arc<CodeInfo>> {
    code::read_code(mem as &dyn Memory, layout, f.code)
        .filter(|info| info.firstlineno == f.sig)
        .map(Arc::new)
}

/// `CPython 3.12 (/path/libpython3.12.so)`, for messages.
pub fn describe(rt: &PythonRuntime) -> String {
    let version = version_name(rt.cpython.version());
    format!("CPython {version} ({})", rt.file.display())
}

/// `3.12`, as reports name a version.
pub fn version_name((major, minor): versions::PyVersion) -> String {
    format!("{major}.{minor}")
}
