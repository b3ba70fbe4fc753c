//! Every map the probes share, with the sizes from `pyleak-common`.

use aya_ebpf::{
    bindings::{
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    },
    helpers::{bpf_ktime_get_ns, generated::bpf_get_current_ancestor_cgroup_id},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use pyleak_common::{
    AllocKey, Drop, LayerStats, LiveAlloc, LiveBucket, SiteInfo, StackAgg, StackAggSlot, StackKey,
    StackTrace, ThreadState, VmEvent, EVENTS_RING_BYTES, FILTER_CGROUP, FILTER_PIDS, HIST_BUCKETS,
    LIVE_ALLOCS_ENTRIES, LIVE_BUCKET_SLOTS, LIVE_TABLE_BUCKETS, NUM_DROPS, NUM_LAYERS,
    SITES_ENTRIES, STACKS_ENTRIES, STACK_STATS_ENTRIES, TARGETS_ENTRIES, TARGET_ACTIVE,
    TARGET_FROZEN, THREADS_ENTRIES, WINDOW_CLOSING, WINDOW_OPEN,
};

/// Processes traced: tgid → `TARGET_ACTIVE` or `TARGET_FROZEN`.
#[map]
pub static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(TARGETS_ENTRIES, 0);

/// Guarded inline allocator sites and joins (filled by userspace), by the cookie's id.
#[map]
pub static SITES: Array<SiteInfo> = Array::with_max_entries(SITES_ENTRIES, 0);

/// Blocks allocated and not yet freed: the table's keys, a cache line of them a bucket.
/// Probes claim a free slot (key 0) with a compare-and-swap and free one by swapping its
/// key back to 0, so no lock is taken and no element allocated (a hash map's insert and
/// delete cost ≈0.2 µs a block here). Userspace maps it to read it.
#[map]
pub static LIVE_KEYS: Array<LiveBucket> =
    Array::with_max_entries(LIVE_TABLE_BUCKETS, BPF_F_MMAPABLE);

/// The table's blocks, at `bucket * LIVE_BUCKET_SLOTS + slot`.
#[map]
pub static LIVE_VALS: Array<LiveAlloc> = Array::with_max_entries(
    LIVE_TABLE_BUCKETS * LIVE_BUCKET_SLOTS as u32,
    BPF_F_MMAPABLE,
);

/// Live blocks the table had no room or no key for.
#[map]
pub static LIVE_ALLOCS: HashMap<AllocKey, LiveAlloc> =
    HashMap::with_max_entries(LIVE_ALLOCS_ENTRIES, 0);

/// `[0]`: how many blocks `LIVE_ALLOCS` holds (changed atomically). While it is 0, a free
/// the table does not know needs no hash lookup.
#[map]
pub static LIVE_OVERFLOW: Array<u64> = Array::with_max_entries(1, 0);

/// Per-thread calls in flight, by thread id.
#[map]
pub static THREADS: HashMap<u32, ThreadState> = HashMap::with_max_entries(THREADS_ENTRIES, 0);

/// Interned stacks by id.
#[map]
pub static STACKS: HashMap<u64, StackTrace> =
    HashMap::with_max_entries(STACKS_ENTRIES, BPF_F_NO_PREALLOC);

/// Per (process, layer, stack) totals, added to atomically. One copy for every CPU: a
/// per-CPU map would take each entry's value once per possible CPU, and the write-back
/// slots in front of it (`STACK_AGG_SLOT`) make updates rare. Elements are allocated as
/// stacks come.
#[map]
pub static STACK_STATS: HashMap<StackKey, StackAgg> =
    HashMap::with_max_entries(STACK_STATS_ENTRIES, BPF_F_NO_PREALLOC);

/// Each CPU's write-back slot in front of `STACK_STATS`.
#[map]
pub static STACK_AGG_SLOT: PerCpuArray<StackAggSlot> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU's kernel tick (`jiffies`) when it last read the clock, and that time.
#[map]
pub static TICK_CLOCK: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Per-layer counters.
#[map]
pub static LAYER_STATS: PerCpuArray<LayerStats> =
    PerCpuArray::with_max_entries(NUM_LAYERS as u32, 0);

/// Per-layer size histograms: `layer * HIST_BUCKETS + size_bucket(size)`.
#[map]
pub static SIZE_HIST: PerCpuArray<u64> =
    PerCpuArray::with_max_entries((NUM_LAYERS * HIST_BUCKETS) as u32, 0);

/// Per-layer lifetime histograms of freed blocks, in microseconds, bucketed like sizes.
#[map]
pub static LIFETIME_HIST: PerCpuArray<u64> =
    PerCpuArray::with_max_entries((NUM_LAYERS * HIST_BUCKETS) as u32, 0);

/// Lost events by `pyleak_common::Drop` reason.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_DROPS as u32, 0);

/// Scratch space to build a stack in (too big for the 512-byte BPF stack).
#[map]
pub static STACK_SCRATCH: PerCpuArray<StackTrace> = PerCpuArray::with_max_entries(1, 0);

/// vm and page events for userspace.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// Counts one lost event.
#[inline(always)]
pub fn count_drop(reason: pyleak_common::Drop) {
    if let Some(n) = DROPS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *n += 1 };
    }
}

/// `[0]`: how many targets are frozen. While none is, uprobes (attached per process) need
/// no `TARGETS` lookup; an array lookup is inlined by the verifier and costs nothing.
#[map]
pub static FROZEN_COUNT: Array<u32> = Array::with_max_entries(1, 0);

/// How targets are chosen (`pyleak_common::FILTER_*`). Set by userspace before load; the
/// verifier sees a constant and drops the other modes' code.
#[no_mangle]
static FILTER_MODE: u32 = FILTER_PIDS;
/// `FILTER_CGROUP`: id of the traced cgroup (its directory's inode number).
#[no_mangle]
static CGROUP_ID: u64 = 0;
/// `FILTER_CGROUP`: its level in the hierarchy (the root is 0).
#[no_mangle]
static CGROUP_LEVEL: u32 = 0;

/// 1 when the pymalloc layer is sampled in windows (`--pymalloc sampled`): its probes are
/// attached only while a window is open, and count only while `PYMALLOC_WINDOW` says so.
#[no_mangle]
static PYMALLOC_SAMPLED: u32 = 0;

/// `[0]`: the current sampling window's generation (userspace bumps it before each window
/// opens); `[1]`: [`WINDOW_OPEN`] while the window is open, [`WINDOW_CLOSING`] while it
/// closes (no allocation or free counts, free-list hand-overs still do, until userspace has
/// fingerprinted the window's samples), 0 when closed. Only read when `PYMALLOC_SAMPLED`.
#[map]
pub static PYMALLOC_WINDOW: Array<u32> = Array::with_max_entries(2, 0);

/// Whether pymalloc is sampled in windows (a constant to the verifier).
#[inline(always)]
pub fn pymalloc_sampled() -> bool {
    // SAFETY: a read-only global, patched by userspace before load.
    unsafe { core::ptr::read_volatile(&PYMALLOC_SAMPLED) != 0 }
}

/// With sampled pymalloc tracing: `Some(generation)` of the open window, `None` when
/// closing or closed (a probe firing while its link is put in or taken out). Without:
/// `Some(0)`.
#[inline(always)]
pub fn pymalloc_window() -> Option<u32> {
    window_in(WINDOW_OPEN)
}

/// [`pymalloc_window`] for free-list hand-overs, which also count while a window closes:
/// a block its code dropped on a type's free list when the window closed, and another
/// stack takes before userspace reads it, goes to that stack (read only later, it would
/// look like the dropping code's live object).
#[inline(always)]
pub fn pymalloc_handover_window() -> Option<u32> {
    window_in(WINDOW_CLOSING)
}

/// The window's generation while `PYMALLOC_WINDOW[1]` is between 1 and `up_to`.
#[inline(always)]
fn window_in(up_to: u32) -> Option<u32> {
    // SAFETY: a read-only global, patched by userspace before load.
    if unsafe { core::ptr::read_volatile(&PYMALLOC_SAMPLED) } == 0 {
        return Some(0);
    }
    if PYMALLOC_WINDOW
        .get(1)
        .is_some_and(|o| *o != 0 && *o <= up_to)
    {
        PYMALLOC_WINDOW.get(0).copied()
    } else {
        None
    }
}

/// The filter mode userspace chose.
#[inline(always)]
pub fn filter_mode() -> u32 {
    // SAFETY: a read-only global, patched by userspace before load.
    unsafe { core::ptr::read_volatile(&FILTER_MODE) }
}

/// Whether the current task is in the traced cgroup or one of its descendants.
#[inline(always)]
fn in_cgroup() -> bool {
    // SAFETY: read-only globals, patched by userspace before load.
    let (id, level) = unsafe {
        (
            core::ptr::read_volatile(&CGROUP_ID),
            core::ptr::read_volatile(&CGROUP_LEVEL),
        )
    };
    // SAFETY: a helper reading the current task's cgroup; no pointers.
    let current = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
    current == id
}

/// Whether a process that a uprobe fired in is still being traced (not frozen).
#[inline(always)]
pub fn uprobe_target_active(tgid: u32) -> bool {
    match filter_mode() {
        // Uprobes attached per process fire only in targets.
        FILTER_PIDS => {
            if FROZEN_COUNT.get(0).is_some_and(|n| *n == 0) {
                return true;
            }
            target_state(tgid) == TARGET_ACTIVE
        }
        FILTER_CGROUP => {
            if !in_cgroup() {
                return false;
            }
            if FROZEN_COUNT.get(0).is_some_and(|n| *n == 0) {
                return true;
            }
            // SAFETY: a plain u32 copied out at once.
            unsafe { TARGETS.get(tgid) }.copied() != Some(TARGET_FROZEN)
        }
        _ => target_state(tgid) == TARGET_ACTIVE,
    }
}

/// Slots of [`KNOWN_STACKS`] (a power of two).
pub const KNOWN_STACK_SLOTS: u32 = 256;

/// Stack ids this CPU interned lately, direct-mapped by id: one found here is in `STACKS`
/// (userspace never removes a stack), so interning it again needs no map update. The
/// lines of one loop alternate between a few stacks; a single last-stack slot missed
/// each time, and each miss took the map's bucket lock to be told the stack existed.
#[map]
pub static KNOWN_STACKS: PerCpuArray<u64> = PerCpuArray::with_max_entries(KNOWN_STACK_SLOTS, 0);

/// The tracing state of a process: 0 (not traced), `TARGET_ACTIVE` or `TARGET_FROZEN`.
/// In cgroup mode every process of the group is active until frozen.
#[inline(always)]
pub fn target_state(tgid: u32) -> u32 {
    if filter_mode() == FILTER_CGROUP {
        if !in_cgroup() {
            return 0;
        }
        // SAFETY: the value is a plain u32 copied out at once.
        return unsafe { TARGETS.get(tgid) }
            .copied()
            .unwrap_or(TARGET_ACTIVE);
    }
    // SAFETY: the value is a plain u32 copied out at once.
    unsafe { TARGETS.get(tgid) }.copied().unwrap_or(0)
}

/// Set on this CPU while a probe reads the target's memory (stack walks): a page fault the
/// kernel takes then is pyleak's own read failing, not the target paging memory in.
#[map]
pub static IN_PROBE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Marks this CPU as reading the target's memory (`true`) or done (`false`).
#[inline(always)]
pub fn set_in_probe(on: bool) {
    if let Some(f) = IN_PROBE.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot.
        unsafe { *f = on as u32 };
    }
}

/// Whether this CPU is inside one of pyleak's own reads of target memory.
#[inline(always)]
pub fn in_probe() -> bool {
    IN_PROBE.get(0).is_some_and(|f| *f != 0)
}

/// Sends one event to userspace, stamping its time; a full ring buffer is counted.
#[inline(always)]
pub fn emit(ev: VmEvent) {
    emit_with(ev, 0);
}

/// Sends one event and wakes userspace at once, whatever is queued before it: for the rare
/// events userspace must act on while the process is still there (a new stack whose code
/// objects it reads, a fork whose child it attaches, an exec, a freeze). A plain
/// [`emit`] queued behind quiet events wakes nobody (the ring wakes only a reader that
/// had caught up), and a worker that exits within the drain period would lose its names.
#[inline(always)]
pub fn emit_urgent(ev: VmEvent) {
    emit_with(ev, BPF_RB_FORCE_WAKEUP as u64);
}

/// Unread bytes in `EVENTS` past which a quiet event wakes userspace anyway.
const QUIET_WAKE_BYTES: u64 = EVENTS_RING_BYTES as u64 / 8;

/// Sends one event without waking userspace (it drains the ring on a short timer), unless
/// the ring is filling up: for page faults, which come tens of thousands a second, where a
/// wakeup each (the kernel's `irq_work`, a context switch to pyleak and back) costs the
/// target more than the probe itself.
#[inline(always)]
pub fn emit_quiet(ev: VmEvent) {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > QUIET_WAKE_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    emit_with(ev, flags as u64);
}

#[inline(always)]
fn emit_with(mut ev: VmEvent, flags: u64) {
    // SAFETY: a helper without arguments.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    match EVENTS.reserve::<VmEvent>(0) {
        Some(mut slot) => {
            slot.write(ev);
            slot.submit(flags);
        }
        None => count_drop(Drop::RingFull),
    }
}
