//! Loading the probes, attaching them to targets, and reading back what they gathered.

mod budget;
pub mod bulk;
pub mod cow;
pub mod frames;
pub mod lines;
pub mod probes;
mod read;
pub mod retire;
mod snapshot;
mod table;
pub mod vm;
pub mod window;

use std::{collections::HashMap, path::Path};

use anyhow::Context as _;
use aya::{
    maps::{HashMap as BpfHashMap, MapData, RingBuf},
    programs::{trace_point::TracePointLink, uprobe::UProbeLink, TracePoint, UProbe},
    Ebpf, EbpfLoader,
};
use pyleak_common::{
    names, Layer, PyProc, VmEvent, VmKind, FILTER_CGROUP, FILTER_PIDS, FILTER_PID_SET,
    TARGET_ACTIVE, TARGET_FROZEN,
};

use crate::{
    attach::ProbeSpec,
    errors::UserError,
    layers::LayerSet,
    multi_uprobe::{MultiLink, MultiPrograms},
};

pub use self::snapshot::*;
use self::{vm::VmModel, window::Windows};

/// Settings for [`Recorder::load`].
#[derive(Debug, Clone)]
pub struct RecorderOptions {
    /// Layers to probe.
    pub layers: LayerSet,
    /// Native frames kept per stack.
    pub native_depth: u32,
    /// Attach empty programs at the same points (benchmark floor).
    pub bare: bool,
    /// Which processes the kernel counts.
    pub filter: Filter,
    /// Sample the pymalloc layer in windows rather than trap every call.
    pub pymalloc_sampled: bool,
    /// With [`Filter::Pids`]: trace the targets' new processes too (forks, exec'd programs).
    pub follow_children: bool,
    /// A launched command (ptraced by pyleak) to stop at its interpreter's shutdown
    /// (`attach::plan_finalize`), its state read before the interpreter tears it down (0:
    /// none); see `targets::launch::Launched`.
    pub hold_at_finalize: u32,
}

/// Which processes the kernel counts, and how uprobes are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// The processes added with [`Recorder::add_target`], probed one by one.
    Pids,
    /// Every process in a cgroup and its descendants; uprobes on whole files.
    Cgroup {
        /// The cgroup's id (its directory's inode).
        id: u64,
        /// Its level in the hierarchy.
        level: u32,
    },
    /// The processes added with [`Recorder::track`]; uprobes on whole files (`--all`).
    PidSet,
}

impl Filter {
    /// Whether uprobes sit on whole files (every process mapping them) rather than on one
    /// process each.
    pub fn file_wide(self) -> bool {
        self != Filter::Pids
    }
}

/// Loaded programs, attached probes and the userspace side of the vm/pages layers.
pub struct Recorder {
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    opts: RecorderOptions,
    /// How uprobes are placed: multi-uprobe links, or one perf event per probe.
    uprobes: Uprobes,
    /// Seconds spent attaching uprobes so far.
    pub attach_s: f64,
    /// The tracepoints' links (each one's detach waits for RCU grace periods).
    tracepoint_links: Vec<TracePointLink>,
    /// Sampled pymalloc tracing's windows, when on.
    windows: Option<Windows>,
    /// Sampled pymalloc tracing's samples and estimates.
    book: window::SampleBook,
    /// The vm and pages layers.
    pub model: VmModel,
    /// Where the bulk pass reads page tables (`bulk`).
    page_table: bulk::ProcPageTable,
    /// Traced processes, in the order they were added.
    pub targets: Vec<u32>,
    /// Probes attached, for the report.
    pub probes: Vec<ProbeSpec>,
    /// Command names of the targets, read when they were added.
    comms: HashMap<u32, String>,
    /// Stacks with Python frames announced since last taken: (pid, stack id).
    pub new_stacks: Vec<(u32, u64)>,
    /// Processes that called exec since last taken (`--cgroup`, `--all`, followed targets),
    /// with the kernel's time of the exec (`CLOCK_MONOTONIC` ns).
    pub execs: Vec<(u32, u64)>,
    /// New processes of followed targets since last taken: (child, parent, the kernel's
    /// time of the fork in `CLOCK_MONOTONIC` ns).
    pub forks: Vec<(u32, u32, u64)>,
    /// Cgroup v2 path of each target, read when it was added.
    pub cgroups: HashMap<u32, String>,
    /// CPython version of each target that runs one.
    pub pythons: HashMap<u32, String>,
    /// Exited processes retired (group targets), and what they left live.
    retired: retire::Retired,
    /// Where the kernel's first-line cache may be used.
    code_watch: lines::CodeWatch,
}

const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pyleak"));

/// pyleak's uprobe programs: name, and whether it runs at the function's return.
const UPROBE_PROGRAMS: [(&str, bool); 15] = [
    (names::ALLOC_ENTER, false),
    (names::CODE_DEALLOC_ENTER, false),
    (names::ALLOC_EXIT, true),
    (names::FREE_ENTER, false),
    (names::PY_FINALIZE_ENTER, false),
    (names::PY_INIT_ENTER, false),
    (names::SITE_ENTER, false),
    (names::SITE_JOIN, false),
    (names::SITE_JOIN_RET, true),
    (names::REUSE_ENTER, false),
    (names::REUSE_EXIT, true),
    (names::REUSE_HOLDER_ENTER, false),
    (names::REUSE_HOLDER_EXIT, true),
    (names::BARE_ENTER, false),
    (names::BARE_EXIT, true),
];

/// Set (to anything) to place one perf event per uprobe even where the kernel has
/// multi-uprobe links: the fallback path, for tests and for comparison.
pub const NO_MULTI_ENV: &str = "PYLEAK_NO_MULTI_UPROBE";

/// How uprobes are placed.
enum Uprobes {
    /// One multi-uprobe link per (program, file, call): detached together.
    Multi {
        programs: MultiPrograms,
        links: Vec<MultiLink>,
    },
    /// One perf event per probe (kernels without multi-uprobe links): aya's links, taken
    /// from their programs so they can be detached before the report is written.
    PerfEvents(Vec<UProbeLink>),
}

impl Recorder {
    /// Loads the programs and attaches the tracepoints (they filter by process in the kernel).
    pub fn load(opts: RecorderOptions) -> anyhow::Result<Recorder> {
        crate::tracefs::ensure_mounted()?;
        let (mode, cgroup_id, cgroup_level) = match opts.filter {
            Filter::Pids => (FILTER_PIDS, 0u64, 0u32),
            Filter::Cgroup { id, level } => (FILTER_CGROUP, id, level),
            Filter::PidSet => (FILTER_PID_SET, 0, 0),
        };
        let mut loader = EbpfLoader::new();
        // Tests shrink maps to fill them on purpose: `PYLEAK_TEST_MAP_ENTRIES=EVENTS=4096,…`.
        let shrunk = std::env::var("PYLEAK_TEST_MAP_ENTRIES").unwrap_or_default();
        for (name, n) in shrunk.split(',').filter_map(|kv| kv.split_once('=')) {
            loader.map_max_entries(name, n.parse().context("PYLEAK_TEST_MAP_ENTRIES")?);
        }
        let mut ebpf = loader
            .override_global("NATIVE_DEPTH", &opts.native_depth, true)
            .override_global("FILTER_MODE", &mode, true)
            .override_global("CGROUP_ID", &cgroup_id, true)
            .override_global("CGROUP_LEVEL", &cgroup_level, true)
            .override_global(
                names::PYMALLOC_SAMPLED,
                &(opts.pymalloc_sampled as u32),
                true,
            )
            .override_global(
                names::FOLLOW_CHILDREN,
                &(opts.follow_children as u32),
                true,
            )
            .override_global(names::HOLD_AT_FINALIZE, &opts.hold_at_finalize, true)
            .load(EBPF_OBJECT)
            .map_err(|e| {
                let chain = error_chain(&e);
                // ENOMEM: the maps did not fit (a memory cgroup's limit, most often).
                if chain.contains("(os error 12)") {
                    let need_mib = budget::maps_bytes(EBPF_OBJECT).div_ceil(1 << 20);
                    // pyleak's own memory besides, and what the estimate leaves out, with
                    // room: `pyleak record -- /bin/true` under a v1 memory limit (2 CPUs)
                    // was killed at 170 MiB and ran at 175, against an estimate of 138.
                    let advice = budget::own_memory_limit().map_or_else(
                        || ": free that much memory on the host".to_owned(),
                        |(cg, l)| {
                            format!(
                                ", charged to pyleak's memory cgroup {cg}, limited to {} MiB: raise its limit to at least {} MiB, or run pyleak outside it",
                                l >> 20,
                                need_mib + 50
                            )
                        },
                    );
                    UserError::MapMemory { need_mib, advice }
                } else {
                    UserError::Ebpf(chain)
                }
            })?;
        let uprobes = match load_multi(&ebpf) {
            Ok(programs) => Uprobes::Multi {
                programs,
                links: Vec::new(),
            },
            Err(why) => {
                if let Some(why) = why {
                    eprintln!("pyleak: note: multi-uprobe links unavailable ({why}); placing one perf event per probe instead (detaching takes ~0.1 s per probe)");
                }
                for (name, _) in UPROBE_PROGRAMS {
                    uprobe(&mut ebpf, name)?
                        .load()
                        .with_context(|| format!("loading {name}"))?;
                }
                Uprobes::PerfEvents(Vec::new())
            }
        };
        if std::env::var_os("PYLEAK_VERIFIER_STATS").is_some() {
            // For developers: how close each program is to the verifier's 1M-instruction
            // budget.
            for (name, prog) in ebpf.programs() {
                if let Ok(info) = prog.info() {
                    eprintln!(
                        "pyleak: {name}: {} instructions verified",
                        info.verified_instruction_count().unwrap_or(0)
                    );
                }
            }
        }
        let mut tracepoints: Vec<(&str, &str, &str)> =
            vec![("sched_process_exit", "sched", "sched_process_exit")];
        // Always: an exec also ends the code objects the kernel's first-line cache knows.
        tracepoints.push((names::SCHED_PROCESS_EXEC, "sched", "sched_process_exec"));
        if opts.filter.file_wide() || (opts.filter == Filter::Pids && opts.follow_children) {
            tracepoints.push((names::TASK_NEWTASK, "task", "task_newtask"));
        }
        // The benchmark's floor attaches an empty program wherever a layer's would go.
        let program = |real| if opts.bare { names::BARE_TP } else { real };
        if opts.layers.contains(Layer::Vm) || opts.layers.contains(Layer::Pages) {
            // Unmaps and the break matter to the pages layer too.
            for sc in ["mmap", "munmap", "mremap", "brk", "madvise"] {
                tracepoints.push((
                    program("sys_enter_vm"),
                    "syscalls",
                    leak_name(format!("sys_enter_{sc}")),
                ));
                tracepoints.push((
                    program("sys_exit_vm"),
                    "syscalls",
                    leak_name(format!("sys_exit_{sc}")),
                ));
            }
        }
        if opts.layers.contains(Layer::Pages) {
            tracepoints.push((program("page_fault"), "exceptions", "page_fault_user"));
            tracepoints.push((program("page_fault"), "exceptions", "page_fault_kernel"));
        }
        let mut tracepoint_links = Vec::new();
        for (prog, category, name) in tracepoints {
            let tp: &mut TracePoint = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing"))?
                .try_into()?;
            if tp.fd().is_err() {
                tp.load().with_context(|| format!("loading {prog}"))?;
            }
            let id = tp.attach(category, name).map_err(|e| {
                UserError::Ebpf(format!("attaching tracepoint {category}:{name}: {e}"))
            })?;
            tracepoint_links.push(tp.take_link(id)?);
        }
        let sampled = opts.pymalloc_sampled && matches!(uprobes, Uprobes::Multi { .. });
        if opts.pymalloc_sampled && !sampled {
            eprintln!("pyleak: note: sampled pymalloc tracing needs multi-uprobe links; tracing every pymalloc call instead (--pymalloc exact)");
        }
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("map EVENTS missing")?)?;
        Ok(Recorder {
            ebpf,
            ring,
            opts,
            uprobes,
            attach_s: 0.0,
            tracepoint_links,
            windows: sampled.then(Windows::default),
            book: window::SampleBook::default(),
            model: VmModel::default(),
            page_table: bulk::ProcPageTable::default(),
            targets: Vec::new(),
            probes: Vec::new(),
            comms: HashMap::new(),
            retired: retire::Retired::default(),
            new_stacks: Vec::new(),
            execs: Vec::new(),
            forks: Vec::new(),
            cgroups: HashMap::new(),
            pythons: HashMap::new(),
            code_watch: lines::CodeWatch::default(),
        })
    }

    /// Marks `pid` traced (not frozen) in the kernel's target map.
    fn mark_active(&mut self, pid: u32) -> anyhow::Result<()> {
        let mut targets: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("TARGETS")
                .context("map TARGETS missing")?,
        )?;
        targets.insert(pid, TARGET_ACTIVE, 0)?;
        Ok(())
    }

    /// `--cgroup`, `--all`: starts following `pid` in userspace (its vm model, name and
    /// cgroup); with `--all` also marks it traced in the kernel.
    pub fn track(&mut self, pid: u32) -> anyhow::Result<()> {
        if self.opts.filter == Filter::PidSet {
            self.mark_active(pid)?;
        }
        // A pid retired earlier and now reused by a new process.
        self.retired.pids.remove(&pid);
        if !self.targets.contains(&pid) {
            self.model.add_process(pid, current_brk(pid));
            if self.windows.is_some() {
                self.model.note_earlier_arenas(pid);
            }
            self.targets.push(pid);
        }
        self.refresh_comm(pid);
        if let Some(cg) = crate::targets::group::of_process(pid) {
            self.cgroups.insert(pid, cg);
        }
        Ok(())
    }

    /// `--cgroup`, `--all`: `pid` has exited and its last events are read; drops its
    /// kernel entries (the frozen mark, the Python layout) so the maps stay bounded. What
    /// it left live stays in the maps for the report.
    pub fn forget(&mut self, pid: u32) {
        if let Ok(mut targets) = BpfHashMap::<_, u32, u32>::try_from(
            self.ebpf.map_mut(names::TARGETS).expect("map TARGETS"),
        ) {
            let _ = targets.remove(&pid);
        }
        if let Ok(mut procs) = BpfHashMap::<_, u32, PyProc>::try_from(
            self.ebpf.map_mut(names::PY_PROCS).expect("map PY_PROCS"),
        ) {
            let _ = procs.remove(&pid);
        }
        let _ = self.py_procs_changed();
        self.forget_code_watch(pid);
    }

    /// Reads every event waiting in the ring buffer into the vm model; returns how many.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<VmEvent>() {
                // SAFETY: the kernel wrote a whole VmEvent; read_unaligned copes with the
                // ring buffer's 8-byte alignment.
                let ev: VmEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                if ev.kind != VmKind::Exec as u32 && self.retired.pids.contains(&ev.tgid) {
                    // The last events of a retired process: nothing of it is kept.
                } else if ev.kind == VmKind::NewStack as u32 {
                    self.new_stacks.push((ev.tgid, ev.stack_id));
                } else if ev.kind == VmKind::Fork as u32 {
                    // Its break is its parent's until it moves it.
                    self.model.fork(ev.arg as u32, ev.tgid, ev.arg2);
                    self.forks.push((ev.tgid, ev.arg as u32, ev.ts_ns));
                } else {
                    if ev.kind == VmKind::Exec as u32 {
                        self.execs.push((ev.tgid, ev.ts_ns));
                        self.page_table.forget(ev.tgid);
                    }
                    self.model.apply(&ev);
                }
            }
            n += 1;
        }
        if !self.model.bulk_pending.is_empty() {
            bulk::pass(&mut self.model, &mut self.page_table, Some(monotonic_ns()));
        }
        n
    }

    /// Looks around every fault not looked at yet (`bulk`), young ones included: for the
    /// end of a recording, once the targets are frozen.
    pub fn settle_bulk_pages(&mut self) {
        bulk::pass(&mut self.model, &mut self.page_table, None);
    }

    /// The ring buffer, to wait on.
    pub fn ring_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.ring.as_fd()
    }

    /// Makes every target's state final (frees stop counting), as at the end of a recording.
    pub fn freeze_all(&mut self) -> anyhow::Result<()> {
        let mut targets: BpfHashMap<_, u32, u32> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(names::TARGETS)
                .context(concat!("map ", "TARGETS", " missing"))?,
        )?;
        for &pid in &self.targets {
            targets.insert(pid, TARGET_FROZEN, 0)?;
        }
        // Uprobes look at TARGETS only once some target is frozen.
        let mut frozen: aya::maps::Array<_, u32> = aya::maps::Array::try_from(
            self.ebpf.map_mut(names::FROZEN_COUNT).context(concat!(
                "map ",
                "FROZEN_COUNT",
                " missing"
            ))?,
        )?;
        frozen.set(0, self.targets.len().max(1) as u32, 0)?;
        Ok(())
    }

    /// Whether the kernel has frozen `pid` (interpreter shutdown or exit).
    pub fn is_frozen(&self, pid: u32) -> bool {
        self.model.procs.get(&pid).is_some_and(|p| p.frozen)
    }

    /// Whether the kernel has frozen `pid` (its interpreter began shutting down), read from
    /// the target map now rather than from the freeze event userspace may not have
    /// drained yet: what a process frees while it tears down is not a verdict on its heap.
    pub fn frozen_in_kernel(&self, pid: u32) -> bool {
        let Some(map) = self.ebpf.map(names::TARGETS) else {
            return false;
        };
        let Ok(targets) = BpfHashMap::<_, u32, u32>::try_from(map) else {
            return false;
        };
        targets
            .get(&pid, 0)
            .is_ok_and(|s| s == pyleak_common::TARGET_FROZEN)
    }

    /// What pyleak's own memory holds per process, for `RUST_LOG=debug` (soaks): one line.
    pub fn footprint(&self) -> String {
        let (known, heaps, lines) = self.book.sizes();
        let pages: usize = self.model.procs.values().map(|p| p.pages.len()).sum();
        let regions: usize = self.model.procs.values().map(|p| p.regions.len()).sum();
        format!(
            "vm model: {} processes, {regions} regions, {pages} pages, {} stacks, {} copy-on-write stacks; samples: {} known, {} heaps, {} lines; {} comms, {} targets",
            self.model.procs.len(),
            self.model.stacks.len(),
            self.model.cow_stacks.len(),
            known,
            heaps,
            lines,
            self.comms.len(),
            self.targets.len(),
        )
    }

    /// Re-reads the command name of `pid` (it changes at exec).
    pub fn refresh_comm(&mut self, pid: u32) {
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            if self.comms.get(&pid).map(String::as_str) != Some(c.trim()) {
                self.comms.insert(pid, c.trim().to_owned());
            }
        }
    }

    /// Sets the command name of `pid` until it can be read (a launched command before exec).
    pub fn set_comm(&mut self, pid: u32, comm: &str) {
        self.comms.insert(pid, comm.to_owned());
    }

    /// The command name of `pid`, as last read.
    pub fn comm(&self, pid: u32) -> String {
        self.comms
            .get(&pid)
            .cloned()
            .unwrap_or_else(|| "?".to_owned())
    }
}

impl std::ops::Drop for Recorder {
    /// Every way out (an error, a signal, the end) detaches through the parallel path.
    fn drop(&mut self) {
        self.detach_probes();
    }
}

/// What one multi-uprobe link is for: a program, whether it runs at returns, a file.
type LinkKey<'a> = (&'static str, bool, &'a Path);

/// Drops `links` from up to 32 threads at once: each detach waits for grace periods that
/// concurrent waiters share.
pub(super) fn close_in_parallel<T: Send>(mut links: Vec<T>) {
    let per_thread = links.len().div_ceil(32).max(1);
    std::thread::scope(|s| {
        while !links.is_empty() {
            let chunk: Vec<T> = links.drain(..per_thread.min(links.len())).collect();
            s.spawn(move || drop(chunk));
        }
    });
}

/// Loads the uprobe programs for multi-uprobe links; `Err(None)` when the user asked for
/// perf events, `Err(Some(why))` when the kernel refused.
fn load_multi(ebpf: &Ebpf) -> Result<MultiPrograms, Option<String>> {
    if std::env::var_os(NO_MULTI_ENV).is_some() {
        return Err(None);
    }
    let names: Vec<&str> = UPROBE_PROGRAMS.iter().map(|&(n, _)| n).collect();
    MultiPrograms::load(EBPF_OBJECT, ebpf, &names).map_err(|e| Some(error_chain(&e)))
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing"))?
        .try_into()?)
}

/// Tracepoint names are `&str` in aya's API; these few live for the whole run.
fn leak_name(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The current program break of `pid`: the end of its `[heap]`, or `start_brk` when it
/// has no heap yet.
fn current_brk(pid: u32) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    if let Some(heap) = crate::proctext::maps(&maps).find(|m| m.path == "[heap]") {
        return Some(heap.end);
    }
    Some(crate::proctext::Stat::of(pid)?.start_brk).filter(|&b| b != 0)
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSymbol as _};
    use pyleak_common::names;

    /// The names userspace uses are the kernel side's: every map, program and setting of
    /// `pyleak_common::names` is a symbol of the built eBPF object.
    #[test]
    fn every_shared_name_is_in_the_ebpf_object() {
        let obj = object::File::parse(super::EBPF_OBJECT).expect("the eBPF object parses");
        let symbols: std::collections::HashSet<&str> =
            obj.symbols().filter_map(|s| s.name().ok()).collect();
        for name in names::MAPS
            .iter()
            .chain(&names::PROGRAMS)
            .chain(&names::SETTINGS)
        {
            assert!(symbols.contains(name), "{name} is not in the eBPF object");
        }
        // And the other way: every program of the object is named there (the leftover
        // checks of the tests find pyleak's programs by these names).
        let obj = aya_obj::Object::parse(super::EBPF_OBJECT).expect("aya-obj parses it");
        let mut programs: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        programs.sort_unstable();
        let mut named = names::PROGRAMS.to_vec();
        named.sort_unstable();
        assert_eq!(programs, named);
    }
}
