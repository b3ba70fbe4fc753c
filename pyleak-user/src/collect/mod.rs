//! Loading the probes, attaching them to targets, and reading back what they gathered.

mod table;
pub mod vm;
pub mod window;

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    path::Path,
};

use anyhow::Context as _;
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        trace_point::TracePointLink,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use pyleak_common::{
    AllocKey, Drop, Layer, LayerStats, LiveAlloc, PyProc, StackAgg, StackAggSlot, StackKey,
    StackTrace, VmEvent, VmKind, FILTER_CGROUP, FILTER_PIDS, FILTER_PID_SET, FLAG_FOR_PYMALLOC,
    FLAG_FOR_PYMEM_RAW, HIST_BUCKETS, NUM_DROPS, NUM_LAYERS, TARGET_ACTIVE, TARGET_FROZEN,
};

use crate::{
    attach::{ProbeRole, ProbeSpec},
    errors::UserError,
    layers::LayerSet,
    multi_uprobe::{MultiLink, MultiPrograms},
};

use self::{vm::VmModel, window::Windows};

/// What the kernel side gathered, read at the end of a recording.
pub struct Snapshot {
    /// Per-layer counters of the uprobe layers, summed over CPUs.
    pub layer_stats: [LayerStats; NUM_LAYERS],
    /// Size histograms of the uprobe layers: `[layer][bucket]` counts.
    pub size_hist: Vec<Vec<u64>>,
    /// Per (pid, layer, stack) totals of the uprobe layers.
    pub stacks: HashMap<(u32, Layer, u64), StackAgg>,
    /// Lost events by reason (kernel and userspace).
    pub drops: BTreeMap<&'static str, u64>,
    /// Lifetimes of freed blocks of the uprobe layers: `[layer][bucket]` counts, in µs.
    pub lifetime_hist: Vec<Vec<u64>>,
    /// Ages of what is live, per (pid, layer, stack): every block of the uprobe layers;
    /// of the vm and pages layers, anonymous memory no probed allocator made.
    pub ages: HashMap<(u32, Layer, u64), Ages>,
    /// Live bytes of pymalloc requests small enough to be served from its arenas.
    pub pymalloc_small_live: u64,
    /// Live libc bytes allocated on behalf of pymalloc or PyMem_Raw.
    pub libc_for_python_live: u64,
    /// With sampled pymalloc tracing: its windows, samples and estimates (the pymalloc
    /// figures above are then estimates for the whole recording).
    pub sampled: Option<window::SampledPymalloc>,
}

/// One (pid, layer, stack).
pub type StackSlot = (u32, Layer, u64);

/// Requests pymalloc serves from its arenas (larger ones go to `PyMem_RawMalloc`).
pub const PYMALLOC_SMALL_REQUEST: u64 = 512;

/// How old the live blocks of one (pid, layer, stack) are, at the end of the recording.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ages {
    /// Live bytes at least `min_age` old.
    pub aged_bytes: u64,
    /// Live blocks at least `min_age` old.
    pub aged_count: u64,
    /// Age of the oldest live block, in nanoseconds.
    pub oldest_ns: u64,
    /// All live bytes counted (aged or not).
    pub bytes: u64,
    /// All live blocks counted.
    pub count: u64,
}

impl Ages {
    /// Counts one live block of `bytes` that is `age_ns` old.
    pub fn add(&mut self, bytes: u64, age_ns: u64, min_age_ns: u64) {
        if age_ns >= min_age_ns {
            self.aged_bytes += bytes;
            self.aged_count += 1;
        }
        self.oldest_ns = self.oldest_ns.max(age_ns);
        self.bytes += bytes;
        self.count += 1;
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

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
    /// Traced processes, in the order they were added.
    pub targets: Vec<u32>,
    /// Probes attached, for the report.
    pub probes: Vec<ProbeSpec>,
    /// Command names of the targets, read when they were added.
    comms: HashMap<u32, String>,
    /// Stacks with Python frames announced since last taken: (pid, stack id).
    pub new_stacks: Vec<(u32, u64)>,
    /// Processes that called exec since last taken (`--cgroup`, `--all`).
    pub execs: Vec<u32>,
    /// Cgroup v2 path of each target, read when it was added.
    pub cgroups: HashMap<u32, String>,
    /// CPython version of each target that runs one.
    pub pythons: HashMap<u32, String>,
}

const EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pyleak"));

/// pyleak's uprobe programs: name, and whether it runs at the function's return.
const UPROBE_PROGRAMS: [(&str, bool); 10] = [
    ("alloc_enter", false),
    ("alloc_exit", true),
    ("free_enter", false),
    ("py_finalize_enter", false),
    ("py_init_enter", false),
    ("site_enter", false),
    ("site_join", false),
    ("site_join_ret", true),
    ("bare_enter", false),
    ("bare_exit", true),
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
        let mut ebpf = EbpfLoader::new()
            .override_global("NATIVE_DEPTH", &opts.native_depth, true)
            .override_global("FILTER_MODE", &mode, true)
            .override_global("CGROUP_ID", &cgroup_id, true)
            .override_global("CGROUP_LEVEL", &cgroup_level, true)
            .override_global("PYMALLOC_SAMPLED", &(opts.pymalloc_sampled as u32), true)
            .load(EBPF_OBJECT)
            .map_err(|e| UserError::Ebpf(error_chain(&e)))?;
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
        if opts.filter.file_wide() {
            tracepoints.push(("sched_process_exec", "sched", "sched_process_exec"));
        }
        // The benchmark's floor attaches an empty program wherever a layer's would go.
        let program = |real| if opts.bare { "bare_tp" } else { real };
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
            targets: Vec::new(),
            probes: Vec::new(),
            comms: HashMap::new(),
            new_stacks: Vec::new(),
            execs: Vec::new(),
            cgroups: HashMap::new(),
            pythons: HashMap::new(),
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

    /// Starts tracing `pid`: marks it in the kernel and attaches `probes` for it alone.
    pub fn add_target(&mut self, pid: u32, probes: &[ProbeSpec]) -> anyhow::Result<()> {
        self.mark_active(pid)?;
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(UserError::NoSuchPid(pid))?);
        self.attach(probes, scope).map_err(|e| {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                anyhow::Error::from(UserError::ProcessGone(pid))
            } else {
                e
            }
        })?;
        self.model.add_process(pid, current_brk(pid));
        if self.windows.is_some() {
            self.model.note_earlier_arenas(pid);
        }
        self.refresh_comm(pid);
        self.targets.push(pid);
        if let Some(cg) = crate::group::of_process(pid) {
            self.cgroups.insert(pid, cg);
        }
        Ok(())
    }

    /// Attaches `probes` with `scope`; remembers them for the report.
    ///
    /// With multi-uprobe links, one link per (program, file) holds every probe of that
    /// program in the file. Return programs are attached first: a call entering between
    /// the two attachments must not leave an entry behind whose return is never seen (the
    /// thread's later calls would look nested in it); a return without its entry is
    /// counted.
    fn attach(&mut self, probes: &[ProbeSpec], scope: UProbeScope) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        for p in probes {
            if let Some(info) = p.site {
                let id = pyleak_common::ProbeCookie::decode(p.cookie).stack_delta;
                let mut sites: aya::maps::Array<_, pyleak_common::SiteInfo> =
                    aya::maps::Array::try_from(
                        self.ebpf.map_mut("SITES").context("map SITES missing")?,
                    )?;
                sites.set(id, info, 0)?;
            }
        }
        let now: Vec<&ProbeSpec> = match self.windows.as_mut() {
            Some(w) => w.keep(probes, scope),
            None => probes.iter().collect(),
        };
        let pid = match scope {
            UProbeScope::OneProcess(pid) => Some(pid.get()),
            _ => None,
        };
        if let Uprobes::Multi { .. } = self.uprobes {
            let specs: Vec<ProbeSpec> = now.into_iter().cloned().collect();
            let new_links = self.link_probes(&specs, pid)?;
            if let Uprobes::Multi { links, .. } = &mut self.uprobes {
                links.extend(new_links);
            }
        } else {
            for p in now {
                for &prog in programs_of(p.role, self.opts.bare) {
                    let point = UProbeAttachPoint {
                        location: UProbeAttachLocation::AbsoluteOffset(p.offset),
                        cookie: Some(p.cookie),
                    };
                    let program = uprobe(&mut self.ebpf, prog)?;
                    let id = program.attach(point, &p.path, scope).map_err(|e| {
                        anyhow::anyhow!(
                            "attaching {prog} to {}+{:#x} ({}): {}",
                            p.path.display(),
                            p.offset,
                            p.symbol,
                            error_chain(&e)
                        )
                    })?;
                    let link = program.take_link(id)?;
                    if let Uprobes::PerfEvents(links) = &mut self.uprobes {
                        links.push(link);
                    }
                }
            }
        }
        self.probes.extend(probes.iter().cloned());
        self.attach_s += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Multi-uprobe links for `probes`, one per (program, file), return programs first; in
    /// process `pid` only, when given. Errors: links are not in use, or the kernel refused.
    fn link_probes(
        &self,
        probes: &[ProbeSpec],
        pid: Option<u32>,
    ) -> anyhow::Result<Vec<MultiLink>> {
        let Uprobes::Multi { programs, .. } = &self.uprobes else {
            anyhow::bail!("multi-uprobe links are not in use");
        };
        // (program, returns, file) → its probes in plan order, returns first.
        let mut groups: Vec<(LinkKey, Vec<&ProbeSpec>)> = Vec::new();
        for ret in [true, false] {
            for p in probes {
                for &prog in programs_of(p.role, self.opts.bare) {
                    if is_return(prog) != ret {
                        continue;
                    }
                    let key = (prog, ret, p.path.as_path());
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, points)) => points.push(p),
                        None => groups.push((key, vec![p])),
                    }
                }
            }
        }
        let mut links = Vec::new();
        for ((prog, ret, path), points) in groups {
            let offsets: Vec<(u64, u64)> = points.iter().map(|p| (p.offset, p.cookie)).collect();
            links.push(
                programs
                    .attach(prog, path, &offsets, ret, pid)
                    .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?,
            );
        }
        Ok(links)
    }

    /// Detaches every probe placed so far, uprobes and tracepoints; returns how long it
    /// took, in seconds. Each detach waits for RCU grace periods (~0.1 s here): multi-uprobe
    /// links and tracepoints are closed from several threads at once, which share them
    /// (1.1 s → 0.57 s for `--layers libc,vm,pages`). Perf-event uprobes are closed one
    /// after another: their detach holds a kernel-wide mutex, and 32 threads contending
    /// for it took 98 s for Debian 3.11's 903 probes.
    pub fn detach_probes(&mut self) -> f64 {
        let started = std::time::Instant::now();
        let tracepoints = std::mem::take(&mut self.tracepoint_links);
        match &mut self.uprobes {
            Uprobes::Multi { links, .. } => {
                close_in_parallel(std::mem::take(links));
            }
            Uprobes::PerfEvents(links) => links.clear(),
        }
        if let Some(w) = self.windows.as_mut() {
            w.opened = None;
            close_in_parallel(std::mem::take(&mut w.links));
        }
        close_in_parallel(tracepoints);
        started.elapsed().as_secs_f64()
    }

    /// Whether uprobes are placed as multi-uprobe links.
    pub fn multi_links(&self) -> bool {
        matches!(self.uprobes, Uprobes::Multi { .. })
    }

    /// `--cgroup`, `--all`: attaches `probes` to their file for every process mapping it
    /// (the kernel counts only the traced ones); the report names the file `shown`.
    pub fn attach_file_wide(&mut self, probes: &[ProbeSpec], shown: &Path) -> anyhow::Result<()> {
        debug_assert!(self.opts.filter.file_wide());
        let n = self.probes.len();
        self.attach(probes, UProbeScope::AllProcesses)?;
        for p in &mut self.probes[n..] {
            p.path = shown.to_owned();
        }
        Ok(())
    }

    /// `--cgroup`, `--all`: starts following `pid` in userspace (its vm model, name and
    /// cgroup); with `--all` also marks it traced in the kernel.
    pub fn track(&mut self, pid: u32) -> anyhow::Result<()> {
        if self.opts.filter == Filter::PidSet {
            self.mark_active(pid)?;
        }
        if !self.targets.contains(&pid) {
            self.model.add_process(pid, current_brk(pid));
            if self.windows.is_some() {
                self.model.note_earlier_arenas(pid);
            }
            self.targets.push(pid);
        }
        self.refresh_comm(pid);
        if let Some(cg) = crate::group::of_process(pid) {
            self.cgroups.insert(pid, cg);
        }
        Ok(())
    }

    /// `--cgroup`, `--all`: `pid` has exited and its last events are read; drops its
    /// kernel entries (the frozen mark, the Python layout) so the maps stay bounded. What
    /// it left live stays in the maps for the report.
    pub fn forget(&mut self, pid: u32) {
        if let Ok(mut targets) =
            BpfHashMap::<_, u32, u32>::try_from(self.ebpf.map_mut("TARGETS").expect("map TARGETS"))
        {
            let _ = targets.remove(&pid);
        }
        if let Ok(mut procs) = BpfHashMap::<_, u32, PyProc>::try_from(
            self.ebpf.map_mut("PY_PROCS").expect("map PY_PROCS"),
        ) {
            let _ = procs.remove(&pid);
        }
    }

    /// Stores the layout template `index` the kernel applies to processes starting later.
    pub fn set_template(&mut self, index: u32, layout: &PyProc) -> anyhow::Result<()> {
        let mut t: aya::maps::Array<_, PyProc> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut("PY_TEMPLATES")
                .context("map PY_TEMPLATES missing")?,
        )?;
        t.set(index, *layout, 0)?;
        Ok(())
    }

    /// Reads every event waiting in the ring buffer into the vm model; returns how many.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<VmEvent>() {
                // SAFETY: the kernel wrote a whole VmEvent; read_unaligned copes with the
                // ring buffer's 8-byte alignment.
                let ev: VmEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                if ev.kind == VmKind::NewStack as u32 {
                    self.new_stacks.push((ev.tgid, ev.stack_id));
                } else {
                    if ev.kind == VmKind::Exec as u32 {
                        self.execs.push(ev.tgid);
                    }
                    self.model.apply(&ev);
                }
            }
            n += 1;
        }
        n
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
                .map_mut("TARGETS")
                .context("map TARGETS missing")?,
        )?;
        for &pid in &self.targets {
            targets.insert(pid, TARGET_FROZEN, 0)?;
        }
        // Uprobes look at TARGETS only once some target is frozen.
        let mut frozen: aya::maps::Array<_, u32> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut("FROZEN_COUNT")
                .context("map FROZEN_COUNT missing")?,
        )?;
        frozen.set(0, self.targets.len().max(1) as u32, 0)?;
        Ok(())
    }

    /// Whether the kernel has frozen `pid` (interpreter shutdown or exit).
    pub fn is_frozen(&self, pid: u32) -> bool {
        self.model.procs.get(&pid).is_some_and(|p| p.frozen)
    }

    /// Per-layer counters right now (for the status line).
    pub fn layer_stats(&self) -> anyhow::Result<[LayerStats; NUM_LAYERS]> {
        let stats: PerCpuArray<_, LayerStats> = PerCpuArray::try_from(
            self.ebpf
                .map("LAYER_STATS")
                .context("map LAYER_STATS missing")?,
        )?;
        let mut out = [LayerStats::default(); NUM_LAYERS];
        for (i, slot) in out.iter_mut().enumerate() {
            for cpu in stats.get(&(i as u32), 0)?.iter() {
                slot.allocs += cpu.allocs;
                slot.alloc_bytes += cpu.alloc_bytes;
                slot.frees += cpu.frees;
                slot.freed_bytes += cpu.freed_bytes;
                slot.unmatched_frees += cpu.unmatched_frees;
                slot.failed_allocs += cpu.failed_allocs;
            }
        }
        Ok(out)
    }

    /// Tells the kernel how to walk the Python frames of `pid`.
    pub fn set_python(&mut self, pid: u32, layout: &PyProc) -> anyhow::Result<()> {
        let mut procs: BpfHashMap<_, u32, PyProc> = BpfHashMap::try_from(
            self.ebpf
                .map_mut("PY_PROCS")
                .context("map PY_PROCS missing")?,
        )?;
        procs.insert(pid, *layout, 0)?;
        Ok(())
    }

    /// Live bytes per (pid, layer, stack) right now, every layer: one sample for growth.
    /// `None` once every target is frozen: its memory no longer moves, and flat samples
    /// after the end would read as a leak that stopped.
    /// Call right after [`Recorder::drain`], so the vm model is current.
    pub fn sample(&mut self) -> anyhow::Result<Option<HashMap<StackSlot, u64>>> {
        if !self.targets.is_empty() && self.targets.iter().all(|&p| self.is_frozen(p)) {
            return Ok(None);
        }
        let mut out = HashMap::new();
        for (key, agg) in self.stack_stats()? {
            let live = agg.alloc_bytes.saturating_sub(agg.freed_bytes);
            if live > 0 {
                out.insert(key, live);
            }
        }
        for (&key, agg) in &self.model.stacks {
            let live = agg.alloc_bytes.saturating_sub(agg.freed_bytes);
            if live > 0 {
                out.insert(key, live);
            }
        }
        self.sampled_live(&mut out);
        Ok(Some(out))
    }

    /// Per (pid, layer, stack) totals of the uprobe layers, summed over CPUs.
    fn stack_stats(&self) -> anyhow::Result<HashMap<(u32, Layer, u64), StackAgg>> {
        let stats: PerCpuHashMap<_, StackKey, StackAgg> = PerCpuHashMap::try_from(
            self.ebpf
                .map("STACK_STATS")
                .context("map STACK_STATS missing")?,
        )?;
        let mut stacks: HashMap<(u32, Layer, u64), StackAgg> = HashMap::new();
        for entry in stats.iter() {
            let (key, values) = entry?;
            let Some(layer) = Layer::from_u32(key.layer) else {
                continue;
            };
            let agg = stacks.entry((key.tgid, layer, key.stack_id)).or_default();
            for v in values.iter() {
                agg.add(v);
            }
        }
        // What each CPU's write-back slot holds has not reached the map yet.
        let slots: PerCpuArray<_, StackAggSlot> = PerCpuArray::try_from(
            self.ebpf
                .map("STACK_AGG_SLOT")
                .context("map STACK_AGG_SLOT missing")?,
        )?;
        for slot in slots.get(&0, 0)?.iter() {
            let Some(layer) = Layer::from_u32(slot.key.layer) else {
                continue;
            };
            if slot.key.stack_id == 0 {
                continue;
            }
            stacks
                .entry((slot.key.tgid, layer, slot.key.stack_id))
                .or_default()
                .add(&slot.agg);
        }
        Ok(stacks)
    }

    /// A per-layer histogram map of the uprobe layers: `[layer][bucket]` counts over CPUs.
    fn histograms(&self, name: &str) -> anyhow::Result<Vec<Vec<u64>>> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(name)
                .with_context(|| format!("map {name} missing"))?,
        )?;
        let mut out = vec![vec![0u64; HIST_BUCKETS]; NUM_LAYERS];
        for (layer, buckets) in out.iter_mut().enumerate().take(Layer::Libc as usize + 1) {
            for (b, slot) in buckets.iter_mut().enumerate() {
                let idx = (layer * HIST_BUCKETS + b) as u32;
                *slot = map.get(&idx, 0)?.iter().sum();
            }
        }
        Ok(out)
    }

    /// The moment a process's state was last counted: when it froze, else now.
    fn end_ns(&self, pid: u32, now: u64) -> u64 {
        self.model
            .procs
            .get(&pid)
            .and_then(|p| p.frozen_ns)
            .unwrap_or(now)
    }

    /// Reads everything the kernel gathered; blocks younger than `min_age_ns` at the end
    /// are live but not aged.
    pub fn snapshot(&mut self, min_age_ns: u64) -> anyhow::Result<Snapshot> {
        self.drain();
        let now = monotonic_ns();
        let layer_stats = self.layer_stats()?;
        let size_hist = self.histograms("SIZE_HIST")?;
        let lifetime_hist = self.histograms("LIFETIME_HIST")?;
        let mut ages: HashMap<(u32, Layer, u64), Ages> = HashMap::new();
        let (mut pymalloc_small_live, mut libc_for_python_live) = (0, 0);
        let mut ends: HashMap<u32, u64> = HashMap::new();
        let mut add = |key: AllocKey, block: LiveAlloc| {
            let Some(layer) = Layer::from_u32(key.layer) else {
                return;
            };
            let end = *ends
                .entry(key.tgid)
                .or_insert_with(|| self.end_ns(key.tgid, now));
            ages.entry((key.tgid, layer, block.stack_id))
                .or_default()
                .add(block.size, end.saturating_sub(block.ts_ns), min_age_ns);
            match layer {
                Layer::Pymalloc if block.size <= PYMALLOC_SMALL_REQUEST => {
                    pymalloc_small_live += block.size
                }
                Layer::Libc if block.flags & (FLAG_FOR_PYMALLOC | FLAG_FOR_PYMEM_RAW) != 0 => {
                    libc_for_python_live += block.size
                }
                _ => {}
            }
        };
        // Every target is frozen by now, so nothing is removed under the walks.
        table::for_each_live(
            self.ebpf
                .map("LIVE_KEYS")
                .context("map LIVE_KEYS missing")?,
            self.ebpf
                .map("LIVE_VALS")
                .context("map LIVE_VALS missing")?,
            &mut add,
        )?;
        let overflow: BpfHashMap<_, AllocKey, LiveAlloc> = BpfHashMap::try_from(
            self.ebpf
                .map("LIVE_ALLOCS")
                .context("map LIVE_ALLOCS missing")?,
        )?;
        for entry in overflow.iter() {
            let Ok((key, block)) = entry else { break };
            add(key, block);
        }
        for (&pid, p) in &self.model.procs {
            let end = self.end_ns(pid, now);
            for (&start, r) in &p.regions {
                // Only memory no probed allocator accounts for can be a vm or pages
                // suspect: a library's mapping holds no leak, and what malloc or pymalloc
                // mapped (and keep after the blocks in it are freed) is their layers'
                // business, where a leak shows as live blocks.
                if r.kind() != vm::MappingKind::Anonymous {
                    continue;
                }
                ages.entry((pid, Layer::Vm, r.stack_id)).or_default().add(
                    r.end - start,
                    end.saturating_sub(r.ts_ns),
                    min_age_ns,
                );
            }
            for (&addr, page) in &p.pages {
                if p.region_at(addr)
                    .is_none_or(|r| r.kind() != vm::MappingKind::Anonymous)
                {
                    continue;
                }
                ages.entry((pid, Layer::Pages, page.stack_id))
                    .or_default()
                    .add(vm::PAGE, end.saturating_sub(page.ts_ns), min_age_ns);
            }
        }
        let mut stacks = self.stack_stats()?;
        for (&key, agg) in &self.model.stacks {
            stacks.insert(key, *agg);
        }
        let drops_map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("DROPS").context("map DROPS missing")?)?;
        let mut drops = BTreeMap::new();
        for (i, reason) in Drop::ALL.iter().enumerate().take(NUM_DROPS) {
            let n: u64 = drops_map.get(&(i as u32), 0)?.iter().sum();
            drops.insert(reason.name(), n);
        }
        let mut snap = Snapshot {
            layer_stats,
            size_hist,
            stacks,
            drops,
            lifetime_hist,
            ages,
            pymalloc_small_live,
            libc_for_python_live,
            sampled: None,
        };
        self.apply_estimates(&mut snap);
        Ok(snap)
    }

    /// Re-reads the command name of `pid` (it changes at exec).
    pub fn refresh_comm(&mut self, pid: u32) {
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            self.comms.insert(pid, c.trim().to_owned());
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

    /// Reads an interned stack.
    pub fn stack(&self, id: u64) -> Option<StackTrace> {
        let stacks: BpfHashMap<_, u64, StackTrace> =
            BpfHashMap::try_from(self.ebpf.map("STACKS")?).ok()?;
        stacks.get(&id, 0).ok()
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
fn close_in_parallel<T: Send>(mut links: Vec<T>) {
    let per_thread = links.len().div_ceil(32).max(1);
    std::thread::scope(|s| {
        while !links.is_empty() {
            let chunk: Vec<T> = links.drain(..per_thread.min(links.len())).collect();
            s.spawn(move || drop(chunk));
        }
    });
}

/// The programs a probe of `role` runs (the empty ones in the benchmark's floor).
fn programs_of(role: ProbeRole, bare: bool) -> &'static [&'static str] {
    match (role, bare) {
        (ProbeRole::Alloc, false) => &["alloc_exit", "alloc_enter"],
        (ProbeRole::Free, false) => &["free_enter"],
        (ProbeRole::Finalize, _) => &["py_finalize_enter"],
        (ProbeRole::PyInit, _) => &["py_init_enter"],
        (ProbeRole::Alloc, true) => &["bare_exit", "bare_enter"],
        (ProbeRole::Free, true) => &["bare_enter"],
        (ProbeRole::Site, false) => &["site_enter"],
        (ProbeRole::Join, false) => &["site_join"],
        (ProbeRole::JoinReturn, false) => &["site_join_ret"],
        (ProbeRole::Site | ProbeRole::Join, true) => &["bare_enter"],
        (ProbeRole::JoinReturn, true) => &["bare_exit"],
    }
}

/// Whether uprobe program `name` runs at the function's return.
fn is_return(name: &str) -> bool {
    UPROBE_PROGRAMS.iter().any(|&(n, ret)| n == name && ret)
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
    if let Some(line) = maps.lines().find(|l| l.ends_with("[heap]")) {
        let end = line.split_whitespace().next()?.split_once('-')?.1;
        return u64::from_str_radix(end, 16).ok();
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces): start_brk is field 47.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace()
        .nth(47 - 3)
        .and_then(|f| f.parse().ok())
        .filter(|&b: &u64| b != 0)
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
