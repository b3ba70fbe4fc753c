//! The Python runtimes of the traced processes while recording: which CPython each runs,
//! telling the kernel where it landed, reading the code objects of new stacks, and
//! watching the allocator tables.

use std::{collections::HashMap, path::PathBuf, sync::Mutex};

use pyleak_common::PyProc;

use crate::{
    attach::allocwatch::AllocWatch,
    collect::Recorder,
    python,
    symbolize::{lock, Symbolizer},
    targets::alive,
};

/// A process whose Python runtime has not shown in its memory map yet.
pub struct Unplaced {
    pub rt: python::PythonRuntime,
    /// Its layout (bias unknown).
    pub layout: PyProc,
    /// A launched command whose own exec the kernel has not announced yet. Its runtime is
    /// not placed from its memory map before: the kernel maps an executable (Debian's
    /// non-PIE `python3.11`, which holds its runtime) before `sched_process_exec` fires,
    /// and that tracepoint drops a placed layout as the old program's, so a placement
    /// written in between was lost and the whole run had no Python frames.
    pub exec_pending: bool,
}

/// The targets' Python runtimes: those whose load address the kernel does not know yet,
/// and the watches on their allocator tables.
#[derive(Default)]
pub struct Runtimes {
    /// Processes whose runtime has not shown in their memory map yet, by pid.
    pub unplaced: HashMap<u32, Unplaced>,
    /// Watches on the targets' allocator tables.
    pub watches: Vec<AllocWatch>,
}

impl Runtimes {
    /// Watches the allocator tables of the Python runtime among `files`, if any.
    pub fn watch(&mut self, pid: u32, files: &[PathBuf]) {
        let Some(detected) = python::detect(files) else {
            return;
        };
        let file = match detected {
            python::Detected::Supported(rt) => rt.file,
            python::Detected::Unsupported { file, .. } => file,
        };
        self.watches.extend(AllocWatch::new(pid, &file));
    }

    /// Watches the allocator tables of the Python runtime `file` in process `pid`.
    pub fn watch_file(&mut self, pid: u32, file: &std::path::Path) {
        self.watches.extend(AllocWatch::new(pid, file));
    }

    /// The kernel announced that `pid` exec'd: a launched command's runtime may be placed
    /// from now on.
    pub fn exec_passed(&mut self, pid: u32) {
        if let Some(u) = self.unplaced.get_mut(&pid) {
            u.exec_pending = false;
        }
    }

    /// Tells the kernel where launched commands' Python runtimes landed, once their memory
    /// maps show it (and their exec has passed).
    fn place(&mut self, rec: &mut Recorder) {
        self.unplaced.retain(|&pid, u| {
            if u.exec_pending {
                return true;
            }
            let Some(bias) = python::load_bias(pid, &u.rt) else {
                return true;
            };
            if let Err(e) =
                rec.set_python(pid, &python::placed(pid, &u.rt, bias, u.layout), u.rt.key)
            {
                log::warn!("process {pid}: {e}");
            }
            false
        });
    }

    /// Places runtimes, checks the allocator tables, re-reads the memory maps (for
    /// symbols) and names of the targets still alive.
    pub fn refresh(&mut self, rec: &mut Recorder, syms: &Mutex<Symbolizer>) {
        self.place(rec);
        for w in self.watches.iter_mut() {
            w.check();
        }
        let mut syms = lock(syms);
        for pid in rec.targets.clone() {
            syms.snapshot(pid);
            rec.refresh_comm(pid);
        }
    }
}

/// Reads the code objects of stacks the kernel announced (while their process lives).
/// A stack of a process whose runtime is not placed yet (a group member pyleak is still
/// examining) waits for it while the process lives.
pub fn learn_new_stacks(rec: &mut Recorder, resolver: &mut python::Resolver) {
    if rec.new_stacks.is_empty() {
        return;
    }
    resolver.next_batch();
    let mut waiting = Vec::new();
    for (pid, id) in std::mem::take(&mut rec.new_stacks) {
        if !resolver.knows(pid) {
            if alive(pid) {
                waiting.push((pid, id));
            }
            continue;
        }
        if let Some(st) = rec.stack(id) {
            let n = (st.py_len as usize).min(st.py.len());
            resolver.learn(pid, id, &st.py[..n]);
        }
    }
    rec.new_stacks = waiting;
}

/// Resolves the Python frames of stacks `pid` uses but was never announced for: stacks
/// are interned once for every process (the kernel announces a stack to the first process
/// that makes it), so a worker forked from the same parent, running the same code at the
/// same addresses, makes the first worker's stacks without an announcement. Called with
/// the (pid, stack) of every growth sample, while the processes live.
pub fn learn_used_stacks(
    rec: &Recorder,
    resolver: &mut python::Resolver,
    used: impl IntoIterator<Item = (u32, u64)>,
) {
    let mut batch = false;
    // Whether each process lives, asked once per call (exited ones keep their stacks).
    let mut lives: HashMap<u32, bool> = HashMap::new();
    for (pid, id) in used {
        if id == 0 || !resolver.knows(pid) || resolver.has_stack(pid, id) {
            continue;
        }
        let Some(st) = rec.stack(id) else {
            continue;
        };
        let frames = &st.py[..(st.py_len as usize).min(st.py.len())];
        // An exited fork (a pool's worker that ended between two samples) is named from
        // its family's memory (see `Resolver::learn`); another exited process keeps its
        // stacks unnamed.
        if !*lives.entry(pid).or_insert_with(|| alive(pid)) && !resolver.is_fork(pid) {
            continue;
        }
        if !batch {
            resolver.next_batch();
            batch = true;
        }
        resolver.learn(pid, id, frames);
    }
}

/// The supported Python runtime among `files` (when Python stacks are `enabled`), warning
/// once about an unsupported one; the version found is kept for process `pid`'s report.
pub fn python_runtime(
    rec: &mut Recorder,
    pid: u32,
    files: &[PathBuf],
    what: &str,
    enabled: bool,
) -> Option<python::PythonRuntime> {
    match python::detect(files)? {
        python::Detected::Supported(rt) => {
            rec.pythons
                .insert(pid, python::version_name(rt.cpython.version()));
            if !enabled {
                return None;
            }
            log::info!("{what}: {}", python::describe(&rt));
            if let Some(w) = &rt.warning {
                eprintln!("pyleak: warning: {w}");
            }
            Some(*rt)
        }
        python::Detected::Unsupported { file, version } => {
            rec.pythons.insert(pid, version.clone());
            if !enabled {
                return None;
            }
            eprintln!(
                "pyleak: warning: {what} runs CPython {version} ({}), whose frames pyleak cannot walk (it walks 3.8 to 3.14 with the GIL): native stacks only",
                crate::attach::as_process_names(&file)
            );
            None
        }
    }
}
