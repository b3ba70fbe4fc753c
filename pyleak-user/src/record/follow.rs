//! Group targets while recording (`--cgroup`, `--container`, `--all`): the processes of
//! the group as they come and go, and the files probed for them, each distinct file once
//! for every process mapping it.

use std::{
    collections::{HashMap, HashSet},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use pyleak_common::PyProc;

use crate::{
    attach::{self, elf::ElfFile, plan::plan_file, ProbeSpec},
    collect::{retire, Recorder},
    layers::LayerSet,
    python::{self, placed},
    symbolize::{lock, Symbolizer},
    targets::{
        alive,
        group::{self, Cgroup},
    },
};

/// How long after it starts (or execs) a process's memory map is re-read for a Python
/// runtime it has not mapped yet.
const PENDING_FOR: Duration = Duration::from_secs(10);

/// One process followed by a group target.
#[derive(Debug, Clone, Copy)]
struct Member {
    /// Traced (with `--all`, only once it shows a Python runtime).
    tracked: bool,
    /// Its Python runtime is known (or there is nothing more to learn).
    settled: bool,
    /// When it started (or exec'd), as pyleak first saw it.
    since: Instant,
    /// It exited and its kernel entries were dropped.
    reaped: bool,
}

impl Member {
    /// A process first seen now, not traced yet; `settled` as given.
    fn new(settled: bool) -> Member {
        Member {
            tracked: false,
            settled,
            since: Instant::now(),
            reaped: false,
        }
    }
}

/// The Python runtime of one file (by device and inode), as detected once.
#[derive(Debug, Clone)]
enum FileRuntime {
    /// Not a Python runtime.
    None,
    /// A CPython pyleak walks: where its runtime is, and its layouts.
    Supported(Box<python::PythonRuntime>),
    /// A CPython pyleak cannot walk (its version).
    Unsupported(String),
}

/// `--cgroup`, `--container`, `--all`: the processes of the group as they come and go,
/// and the files probed for them (each distinct file once, for every process mapping it).
pub struct Group {
    /// The traced cgroup; `None` with `--all`.
    pub cgroup: Option<Cgroup>,
    layers: LayerSet,
    python_stacks: bool,
    /// Files probed, by (device, inode).
    pub probed: HashSet<(u64, u64)>,
    /// The probed files held open for the whole recording: their probes name them as
    /// `/proc/self/fd/N`, and sampled pymalloc's windows attach them again later (the
    /// process that mapped a file may be gone by then, and an fd closed with it could be
    /// reused for another file).
    held: HashMap<(u64, u64), std::fs::File>,
    /// Runtime detection per file, by (device, inode).
    runtimes: HashMap<(u64, u64), FileRuntime>,
    /// Layout templates handed to the kernel so far.
    templates: u32,
    /// Processes seen.
    members: HashMap<u32, Member>,
    /// Traced processes that exited, oldest first: past [`retire::exited_kept`], the
    /// oldest is retired.
    exited: std::collections::VecDeque<u32>,
    /// Exited processes retired early, because a new process took their pid while they
    /// were kept whole (see [`Group::take_retired_early`]).
    retired_early: HashSet<u32>,
}

impl Group {
    pub fn new(cgroup: Option<Cgroup>, layers: LayerSet, python_stacks: bool) -> Group {
        Group {
            cgroup,
            layers,
            python_stacks,
            probed: HashSet::new(),
            held: HashMap::new(),
            runtimes: HashMap::new(),
            templates: 0,
            members: HashMap::new(),
            exited: std::collections::VecDeque::new(),
            retired_early: HashSet::new(),
        }
    }

    /// `pid` belongs to a new process (forked, exec'd, or found by a scan or by its
    /// stacks): an exited process of the same pid still kept whole is retired now. The
    /// kernel counts by pid, so the new process would otherwise add to the old one's
    /// blocks and totals (pids wrap at `kernel.pid_max`, and the allocator's next pid may
    /// be one just freed: 1 worker of 7 858 in the hour's soak of session 11). What the
    /// new process allocated before pyleak learnt of it (its first milliseconds, when a
    /// fork is announced) is retired with the old one.
    fn take_pid(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        syms: &Mutex<Symbolizer>,
        pid: u32,
    ) {
        if !self.members.get(&pid).is_some_and(|m| m.reaped) {
            return;
        }
        self.members.remove(&pid);
        self.exited.retain(|&q| q != pid);
        if let Err(e) = rec.retire(&[pid]) {
            log::warn!("retiring exited process {pid}: {e:#}");
        }
        lock(syms).forget(pid);
        resolver.forget(&HashSet::from([pid]));
        self.retired_early.insert(pid);
    }

    /// Processes seen (traced or not, alive or not), and files held open.
    pub fn footprint(&self) -> (usize, usize) {
        (self.members.len(), self.held.len())
    }

    /// How many processes are traced.
    pub fn tracked(&self) -> usize {
        self.members.values().filter(|m| m.tracked).count()
    }

    /// Looks for processes not seen yet: the cgroup's, or (with `--all`) the host's.
    pub fn scan(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        syms: &Mutex<Symbolizer>,
    ) {
        let pids: Vec<u32> = match &self.cgroup {
            Some(cg) => group::processes(&cg.dir),
            None => procfs::process::all_processes()
                .map(|it| it.flatten().map(|p| p.pid as u32).collect())
                .unwrap_or_default(),
        };
        let me = std::process::id();
        for pid in pids {
            if pid == me {
                continue;
            }
            // A member of that pid that exited: this is a new process.
            self.take_pid(rec, resolver, syms, pid);
            if self.members.contains_key(&pid) {
                continue;
            }
            self.members.insert(pid, Member::new(false));
            self.examine(rec, resolver, syms, pid);
            // Running before it was seen: what it maps now is what it runs (a program
            // that loads libpython late is re-read when it execs or allocates).
            if let Some(m) = self.members.get_mut(&pid) {
                m.settled = true;
            }
        }
    }

    /// Handles what the kernel announced: forks of members, processes that exec'd, stacks
    /// of processes not examined yet.
    pub fn poll(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        syms: &Mutex<Symbolizer>,
    ) {
        // Forks first: a worker may have forked, exec'd and exited since the last poll.
        for (child, parent, _) in std::mem::take(&mut rec.forks) {
            self.forked(rec, resolver, syms, child, parent);
        }
        for (pid, _) in std::mem::take(&mut rec.execs) {
            if pid == std::process::id() {
                continue;
            }
            // Its parent's program is no longer in its memory (stacks named so far keep
            // their names).
            resolver.forget_process(pid);
            self.take_pid(rec, resolver, syms, pid);
            let m = self.members.entry(pid).or_insert(Member::new(false));
            // A new program: its files and runtime are to be learnt again.
            m.settled = false;
            m.reaped = false;
            m.since = Instant::now();
            self.examine(rec, resolver, syms, pid);
        }
        let unseen: Vec<u32> = rec
            .new_stacks
            .iter()
            .map(|&(pid, _)| pid)
            .filter(|pid| !self.members.get(pid).is_some_and(|m| m.settled))
            .collect();
        for pid in unseen {
            self.take_pid(rec, resolver, syms, pid);
            self.members.entry(pid).or_insert(Member::new(false));
            self.examine(rec, resolver, syms, pid);
        }
    }

    /// `parent`, a traced member, forked `child`: the child maps its parent's files (probed
    /// already) and runs its parent's interpreter at the same place, so it is traced as
    /// its parent's fork at once, without reading its own memory map (it may be gone by the
    /// time this runs: a pool's short-lived worker). An exec later makes it examined anew.
    fn forked(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        syms: &Mutex<Symbolizer>,
        child: u32,
        parent: u32,
    ) {
        if child == std::process::id() || !self.members.get(&parent).is_some_and(|m| m.tracked) {
            // A parent not seen yet: the child is found by the scan, or by its stacks.
            return;
        }
        self.take_pid(rec, resolver, syms, child);
        let m = self.members.entry(child).or_insert(Member::new(true));
        m.settled = true;
        m.reaped = false;
        if !m.tracked {
            match rec.track(child) {
                Ok(()) => m.tracked = true,
                Err(e) => {
                    log::warn!("process {child}: {e}");
                    return;
                }
            }
        }
        // A fork is named as its parent until it execs, and is in its parent's cgroup
        // until moved.
        let comm = rec.comm(parent);
        rec.set_comm(child, &comm);
        if let Some(version) = rec.pythons.get(&parent).cloned() {
            rec.pythons.insert(child, version);
        }
        if let Some(cg) = rec.cgroups.get(&parent).cloned() {
            rec.cgroups.entry(child).or_insert(cg);
        }
        if self.python_stacks {
            resolver.add_fork_of(child, parent);
        }
        lock(syms).snapshot(child);
    }

    /// Re-reads the memory maps of processes whose Python runtime is not mapped yet.
    pub fn refresh(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        syms: &Mutex<Symbolizer>,
    ) {
        let pending: Vec<u32> = self
            .members
            .iter()
            .filter(|(_, m)| !m.settled && !m.reaped && m.since.elapsed() < PENDING_FOR)
            .map(|(&pid, _)| pid)
            .collect();
        for pid in pending {
            self.examine(rec, resolver, syms, pid);
        }
        let mut syms = lock(syms);
        for (&pid, m) in &self.members {
            if m.tracked && !m.reaped {
                syms.snapshot(pid);
                rec.refresh_comm(pid);
            }
        }
    }

    /// The pids whose exited process was retired early since the last call, because a new
    /// process took the pid: what else pyleak keeps per pid (growth series) starts again
    /// for the new one. Symbols and Python runtimes were dropped when it happened.
    pub fn take_retired_early(&mut self) -> HashSet<u32> {
        std::mem::take(&mut self.retired_early)
    }

    /// Drops the kernel entries of traced processes that exited (their events are all
    /// read by now), and forgets untraced ones. Past the last [`retire::exited_kept`]
    /// exited processes, retires the oldest (`collect::retire`) and returns them: the
    /// caller drops what the rest of pyleak keeps of them.
    pub fn reap(&mut self, rec: &mut Recorder) -> HashSet<u32> {
        let exited = &mut self.exited;
        self.members.retain(|&pid, m| {
            if m.reaped || alive(pid) {
                return true;
            }
            if !m.tracked {
                return false;
            }
            rec.forget(pid);
            m.reaped = true;
            exited.push_back(pid);
            true
        });
        let keep = retire::exited_kept();
        let mut gone = HashSet::new();
        while self.exited.len() > keep {
            let Some(pid) = self.exited.pop_front() else {
                break;
            };
            // Still reaped: not a pid reused by a process traced since.
            if self.members.get(&pid).is_some_and(|m| m.reaped) {
                self.members.remove(&pid);
                gone.insert(pid);
            }
        }
        if !gone.is_empty() {
            let pids: Vec<u32> = gone.iter().copied().collect();
            if let Err(e) = rec.retire(&pids) {
                log::warn!("retiring exited processes: {e:#}");
            }
        }
        gone
    }

    /// Looks at the files `pid` maps: probes the ones not probed yet, places its Python
    /// runtime, starts tracing it.
    fn examine(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        syms: &Mutex<Symbolizer>,
        pid: u32,
    ) {
        let Ok(mut files) = attach::mapped_file_handles(pid) else {
            // Gone already: what it did is in the kernel's maps under its pid.
            if let Some(m) = self.members.get_mut(&pid) {
                m.settled = true;
            }
            return;
        };
        let t0 = Instant::now();
        if self.cgroup.is_some() && self.members.get(&pid).is_some_and(|m| !m.settled) {
            // Just exec'd, perhaps: what its loader is about to map.
            files.extend(
                attach::needed_in_root(pid)
                    .into_iter()
                    .map(|p| (p.clone(), p)),
            );
        }
        // Each distinct file once, held open and read through /proc/self/fd: the process
        // may exit meanwhile, taking its /proc/PID/root and map_files with it.
        let mut cands: Vec<(PathBuf, std::fs::File, (u64, u64))> = Vec::new();
        for (f, mapped) in &files {
            let malloc = attach::is_libc(f) || attach::is_malloc_replacement(f);
            if !(malloc || attach::may_hold_python(f)) {
                continue;
            }
            let Ok(open) = std::fs::File::open(mapped).or_else(|_| std::fs::File::open(f)) else {
                continue;
            };
            let Ok(meta) = open.metadata() else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            if !cands.iter().any(|c| c.2 == key) {
                cands.push((f.clone(), open, key));
            }
        }
        let via =
            |open: &std::fs::File| PathBuf::from(format!("/proc/self/fd/{}", open.as_raw_fd()));
        // libc (and a replacement malloc) first: a process that just exec'd is about to
        // allocate, and its loader may not have mapped libc yet (the probe then lands when
        // it does).
        let is_malloc = |f: &Path| attach::is_libc(f) || attach::is_malloc_replacement(f);
        for (f, open, key) in cands.iter().filter(|c| is_malloc(&c.0)) {
            if !self.probed.contains(key) {
                let probes = plan_file(self.layers, f, &via(open));
                self.attach(rec, &probes, f, *key);
                log::debug!(
                    "process {pid}: {} probed after {:?}",
                    f.display(),
                    t0.elapsed()
                );
            }
        }
        // Then the Python runtime, its probes and the layout template the kernel applies
        // when the interpreter starts.
        let mut runtime = FileRuntime::None;
        for (f, open, key) in cands.iter().filter(|c| attach::may_hold_python(&c.0)) {
            if !self.runtimes.contains_key(key) {
                let rt = self.detect(f, &via(open));
                self.runtimes.insert(*key, rt);
            }
            if !self.probed.contains(key) {
                let mut probes = plan_file(self.layers, f, &via(open));
                if let Some(FileRuntime::Supported(rt)) = self.runtimes.get(key).cloned() {
                    probes.extend(self.init_probe(rec, &via(open), &rt));
                }
                self.attach(rec, &probes, f, *key);
            }
            match self.runtimes.get(key) {
                Some(FileRuntime::Supported(rt)) => {
                    let mut rt = rt.clone();
                    rt.file = f.clone();
                    runtime = FileRuntime::Supported(rt);
                }
                Some(FileRuntime::Unsupported(v)) => runtime = FileRuntime::Unsupported(v.clone()),
                _ => {}
            }
        }
        for (_, open, key) in cands {
            if self.probed.contains(&key) {
                self.held.entry(key).or_insert(open);
            }
        }
        let in_cgroup = self.cgroup.is_some();
        if let Some(m) = self.members.get_mut(&pid) {
            let is_python = !matches!(runtime, FileRuntime::None);
            if !m.tracked && (in_cgroup || is_python) {
                match rec.track(pid) {
                    Ok(()) => m.tracked = true,
                    Err(e) => log::warn!("process {pid}: {e}"),
                }
            }
            if m.tracked {
                self.place(rec, resolver, pid, &runtime);
            }
        }
        if self.members.get(&pid).is_some_and(|m| m.tracked) {
            lock(syms).snapshot(pid);
        }
        log::debug!("process {pid} examined in {:?}", t0.elapsed());
    }

    /// Probes the C library pyleak itself runs with.
    pub fn probe_own_libc(&mut self, rec: &mut Recorder) {
        let me = std::process::id();
        for (f, mapped) in attach::mapped_file_handles(me).unwrap_or_default() {
            if !attach::is_libc(&f) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&mapped) else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            if self.probed.contains(&key) {
                continue;
            }
            // The file as any process names it, not through pyleak's own /proc entry.
            let shown = f
                .strip_prefix(format!("/proc/{me}/root"))
                .map(|p| Path::new("/").join(p))
                .unwrap_or(f);
            let probes = plan_file(self.layers, &shown, &shown);
            self.attach(rec, &probes, &shown, key);
        }
    }

    /// Attaches `probes` for every process mapping `file`; on success the file counts as
    /// probed.
    fn attach(&mut self, rec: &mut Recorder, probes: &[ProbeSpec], file: &Path, key: (u64, u64)) {
        match rec.attach_file_wide(probes, file) {
            Ok(()) => {
                self.probed.insert(key);
            }
            Err(e) => eprintln!(
                "pyleak: warning: {e:#}: calls in {} are not seen",
                file.display()
            ),
        }
    }

    /// Tells the kernel (and the resolver) where `pid`'s Python runtime is.
    fn place(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        pid: u32,
        runtime: &FileRuntime,
    ) {
        let Some(m) = self.members.get_mut(&pid) else {
            return;
        };
        match runtime {
            FileRuntime::Supported(rt) => {
                let Some(bias) = python::load_bias(pid, rt) else {
                    log::debug!("process {pid}: {} not mapped yet", rt.file.display());
                    return;
                };
                if self.python_stacks {
                    if let Err(e) = rec.set_python(pid, &placed(pid, rt, bias, rt.walk), rt.key) {
                        log::warn!("process {pid}: {e}");
                    }
                    resolver.add_process(pid, rt);
                    // A fork of another member (a pool's worker) runs its parent's code
                    // objects at the same addresses: the resolver names its frames from
                    // the family's memory once it has exited. Forked, not exec'd: the
                    // same `start_brk` (an exec places a new, randomized heap).
                    let stat = |p| crate::proctext::Stat::of(p);
                    if let Some(child) = stat(pid) {
                        let parent = stat(child.ppid);
                        if resolver.knows(child.ppid)
                            && parent
                                .is_some_and(|p| p.start_brk == child.start_brk && p.start_brk != 0)
                        {
                            resolver.note_fork(pid, child.ppid);
                        }
                    }
                }
                rec.pythons
                    .insert(pid, python::version_name(rt.cpython.version()));
                m.settled = true;
            }
            FileRuntime::Unsupported(v) => {
                rec.pythons.insert(pid, v.clone());
                m.settled = true;
            }
            FileRuntime::None => {}
        }
    }

    /// The probe that applies `rt`'s frame layout to processes of the group that start
    /// `file`'s interpreter later, with the kernel's template for it.
    fn init_probe(
        &mut self,
        rec: &mut Recorder,
        file: &Path,
        rt: &python::PythonRuntime,
    ) -> Option<ProbeSpec> {
        if !self.python_stacks || self.templates >= pyleak_common::PY_TEMPLATES_ENTRIES {
            return None;
        }
        let template = PyProc {
            runtime_vaddr: rt.runtime_vaddr.wrapping_sub(4096),
            bias: 0,
            ..rt.walk
        };
        let mut init = attach::plan_py_init(&ElfFile::open(file).ok()?)?;
        rec.set_template(self.templates, &template, rt.key).ok()?;
        init.cookie = pyleak_common::py_init_cookie(init.cookie, Some(self.templates));
        self.templates += 1;
        Some(init)
    }
    /// Detects the Python runtime in `file`, read through `via` (once per file).
    fn detect(&mut self, file: &Path, via: &Path) -> FileRuntime {
        match python::detect_via(file, via) {
            Some(python::Detected::Supported(rt)) => {
                log::info!("{}", python::describe(&rt));
                if let Some(w) = &rt.warning {
                    eprintln!("pyleak: warning: {w}");
                }
                FileRuntime::Supported(rt)
            }
            Some(python::Detected::Unsupported { file, version }) => {
                eprintln!(
                    "pyleak: warning: {} is CPython {version}, whose frames pyleak cannot walk (it walks 3.8 to 3.14 with the GIL): native stacks only",
                    crate::attach::as_process_names(&file)
                );
                FileRuntime::Unsupported(version)
            }
            None => FileRuntime::None,
        }
    }
}
