//! What the kernel side gathered, as plain data: the [`Snapshot`] read at the end of a
//! recording, which the analysis takes (and tests build by hand).

use std::collections::{BTreeMap, HashMap};

use pyleak_common::{Layer, LayerStats, StackAgg, NUM_LAYERS};

/// What the kernel side gathered, read at the end of a recording.
pub struct Snapshot {
    /// The layers probed (`--layers`).
    pub traced: crate::layers::LayerSet,
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
    /// Per (pid, page address) of the pages the vm model counts resident: bytes of live
    /// malloc blocks and small pymalloc blocks on it (sampled pymalloc: its samples only).
    pub used_on_pages: HashMap<(u32, u64), u64>,
    /// With sampled pymalloc tracing: its windows, samples and estimates (the pymalloc
    /// figures above are then estimates for the whole recording).
    pub sampled: Option<super::window::SampledPymalloc>,
    /// Exited processes retired while recording (group targets), and what they left.
    pub retired: RetiredSummary,
}

/// Exited processes retired while recording: their state was dropped to keep pyleak's
/// memory bounded (see `collect::retire`); the uprobe layers' counters still count them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetiredSummary {
    /// How many.
    pub processes: u64,
    /// Exited processes kept whole at any time (the cap).
    pub kept: usize,
    /// What they left live, per layer: (bytes, blocks; mappings for vm, pages for pages).
    pub live: BTreeMap<Layer, (u64, u64)>,
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
    /// Age of the youngest live block, in nanoseconds (0 when none is counted).
    pub youngest_ns: u64,
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
        self.youngest_ns = if self.count == 0 {
            age_ns
        } else {
            self.youngest_ns.min(age_ns)
        };
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
