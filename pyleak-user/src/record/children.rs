//! The processes `--pid` and command targets start while recording (fork, vfork, clone,
//! and the programs they exec: `multiprocessing` workers of either start method), each
//! traced under its own pid.
//!
//! A multi-uprobe link with a pid fires in that process only (the kernel's
//! `uprobe_multi_link_filter` compares the link's task's memory with the faulting one, and
//! its handler runs the program only for the same thread group: `kernel/trace/bpf_trace.c`),
//! so a child never fires its parent's links, though it inherits their breakpoints. The
//! kernel (`task:task_newtask`, see `pyleak-ebpf/src/lifecycle.rs`) marks the child traced
//! the moment it is made, before it first runs: its vm and pages events, its exit, and its
//! Python layout (its parent's) need nothing more. Here its own links are attached; the
//! allocator calls it makes before that (the gap, measured per child and reported in
//! `processes[].followed.gap_ms`) are not seen. An exec (`sched:sched_process_exec`) is
//! handled the same way for the new program's files and runtime.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use pyleak_common::PyProc;

use super::runtimes::{python_runtime, Runtimes, Unplaced};
use crate::{
    analysis::Followed,
    attach::{
        self,
        elf::ElfFile,
        plan::{file_key, Planner},
        ProbeSpec,
    },
    collect::{monotonic_ns, Recorder},
    layers::LayerSet,
    python,
    symbolize::{lock, Symbolizer},
    targets::launch::ExecGate,
};

/// The children of `--pid` and command targets, as they come.
pub struct Children {
    /// Probes per file, planned once for the targets and their children alike.
    planner: Planner,
    python_stacks: bool,
    /// Files probed for each traced process, by device and inode (its links survive an
    /// exec: a link follows the task, whose new memory map is probed where it maps the
    /// same file).
    probed: HashMap<u32, HashSet<(u64, u64)>>,
    /// The Python runtime each traced process runs, for its forks.
    runtimes: HashMap<u32, python::PythonRuntime>,
    /// Python runtimes read so far, by their file's device and inode.
    known: HashMap<(u64, u64), python::PythonRuntime>,
    /// A launched command's own exec, which its probes were planned for already.
    launched: Option<u32>,
    /// The launched command and what holds it at its execs until they are handled here.
    exec_gate: Option<(u32, Arc<ExecGate>)>,
    /// How each child came to be traced.
    pub followed: HashMap<u32, Followed>,
    /// When each process's allocator probes were last attached (`CLOCK_MONOTONIC` ns).
    attached: HashMap<u32, u64>,
}

impl Children {
    /// Plans probes for `layers`; reads the children's Python stacks when `python_stacks`.
    /// (Without `--no-follow` the kernel announces no children: nothing else to switch.)
    pub fn new(layers: LayerSet, python_stacks: bool) -> Children {
        Children {
            planner: Planner::new(layers),
            python_stacks,
            probed: HashMap::new(),
            runtimes: HashMap::new(),
            known: HashMap::new(),
            launched: None,
            exec_gate: None,
            followed: HashMap::new(),
            attached: HashMap::new(),
        }
    }

    /// Notes a target attached at the start: the files probed for it and its runtime.
    /// `launched`: a command held before its exec, whose exec is not a new program, and
    /// the gate that holds it at its later execs until this handles them.
    pub fn note_target(
        &mut self,
        pid: u32,
        files: &[PathBuf],
        rt: Option<&python::PythonRuntime>,
        launched: Option<Arc<ExecGate>>,
    ) {
        self.probed
            .entry(pid)
            .or_default()
            .extend(files.iter().filter_map(|f| file_key(f)));
        if let Some(rt) = rt {
            self.runtimes.insert(pid, rt.clone());
            if let Some(k) = file_key(&rt.file) {
                self.known.insert(k, rt.clone());
            }
        }
        if let Some(gate) = launched {
            self.launched = Some(pid);
            self.exec_gate = Some((pid, gate));
        }
    }

    /// Attaches the uprobes of the children and new programs the kernel announced.
    pub fn poll(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        runtimes: &mut Runtimes,
        syms: &Mutex<Symbolizer>,
    ) {
        for (child, parent, ts) in std::mem::take(&mut rec.forks) {
            // A new process, maybe with an earlier one's pid: its own probes are not in yet.
            rec.forget_code_watch(child);
            if let Some(rt) = self.runtimes.get(&parent).cloned() {
                // The kernel gave it its parent's layout: the same runtime at the same place.
                if self.python_stacks {
                    resolver.add_fork(child, parent, &rt);
                }
                rec.pythons
                    .insert(child, python::version_name(rt.cpython.version()));
                self.runtimes.insert(child, rt);
            }
            // A fork is named as its parent until it execs.
            let comm = rec.comm(parent);
            rec.set_comm(child, &comm);
            self.probed.insert(child, HashSet::new());
            let attached = self.examine(rec, resolver, runtimes, child, Vec::new());
            if let Some((at, _)) = attached {
                self.attached.insert(child, at);
            }
            self.followed.insert(
                child,
                Followed {
                    parent,
                    gap_ms: ms_between(ts, attached.map_or_else(monotonic_ns, |a| a.0)),
                    exec: false,
                    traced: attached.is_some(),
                },
            );
            lock(syms).snapshot(child);
        }
        for (pid, ts) in std::mem::take(&mut rec.execs) {
            if self.launched == Some(pid) {
                self.launched = None;
                runtimes.exec_passed(pid);
                self.exec_handled(pid);
                continue;
            }
            self.runtimes.remove(&pid);
            // Its parent's runtime is no longer in its memory.
            resolver.forget_process(pid);
            rec.pythons.remove(&pid);
            let files = std::fs::read_link(format!("/proc/{pid}/exe"))
                .map(|exe| attach::libraries_of(&attach::program_of(&exe)))
                .unwrap_or_default();
            let before = self.attached.get(&pid).copied();
            let attached = self.examine(rec, resolver, runtimes, pid, files);
            // Its links follow it through the exec: calls into files already probed for it
            // are seen from when those probes went in; new files from now.
            let at = match attached {
                Some((at, n)) if n > 0 => Some(at),
                Some(_) => before,
                None => None,
            };
            if let Some(at) = at {
                self.attached.insert(pid, at);
            }
            if let Some(f) = self.followed.get_mut(&pid) {
                f.gap_ms = ms_between(ts, at.unwrap_or_else(monotonic_ns));
                f.exec = true;
                f.traced = at.is_some();
            }
            lock(syms).snapshot(pid);
            self.exec_handled(pid);
        }
    }

    /// The Python runtime `pid` runs, as far as its probes know (None: not Python, or not
    /// followed).
    pub fn runtime(&self, pid: u32) -> Option<&python::PythonRuntime> {
        self.runtimes.get(&pid)
    }

    /// Lets a launched command held at its exec go on: `pid`'s new program is probed.
    fn exec_handled(&self, pid: u32) {
        if let Some((_, gate)) = self.exec_gate.as_ref().filter(|(p, _)| *p == pid) {
            gate.handled();
        }
    }

    /// Probes the files `pid` maps (and `more`, those it is about to map) that are not
    /// probed for it yet, and places a new Python runtime; it becomes a target. Returns
    /// when its allocator probes were in place (`CLOCK_MONOTONIC` ns) and how many were
    /// new, if it could be traced.
    fn examine(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        runtimes: &mut Runtimes,
        pid: u32,
        more: Vec<PathBuf>,
    ) -> Option<(u64, usize)> {
        let t0 = std::time::Instant::now();
        let Ok(mut files) = attach::mapped_files(pid) else {
            log::debug!("process {pid} exited before its probes were attached");
            return None;
        };
        for f in more {
            if !files.contains(&f) {
                files.push(f);
            }
        }
        let done = self.probed.get(&pid).cloned().unwrap_or_default();
        let new: Vec<PathBuf> = files
            .iter()
            .filter(|f| file_key(f).is_some_and(|k| !done.contains(&k)))
            .cloned()
            .collect();
        // The allocator probes first: the process runs meanwhile.
        let (probes, keys) = self.planner.plan_keyed(&new);
        if let Err(e) = rec.add_target(pid, &probes) {
            log::debug!("process {pid}: {e:#}");
            return None;
        }
        let attached = monotonic_ns();
        self.probed.entry(pid).or_default().extend(keys);
        let took = t0.elapsed();
        if !self.runtimes.contains_key(&pid) {
            let mut init = Vec::new();
            if let Some(rt) = self.runtime_of(rec, runtimes, pid, &files) {
                self.place(rec, runtimes, pid, &rt, &mut init);
                resolver.add_process(pid, &rt);
                self.runtimes.insert(pid, rt);
            }
            if let Err(e) = rec.add_target(pid, &init) {
                log::debug!("process {pid}: {e:#}");
            }
        }
        log::debug!(
            "process {pid}: {} probes attached in {took:?}, its runtime placed in {:?}",
            probes.len(),
            t0.elapsed()
        );
        Some((attached, probes.len()))
    }

    /// The Python runtime among `files`: one seen before (by device and inode), else read
    /// from the file; its allocator tables watched.
    fn runtime_of(
        &mut self,
        rec: &mut Recorder,
        runtimes: &mut Runtimes,
        pid: u32,
        files: &[PathBuf],
    ) -> Option<python::PythonRuntime> {
        let known = files
            .iter()
            .filter_map(|f| file_key(f))
            .find_map(|k| self.known.get(&k).cloned());
        if let Some(rt) = known {
            rec.pythons
                .insert(pid, python::version_name(rt.cpython.version()));
            runtimes.watch_file(pid, &rt.file);
            return self.python_stacks.then_some(rt);
        }
        runtimes.watch(pid, files);
        let rt = python_runtime(rec, pid, files, &format!("process {pid}"), true)?;
        if let Some(k) = file_key(&rt.file) {
            self.known.insert(k, rt.clone());
        }
        self.python_stacks.then_some(rt)
    }

    /// The probes of `files`, each distinct file (device and inode) once, named as given.
    pub fn plan(&mut self, files: &[PathBuf]) -> Vec<ProbeSpec> {
        self.planner.plan(files)
    }

    /// Tells the kernel where `pid`'s new runtime is, or, when the program has not mapped
    /// it yet, adds the interpreter start-up probe that does (and places it from the memory
    /// map meanwhile), as for a launched command.
    fn place(
        &self,
        rec: &mut Recorder,
        runtimes: &mut Runtimes,
        pid: u32,
        rt: &python::PythonRuntime,
        probes: &mut Vec<attach::ProbeSpec>,
    ) {
        let layout = rt.walk;
        let set = match python::load_bias(pid, rt) {
            Some(bias) => rec.set_python(pid, &python::placed(pid, rt, bias, layout), rt.key),
            None => {
                if let Ok(elf) = ElfFile::open(&rt.file) {
                    probes.extend(attach::plan_py_init(&elf));
                }
                runtimes.unplaced.insert(
                    pid,
                    Unplaced {
                        rt: rt.clone(),
                        layout,
                        exec_pending: false,
                    },
                );
                rec.set_python(
                    pid,
                    &PyProc {
                        runtime_vaddr: rt.runtime_vaddr,
                        bias: 0,
                        ..layout
                    },
                    rt.key,
                )
            }
        };
        if let Err(e) = set {
            log::warn!("process {pid}: {e}");
        }
    }
}

/// Milliseconds from `from_ns` to `to_ns` (`CLOCK_MONOTONIC`, the kernel's clock for
/// events); 0 when `to_ns` came first.
fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}
