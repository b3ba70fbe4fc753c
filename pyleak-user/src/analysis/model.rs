//! What the analysis finds: the types every output format renders. Their JSON form is
//! pyleak's output contract (`--json`, read back by `pyleak report`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::growth::Trend;
pub use super::layer_bytes::LayerBytes;

/// What a recording found; its JSON form (the `--json` report) is pyleak's output contract.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Analysis {
    /// pyleak's version.
    pub pyleak_version: String,
    /// Seconds recorded.
    pub duration_s: f64,
    /// How a command pyleak started ended (`exited with status 0`, `killed by signal 11
    /// (Segmentation fault), core dumped`); absent for attached processes, whose end
    /// pyleak does not see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_exit: Option<String>,
    /// Traced processes.
    pub processes: Vec<ProcessInfo>,
    /// Totals per layer, by layer name.
    pub layers: BTreeMap<String, LayerReport>,
    /// Per (process, layer, stack), most live bytes first.
    pub stacks: Vec<StackReport>,
    /// Events lost in all (the sum of `lost`).
    pub lost_events: u64,
    /// Events lost, by reason.
    pub lost: BTreeMap<String, u64>,
    /// Where the probes sit.
    pub probes: Vec<ProbeInfo>,
    /// Live memory younger than this (seconds) at the end is not a suspect.
    #[serde(default)]
    pub min_age_s: f64,
    /// Seconds between growth samples (0: none taken).
    #[serde(default)]
    pub interval_s: f64,
    /// Growth samples taken.
    #[serde(default)]
    pub samples: usize,
    /// Leak suspects, most likely leak first.
    #[serde(default)]
    pub suspects: Vec<Suspect>,
    /// Interpreter start-up and imports: what a Python process made in its first second
    /// (no Python frame, or an import's) and kept, flat; not ranked, most bytes first.
    #[serde(default)]
    pub startup: Vec<Suspect>,
    /// The layers linked: what Python asked for, what pymalloc, malloc and the kernel hold.
    #[serde(default)]
    pub linkage: Linkage,
    /// Allocator retention: resident pages malloc and pymalloc keep that no live block
    /// accounts for, per (process, mapping kind), most retained first. Not leaks.
    #[serde(default)]
    pub retention: Vec<Retention>,
    /// Per layer, the growth sample at which the most was live, and who held it.
    #[serde(default)]
    pub peak: Vec<Peak>,
    /// Copy-on-write after fork: per forked child, the pages it made its own by writing
    /// to memory it shared with its parent, and the lines that wrote them; most first.
    /// Not leaks, and not in the pages layer.
    #[serde(default)]
    pub copy_on_write: Vec<CopyOnWrite>,
    /// How the uprobes were placed: `multi-uprobe` (one link per program and file) or
    /// `perf-event` (one per probe, on kernels without multi-uprobe links).
    #[serde(default)]
    pub probe_links: String,
    /// Seconds pyleak spent attaching its uprobes, measured by itself.
    #[serde(default)]
    pub probes_attach_s: f64,
    /// Seconds pyleak spent detaching its uprobes at the end, measured by itself.
    #[serde(default)]
    pub probes_detach_s: f64,
    /// `record --census`: per Python target, its heap censuses, type growth and holders
    /// (the shape of `pyleak census --json`); absent without `--census`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub census: Option<serde_json::Value>,
    /// Sampled pymalloc tracing, when on: the pymalloc figures are then estimates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_pymalloc: Option<SampledReport>,
    /// Group targets: exited processes retired while recording (absent when none was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<RetiredReport>,
}

/// Exited processes whose state pyleak dropped while recording, to keep its own memory
/// bounded under process churn: past the last `kept` exited processes, the oldest is
/// retired. They are not in `processes`, `stacks` or `suspects`; the layer totals still
/// count them (JSON `retired`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct RetiredReport {
    /// Processes retired.
    pub processes: u64,
    /// Exited processes kept whole at any time.
    pub kept: usize,
    /// What they left live when retired, by layer name: bytes.
    pub live_bytes: BTreeMap<String, u64>,
    /// The same, in blocks (vm: mappings; pages: pages).
    pub live_count: BTreeMap<String, u64>,
}

/// A live-bytes estimate of sampled pymalloc tracing (JSON fields of a stack or suspect).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct Estimate {
    /// Estimated live bytes (Horvitz–Thompson: each live sample's size over its chance of
    /// being sampled).
    pub live_bytes_estimate: f64,
    /// Its standard error, in bytes.
    pub live_bytes_stderr: f64,
    /// Live samples it rests on.
    pub samples: u64,
}

impl Estimate {
    /// Two rows' estimates together (errors add in quadrature).
    pub fn add(self, o: Estimate) -> Estimate {
        Estimate {
            live_bytes_estimate: self.live_bytes_estimate + o.live_bytes_estimate,
            live_bytes_stderr: self.live_bytes_stderr.hypot(o.live_bytes_stderr),
            samples: self.samples + o.samples,
        }
    }
}

/// What sampled pymalloc tracing did (JSON `sampled_pymalloc`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SampledReport {
    /// `sampled`.
    pub mode: String,
    /// Windows opened.
    pub windows: u64,
    /// Seconds they were open, in all.
    pub window_open_s: f64,
    /// Per pid: the share of its heap growth (arena pages faulted in) the windows saw, the
    /// chance of an allocation being sampled (lines with enough pages use their own); at
    /// most the windows' share of time.
    pub inclusion: BTreeMap<u32, f64>,
    /// Pids whose inclusion is the windows' share of time: fewer than 20 arena pages were
    /// faulted in inside windows, too few to measure the heap's growth by.
    #[serde(default)]
    pub inclusion_from_time: Vec<u32>,
    /// Estimated live blocks taken off the stacks' estimates so that no size class holds
    /// more than its pools have in use (read from their headers at each judgement).
    #[serde(default)]
    pub cut_to_pools: u64,
    /// Live samples at the end (confirmed by a judgement after their window's own: the
    /// ones the estimates rest on).
    pub samples: u64,
    /// Samples taken by the last windows and not judged again before the end: left out of
    /// the estimates.
    #[serde(default)]
    pub unconfirmed: u64,
    /// Samples found freed later by reading the target (reused ones included).
    pub freed: u64,
    /// Of those, found reused by another object.
    pub reused: u64,
    /// Samples unreadable when their window closed (dropped).
    pub unreadable: u64,
    /// Whether windows stopped because the cap of kept samples was reached.
    pub capped: bool,
}

/// A (process, layer, stack) whose live memory outlived `min_age_s` or keeps growing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Suspect {
    /// Layer name.
    pub layer: String,
    /// Process id.
    pub pid: u32,
    /// Frames, root first.
    pub frames: Vec<String>,
    /// How many of `frames`, at the leaf end, are native (as in [`StackReport`]).
    #[serde(default)]
    pub native_frames: usize,
    /// Bytes live at the end.
    pub live_bytes: u64,
    /// Blocks live at the end.
    pub live_count: u64,
    /// Of those, bytes at least `min_age_s` old.
    pub aged_live_bytes: u64,
    /// Blocks at least `min_age_s` old.
    pub aged_live_count: u64,
    /// Growth of live bytes in the recent half of the recording, bytes per second.
    pub growth_bytes_per_s: f64,
    /// Growth over the whole recording, bytes per second.
    pub overall_growth_bytes_per_s: f64,
    /// Share of recent sampling intervals in which live bytes rose.
    pub steadiness: f64,
    /// `growing`, `plateau`, `flat`, `shrinking` or `unknown` (too few samples).
    pub trend: Trend,
    /// Age of the oldest live block, seconds.
    pub oldest_age_s: f64,
    /// The same Python stack at every layer.
    pub linkage: SuspectLinkage,
    /// Sampled pymalloc tracing: the estimate behind `live_bytes` (absent when exact).
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
    /// `record --census`, pymalloc suspects: the holders through which its live blocks are
    /// reached in the last census, most bytes first (absent otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_by: Vec<HeldBy>,
    /// When library code made the memory (`frames` then end at the innermost frame of the
    /// user's own code): the full stacks blamed on it, most live bytes first (at most 5).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub full_stacks: Vec<FullStack>,
    /// What else to know or do about this suspect, one line (absent when nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Some of a suspect's live blocks, and the holder (a census's) that keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldBy {
    /// The holder's names from the root (`["__main__", "REGISTRY"]`).
    pub path: Vec<String>,
    /// Blocks.
    pub count: u64,
    /// Their requested bytes.
    pub bytes: u64,
}

/// A full stack (library frames included) that a suspect groups.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FullStack {
    /// Frames, root first (as in [`StackReport`]).
    pub frames: Vec<String>,
    /// How many of `frames`, at the leaf end, are native.
    #[serde(default)]
    pub native_frames: usize,
    /// Its live bytes.
    pub live_bytes: u64,
}

/// One stack's memory at every layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SuspectLinkage {
    /// Live bytes at each layer: pymalloc and PyMem_Raw requests, malloc blocks, mappings
    /// still mapped, pages this stack faulted in still resident (`pymalloc_live_bytes`,
    /// `pymem_raw_live_bytes`, `libc_live_bytes`, `vm_live_bytes`, `resident_bytes`).
    #[serde(flatten)]
    pub live: LayerBytes,
    /// pymalloc arenas this stack caused to be mapped, still mapped.
    pub arena_bytes: u64,
}

/// The layers linked, for all traced processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Linkage {
    /// Live bytes at each layer: pymalloc requests (what Python code asked for), PyMem_Raw
    /// requests, malloc blocks, mappings made while tracing and still mapped, pages faulted
    /// in while tracing and still resident (`pymalloc_live_bytes`, …, `resident_bytes`).
    #[serde(flatten)]
    pub live: LayerBytes,
    /// Of the pymalloc requests, those of at most 512 bytes (served from arenas).
    pub pymalloc_small_live_bytes: u64,
    /// pymalloc arenas mapped while tracing and still mapped.
    pub arena_count: u64,
    /// Their bytes.
    pub arena_bytes: u64,
    /// Their resident bytes.
    pub arena_resident_bytes: u64,
    /// `arena_bytes / pymalloc_small_live_bytes`: 1.0 is perfectly packed; far above 1,
    /// arenas kept alive by a few objects each.
    pub fragmentation_ratio: Option<f64>,
    /// Of those, allocated on behalf of pymalloc or PyMem_Raw.
    pub libc_for_python_live_bytes: u64,
    /// Those mappings by kind.
    pub vm_by_kind: BTreeMap<String, u64>,
    /// Those pages by the kind of mapping they are in.
    pub resident_by_kind: BTreeMap<String, u64>,
    /// Of the resident bytes, those the kernel mapped along with another page's fault
    /// (fault-around on a file, a transparent huge page), found by reading page tables.
    #[serde(default)]
    pub resident_bulk_bytes: u64,
}

/// Pages one allocator keeps resident in one process (JSON `retention`): faulted in while
/// tracing and still resident, and what of them live blocks account for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Retention {
    /// Process id.
    pub pid: u32,
    /// Mapping kind: `malloc_heap` (the break), `malloc_arena` (threads' arenas),
    /// `malloc_mmap` (big blocks) or `pymalloc_arena`.
    pub kind: String,
    /// Resident bytes (whole pages).
    pub resident_bytes: u64,
    /// Of those, bytes live blocks lie on (malloc's blocks; pymalloc's small ones).
    pub used_bytes: u64,
    /// Whether `used_bytes` is an estimate (pymalloc arenas under sampled tracing).
    #[serde(default)]
    pub used_estimated: bool,
    /// `resident_bytes - used_bytes`: what the allocator keeps for reuse.
    pub retained_bytes: u64,
    /// The stacks that faulted the pages in, most bytes first (at most 3).
    pub stacks: Vec<RetentionStack>,
    /// What would give the pages back.
    pub gives_back: String,
}

/// A stack that faulted in pages an allocator keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetentionStack {
    /// Frames, root first (as in [`StackReport`]).
    pub frames: Vec<String>,
    /// How many of `frames`, at the leaf end, are native.
    #[serde(default)]
    pub native_frames: usize,
    /// Resident bytes it faulted in, of this kind.
    pub resident_bytes: u64,
}

/// Pages a forked child copied from its parent by writing to them (JSON
/// `copy_on_write`): each was resident and shared with the parent at the fork, and a write
/// fault on it (`PF_PRESENT | PF_WRITE`) gave the child its own copy (`collect::cow`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CopyOnWrite {
    /// The child's process id.
    pub pid: u32,
    /// The process that forked it.
    pub parent: Option<u32>,
    /// Bytes made private (whole 4 KiB pages).
    pub bytes: u64,
    /// Pages made private.
    pub pages: u64,
    /// Of `bytes`, what is still mapped at the end.
    pub live_bytes: u64,
    /// The stacks whose writes made the copies, most bytes first (at most 5).
    pub stacks: Vec<CowStack>,
}

/// A stack whose writes copied pages a child shared with its parent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CowStack {
    /// Frames, root first (as in [`StackReport`]).
    pub frames: Vec<String>,
    /// How many of `frames`, at the leaf end, are native.
    #[serde(default)]
    pub native_frames: usize,
    /// Bytes it made private.
    pub bytes: u64,
    /// Pages it made private.
    pub pages: u64,
}

/// The growth sample at which one layer held the most (JSON `peak`): taken every
/// `interval_s`, so a spike shorter than that can fall between two samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peak {
    /// Layer name.
    pub layer: String,
    /// Seconds into the recording.
    pub t_s: f64,
    /// The layer's live bytes then (pymalloc under sampled tracing: an estimate).
    pub live_bytes: u64,
    /// Every layer's live bytes then, by layer name.
    pub layers_then: BTreeMap<String, u64>,
    /// The stacks that held the most of the layer then, most first (at most 5).
    pub stacks: Vec<PeakStack>,
}

/// A stack's live bytes at a peak.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeakStack {
    /// Process id.
    pub pid: u32,
    /// Frames, root first (as in [`StackReport`]).
    pub frames: Vec<String>,
    /// How many of `frames`, at the leaf end, are native.
    #[serde(default)]
    pub native_frames: usize,
    /// Its live bytes then.
    pub live_bytes: u64,
}

/// A traced process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Its cgroup v2 path (`/system.slice/app.service`), when it could be read.
    pub cgroup: Option<String>,
    /// The CPython version it runs (`3.12`), if any was found.
    pub python: Option<String>,
    /// A process a `--pid` or command target started, followed while recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followed: Option<Followed>,
}

/// How a child of a target came to be traced (`processes[].followed` in the JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Followed {
    /// The traced process that made it (fork, vfork, clone).
    pub parent: u32,
    /// Milliseconds from its fork (or, once it exec'd a program, from the exec) to its
    /// uprobes being attached: the malloc-family and Python allocator calls it made in
    /// that gap are not seen (its vm and pages events are, from the fork on). 0 when the
    /// probes were in place before the exec.
    pub gap_ms: f64,
    /// Whether it exec'd a new program while traced (the gap is then the exec's).
    pub exec: bool,
    /// False when it exited before its uprobes could be attached: of its allocator calls
    /// none was seen (its whole life is the gap).
    pub traced: bool,
}

/// Totals of one layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    /// Allocations (mappings made, pages faulted in).
    pub allocs: u64,
    /// Frees of blocks allocated while tracing.
    pub frees: u64,
    /// Bytes allocated.
    pub alloc_bytes: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Blocks (mappings, pages) live at the end.
    pub live_count: u64,
    /// Their bytes.
    pub live_bytes: u64,
    /// Frees of blocks not allocated while tracing.
    pub unmatched_frees: u64,
    /// Allocation calls that failed.
    pub failed_allocs: u64,
    /// Live blocks a CPython free list handed out again to another stack, counted from
    /// then on under the stack that took them (pymalloc; absent when none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reused: u64,
    /// Allocation size percentiles (p50, p90, p99, max), in bytes.
    pub size_percentiles: BTreeMap<String, u64>,
    /// Lifetime percentiles of freed blocks (p50, p90, p99, max), in microseconds.
    #[serde(default)]
    pub lifetime_percentiles_us: BTreeMap<String, u64>,
}

/// One (process, layer, stack).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StackReport {
    /// Layer name.
    pub layer: String,
    /// Process id.
    pub pid: u32,
    /// Frames, root first: Python `qualname (path:line)`, native `symbol (module)`; under
    /// Python frames (`--native`), native frames end in ` [native]`.
    pub frames: Vec<String>,
    /// How many of `frames`, at the leaf end, are native: all of them in a stack without
    /// Python frames, those under the Python frames with `--native`, else 0.
    #[serde(default)]
    pub native_frames: usize,
    /// Bytes live at the end.
    pub live_bytes: u64,
    /// Blocks live at the end.
    pub live_count: u64,
    /// Bytes allocated.
    pub alloc_bytes: u64,
    /// Allocations.
    pub allocs: u64,
    /// Frees.
    pub frees: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Whether frames were cut off.
    pub truncated: bool,
    /// Live bytes at least `min_age_s` old.
    #[serde(default)]
    pub aged_live_bytes: u64,
    /// Growth of live bytes in the recent half of the recording, bytes per second.
    #[serde(default)]
    pub growth_bytes_per_s: f64,
    /// Sampled pymalloc tracing: the estimate behind `live_bytes`, its standard error and
    /// the live samples it rests on (absent for exact figures).
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
}

/// Where a probe sits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeInfo {
    /// The file probed.
    pub file: String,
    /// The function.
    pub symbol: String,
    /// Attach point minus function start.
    pub offset: u64,
    /// Whether the kernel emulates the instruction there (cheap) or single-steps it.
    pub emulated: bool,
}

/// Whether a count is zero (left out of the JSON).
fn is_zero(n: &u64) -> bool {
    *n == 0
}
