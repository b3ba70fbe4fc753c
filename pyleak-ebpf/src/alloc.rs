//! The one alloc/free path every allocator probe shares (libc's malloc family, pymalloc,
//! PyMem_Raw). Which function a probe sits on, and its layer, come from the attach cookie.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_get_attach_cookie, bpf_jiffies64},
    },
    macros::{tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext,
};
use pyleak_common::{
    live_bucket, live_key, size_bucket, AllocKey, AllocKind, Drop, Layer, LiveAlloc, LiveBucket,
    Pending, ProbeCookie, StackAgg, StackKey, CALL_LAYERS, ENTERED_SHIFT, FLAG_TIMED, HIST_BUCKETS,
    LIVE_BUCKET_SLOTS,
};

use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};

use crate::{
    maps::{
        count_drop, pymalloc_sampled, uprobe_target_active, LAYER_STATS, LIFETIME_HIST,
        LIVE_ALLOCS, LIVE_KEYS, LIVE_OVERFLOW, LIVE_VALS, SIZE_HIST, STACK_AGG_SLOT, STACK_STATS,
        THREADS, TICK_CLOCK,
    },
    stack,
    thread::{begun_in, forget_stale_pymalloc, thread_state, upper_call, window_of},
};

const PAGE_SIZE: u64 = 4096;

/// Entry of an allocating function: remember its request until it returns.
#[uprobe]
pub fn alloc_enter(ctx: ProbeContext) -> u32 {
    let _ = try_alloc_enter(&ctx);
    0
}

/// Return of an allocating function: record the block it handed out.
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    let _ = try_alloc_exit(&ctx);
    0
}

/// Entry of a freeing function: forget the block.
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let _ = try_free_enter(&ctx);
    0
}

/// Benchmark floor: the same attach points with an empty program.
#[uprobe]
pub fn bare_enter(_ctx: ProbeContext) -> u32 {
    0
}

/// Benchmark floor for return probes.
#[uretprobe]
pub fn bare_exit(_ctx: RetProbeContext) -> u32 {
    0
}

/// Benchmark floor for the vm and pages layers' tracepoints. Attached at all, syscall
/// tracepoints send every syscall of every task down the kernel's slow path (uretprobes
/// return through one), a cost any tracer of these layers pays.
#[tracepoint]
pub fn bare_tp(_ctx: TracePointContext) -> u32 {
    0
}

#[inline(always)]
pub(crate) fn cookie<C: EbpfContext>(ctx: &C) -> ProbeCookie {
    // SAFETY: reads the cookie userspace attached with this probe.
    ProbeCookie::decode(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) })
}

/// `a * b` for factors below 2^32, else `u64::MAX` (such a calloc fails anyway). LLVM
/// would turn an exact overflow check into a 128-bit multiply, which BPF lacks.
#[inline(always)]
pub(crate) fn mul(a: u64, b: u64) -> u64 {
    if (a | b) >> 32 != 0 {
        u64::MAX
    } else {
        a * b
    }
}

/// The first three integer arguments. Volatile reads at fixed offsets: the verifier
/// rejects a context pointer moved by a variable amount, which LLVM would otherwise build
/// when one of two arguments is chosen by the cookie.
#[inline(always)]
pub(crate) fn args3(ctx: &ProbeContext) -> [u64; 3] {
    // SAFETY: `regs` points at the probe's register set for the program's whole run.
    unsafe {
        let r = ctx.regs;
        [
            core::ptr::read_volatile(&raw const (*r).rdi),
            core::ptr::read_volatile(&raw const (*r).rsi),
            core::ptr::read_volatile(&raw const (*r).rdx),
        ]
    }
}

fn try_alloc_enter(ctx: &ProbeContext) -> Result<(), i32> {
    let c = cookie(ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let layer = c.layer as usize;
    if layer >= CALL_LAYERS || !uprobe_target_active(tgid) {
        return Ok(());
    }
    let Some(window) = window_of(layer) else {
        return Ok(());
    };
    let Some(t) = thread_state(tid) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer; only this thread touches its own entry.
    let t = unsafe { &mut *t };
    forget_stale_pymalloc(t, layer, window);
    if t.active & (1 << layer) != 0 {
        // A call nested in one of the same layer (reallocarray → realloc): the outer call
        // accounts for it.
        t.calls[layer].depth += 1;
        return Ok(());
    }
    let Some(kind) = AllocKind::from_u32(c.kind) else {
        return Ok(());
    };
    // The stack first: the verifier then walks its loops once, not once per kind below.
    let (flags, inherited) = upper_call(t, layer, tid, false);
    let (stack_id, ret_addr_at) = match inherited {
        Some(id) => (id, 0),
        None => {
            // SAFETY: `regs` is the probe's register set; rsp and rbp are read as numbers.
            let (rsp, rbp) = unsafe { ((*ctx.regs).rsp, (*ctx.regs).rbp) };
            let at = rsp + c.stack_delta as u64;
            // Only the malloc family waits for its return: CPython's allocators take their
            // stack at entry, as calls made inside them expect.
            let chain = stack::frame_chain_plausible(rsp, rbp);
            if layer != Layer::Libc as usize || chain {
                (stack::capture_at(ctx.as_ptr(), at, tid, chain), 0)
            } else {
                // No frame chain to walk: the caller alone is the native stack, and the
                // return probe has it in a register, for free. Python frames do not move
                // while the call runs.
                (0, at)
            }
        }
    };
    let [a0, a1, a2] = args3(ctx);
    let (size, arg_ptr) = match kind {
        AllocKind::Malloc => (a0, 0),
        AllocKind::Calloc => (mul(a0, a1), 0),
        AllocKind::Realloc => (a1, a0),
        AllocKind::Reallocarray => (mul(a1, a2), a0),
        AllocKind::PosixMemalign => (a2, a0),
        AllocKind::Aligned => (a1, 0),
        AllocKind::Pvalloc => (a0.div_ceil(PAGE_SIZE) * PAGE_SIZE, 0),
        AllocKind::CtxMalloc => (a1, 0),
        AllocKind::CtxCalloc => (mul(a1, a2), 0),
        AllocKind::CtxRealloc => (a2, a1),
        _ => return Ok(()),
    };
    t.calls[layer] = Pending {
        size,
        arg_ptr,
        stack_id,
        kind: c.kind,
        depth: 0,
        flags,
        join: 0,
        ret_addr_at,
    };
    t.active |= (1 << layer) | (1 << (ENTERED_SHIFT + layer as u32));
    begun_in(t, layer, window);
    Ok(())
}

fn try_alloc_exit(ctx: &RetProbeContext) -> Result<(), i32> {
    let c = cookie(ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let layer = c.layer as usize;
    if layer >= CALL_LAYERS {
        return Ok(());
    }
    // Sampled pymalloc: a window's return link goes in before its entry link, so a call
    // begun just before returns with no entry seen. It lies outside the sample: nothing
    // was lost.
    let window_edge = layer == Layer::Pymalloc as usize && pymalloc_sampled();
    let t = THREADS.get_ptr_mut(tid);
    // SAFETY: a valid map value pointer; only this thread touches its own entry.
    let Some(t) = t.map(|t| unsafe { &mut *t }) else {
        if uprobe_target_active(tgid) && !window_edge {
            count_drop(Drop::UnmatchedReturn);
        }
        return Ok(());
    };
    if t.active & (1 << layer) == 0 {
        if uprobe_target_active(tgid) && !window_edge {
            // The thread's first return of this layer with no entry ever seen: a call in
            // flight while the probes went in (group targets attach file-wide probes to
            // running processes whose threads libc's probes already know).
            count_drop(if t.active & (1 << (ENTERED_SHIFT + layer as u32)) == 0 {
                Drop::UnmatchedReturn
            } else {
                Drop::OrphanReturn
            });
        }
        return Ok(());
    }
    if t.calls[layer].depth > 0 {
        t.calls[layer].depth -= 1;
        return Ok(());
    }
    let mut pending = t.calls[layer];
    t.active &= !(1 << layer);
    if !uprobe_target_active(tgid) {
        return Ok(());
    }
    if pending.stack_id == 0 && pending.ret_addr_at != 0 {
        pending.stack_id = deferred_stack(ctx, tid);
    }
    let ret: u64 = ctx.ret();
    finish(tgid, c.layer, &pending, ret);
    if layer == Layer::Pymalloc as usize {
        t.last_block = ret;
        t.last_size = pending.size.min(u64::from(u32::MAX)) as u32;
    }
    Ok(())
}

/// The stack of a malloc-family call that left it for its return: taken now, with the
/// instruction pointer (back at the return address) as the caller.
#[inline(always)]
fn deferred_stack(ctx: &RetProbeContext, tid: u32) -> u64 {
    // SAFETY: `regs` is the probe's register set. A return probe runs with the instruction
    // pointer already back at the return address.
    let caller = unsafe { (*ctx.regs).rip };
    stack::capture(ctx.as_ptr(), Some(caller), tid, false)
}

/// Accounts a call that returned `ret`.
#[inline(always)]
pub(crate) fn finish(tgid: u32, layer: u32, pending: &Pending, ret: u64) {
    match AllocKind::from_u32(pending.kind) {
        Some(AllocKind::PosixMemalign) => {
            if ret as u32 != 0 {
                failed(layer);
                return;
            }
            // SAFETY: reads the pointer posix_memalign stored, checked by the helper.
            match unsafe { bpf_probe_read_user(pending.arg_ptr as *const u64) } {
                Ok(addr) => record_alloc(tgid, layer, addr, pending),
                Err(_) => count_drop(Drop::MemptrUnreadable),
            }
        }
        Some(
            AllocKind::Realloc
            | AllocKind::Reallocarray
            | AllocKind::CtxRealloc
            | AllocKind::SiteRealloc,
        ) => {
            if ret != 0 {
                if pending.arg_ptr != 0 {
                    record_free(tgid, layer, pending.arg_ptr);
                }
                record_alloc(tgid, layer, ret, pending);
            } else if pending.size == 0 && pending.arg_ptr != 0 {
                // glibc's realloc(p, 0) frees p and returns NULL.
                record_free(tgid, layer, pending.arg_ptr);
            } else {
                failed(layer);
            }
        }
        _ => {
            if ret != 0 {
                record_alloc(tgid, layer, ret, pending);
            } else {
                failed(layer);
            }
        }
    }
}

fn try_free_enter(ctx: &ProbeContext) -> Result<(), i32> {
    let c = cookie(ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let [a0, a1, _] = args3(ctx);
    let addr = if c.kind == AllocKind::CtxFree as u32 {
        a1
    } else {
        a0
    };
    let layer = c.layer as usize;
    if addr == 0 || layer >= CALL_LAYERS || !uprobe_target_active(tgid) {
        return Ok(());
    }
    let Some(window) = window_of(layer) else {
        return Ok(());
    };
    // A free made by an allocator of the same layer on its own behalf (inside realloc) is
    // the allocator's to account. glibc's realloc never calls the public free: the libc
    // layer skips the lookup.
    if layer != Layer::Libc as usize {
        // SAFETY: plain data read at once.
        if let Some(t) = unsafe { THREADS.get(tid) } {
            let stale = layer == Layer::Pymalloc as usize && t.pymalloc_window != window;
            if t.active & (1 << layer) != 0 && !stale {
                return Ok(());
            }
        }
    }
    record_free(tgid, c.layer, addr);
    Ok(())
}

#[inline(always)]
fn failed(layer: u32) {
    if let Some(s) = LAYER_STATS.get_ptr_mut(layer) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe { (*s).failed_allocs += 1 };
    }
}

/// Records a block handed out: live map, layer counters, histogram, stack totals.
#[inline(always)]
pub fn record_alloc(tgid: u32, layer: u32, addr: u64, p: &Pending) {
    let (ts_ns, timed) = alloc_time();
    let live = LiveAlloc {
        size: p.size,
        ts_ns,
        stack_id: p.stack_id,
        flags: p.flags | if timed { FLAG_TIMED } else { 0 },
        tgid,
    };
    live_insert(tgid, layer, addr, &live);
    if let Some(s) = LAYER_STATS.get_ptr_mut(layer) {
        // SAFETY: a per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*s).allocs += 1;
            (*s).alloc_bytes += p.size;
        }
    }
    let bucket = layer as usize * HIST_BUCKETS + size_bucket(p.size);
    if let Some(n) = SIZE_HIST.get_ptr_mut(bucket as u32) {
        // SAFETY: a per-CPU slot.
        unsafe { *n += 1 };
    }
    stack_add(
        StackKey {
            tgid,
            layer,
            stack_id: p.stack_id,
        },
        StackAgg {
            allocs: 1,
            alloc_bytes: p.size,
            frees: 0,
            freed_bytes: 0,
        },
    );
}

/// The allocation time of a block, and whether it is exact. Reading the clock costs ≈40 ns
/// here (as much as the rest of a free), so each CPU reads it for its first allocation in
/// each kernel tick (1–10 ms) and gives the others that time: ages are then at most a tick
/// early, and lifetimes are measured on the blocks with an exact time, a sample spread
/// evenly over time (every block, when allocations are sparser than ticks).
#[inline(always)]
fn alloc_time() -> (u64, bool) {
    // SAFETY: a helper without arguments.
    let tick = unsafe { bpf_jiffies64() };
    let Some(c) = TICK_CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return (unsafe { bpf_ktime_get_ns() }, true);
    };
    // SAFETY: this CPU's slot; only this CPU writes it while the program runs.
    let c = unsafe { &mut *c };
    if c[0] == tick && c[1] != 0 {
        return (c[1], false);
    }
    // SAFETY: as above.
    let now = unsafe { bpf_ktime_get_ns() };
    *c = [tick, now];
    (now, true)
}

/// Records a block given back; unknown blocks are counted, never subtracted.
#[inline(always)]
pub fn record_free(tgid: u32, layer: u32, addr: u64) {
    let Some(live) = live_take(tgid, layer, addr) else {
        if let Some(s) = LAYER_STATS.get_ptr_mut(layer) {
            // SAFETY: a per-CPU slot.
            unsafe { (*s).unmatched_frees += 1 };
        }
        return;
    };
    if live.flags & FLAG_TIMED != 0 {
        // SAFETY: a helper without arguments.
        let lifetime_us = (unsafe { bpf_ktime_get_ns() }).saturating_sub(live.ts_ns) / 1000;
        let bucket = layer as usize * HIST_BUCKETS + size_bucket(lifetime_us);
        if let Some(n) = LIFETIME_HIST.get_ptr_mut(bucket as u32) {
            // SAFETY: a per-CPU slot.
            unsafe { *n += 1 };
        }
    }
    if let Some(s) = LAYER_STATS.get_ptr_mut(layer) {
        // SAFETY: a per-CPU slot.
        unsafe {
            (*s).frees += 1;
            (*s).freed_bytes += live.size;
        }
    }
    stack_add(
        StackKey {
            tgid,
            layer,
            stack_id: live.stack_id,
        },
        StackAgg {
            allocs: 0,
            alloc_bytes: 0,
            frees: 1,
            freed_bytes: live.size,
        },
    );
}

/// The key word of table slot `i` of a bucket.
#[inline(always)]
fn slot_key(keys: *mut LiveBucket, i: usize) -> *mut u64 {
    // SAFETY: `keys` is a map value; only the address is taken.
    unsafe { &raw mut (*keys).keys[i] }
}

/// Reads a table key.
#[inline(always)]
fn key_load(at: *mut u64) -> u64 {
    // SAFETY: an aligned word of a map value: one load, never torn.
    unsafe { core::ptr::read_volatile(at) }
}

/// Swaps a table key from `old` to `new` if it is still `old` (BPF's compare-and-swap).
#[inline(always)]
fn key_swap(at: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: an aligned word of a map value.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(at, old, new)
    }
    .1
}

/// Blocks in the overflow map now.
#[inline(always)]
fn overflow_count() -> u64 {
    LIVE_OVERFLOW.get(0).copied().unwrap_or(0)
}

/// Counts a block into (`+1`) or out of (`-1`) the overflow map.
#[inline(always)]
fn overflow_add(n: i64) {
    if let Some(c) = LIVE_OVERFLOW.get_ptr_mut(0) {
        // SAFETY: an aligned map value, changed only atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(c, n as u64) };
    }
}

/// Tracks a live block: in the table if its bucket has room, else in the overflow map. A
/// stale entry for the same block (its free went unseen) is replaced.
#[inline(always)]
fn live_insert(tgid: u32, layer: u32, addr: u64, live: &LiveAlloc) {
    let hkey = AllocKey { tgid, layer, addr };
    if overflow_count() != 0 && LIVE_ALLOCS.remove(&hkey).is_ok() {
        overflow_add(-1);
    }
    if let Some(k) = live_key(tgid, layer, addr) {
        let b = live_bucket(k);
        if let Some(keys) = LIVE_KEYS.get_ptr_mut(b) {
            let base = b * LIVE_BUCKET_SLOTS as u32;
            let mut at = None;
            for i in 0..LIVE_BUCKET_SLOTS {
                if key_load(slot_key(keys, i)) == k
                    && LIVE_VALS
                        .get(base + i as u32)
                        .is_some_and(|v| v.tgid == tgid)
                {
                    at = Some(i);
                    break;
                }
            }
            if at.is_none() {
                for i in 0..LIVE_BUCKET_SLOTS {
                    let key = slot_key(keys, i);
                    if key_load(key) == 0 && key_swap(key, 0, k) {
                        at = Some(i);
                        break;
                    }
                }
            }
            // Nobody reads the slot before the block is freed, which is after this returns
            // (the allocator has not handed it out yet).
            if let Some(i) = at {
                if let Some(v) = LIVE_VALS.get_ptr_mut(base + i as u32) {
                    // SAFETY: the slot is ours: its key is this block's.
                    unsafe { *v = *live };
                }
                return;
            }
        }
    }
    if LIVE_ALLOCS.insert(&hkey, live, 0).is_ok() {
        overflow_add(1);
    } else {
        count_drop(Drop::LiveAllocsFull);
    }
}

/// Where a tracked block's record is.
#[derive(Clone, Copy)]
pub(crate) enum LiveAt {
    /// `LIVE_VALS[i]`.
    Table(u32),
    /// The overflow map `LIVE_ALLOCS`.
    Overflow,
}

/// Where block `addr` of `layer` in process `tgid` is tracked, if it is.
#[inline(always)]
pub(crate) fn live_find(tgid: u32, layer: u32, addr: u64) -> Option<LiveAt> {
    if let Some(k) = live_key(tgid, layer, addr) {
        let b = live_bucket(k);
        if let Some(keys) = LIVE_KEYS.get_ptr_mut(b) {
            let base = b * LIVE_BUCKET_SLOTS as u32;
            for i in 0..LIVE_BUCKET_SLOTS {
                if key_load(slot_key(keys, i)) == k
                    && LIVE_VALS
                        .get(base + i as u32)
                        .is_some_and(|v| v.tgid == tgid)
                {
                    return Some(LiveAt::Table(base + i as u32));
                }
            }
        }
    }
    if overflow_count() == 0 {
        return None;
    }
    let key = AllocKey { tgid, layer, addr };
    // SAFETY: only whether the entry exists is looked at.
    unsafe { LIVE_ALLOCS.get(&key) }.map(|_| LiveAt::Overflow)
}

/// Bytes requested for the tracked block at `at` (0 if its record is gone).
#[inline(always)]
pub(crate) fn live_size(tgid: u32, layer: u32, addr: u64, at: LiveAt) -> u64 {
    match at {
        LiveAt::Table(i) => LIVE_VALS.get(i).map_or(0, |v| v.size),
        // SAFETY: plain data copied out at once.
        LiveAt::Overflow => {
            unsafe { LIVE_ALLOCS.get(&AllocKey { tgid, layer, addr }) }.map_or(0, |v| v.size)
        }
    }
}

/// A tracked block handed out again (by a CPython free list) to code at `stack_id`: from
/// now on it is that stack's, as if allocated now. Its former stack counts it freed, the
/// new one allocated; the layer counts it `reused` (when the stacks differ).
#[inline(always)]
pub(crate) fn hand_over(tgid: u32, layer: u32, addr: u64, at: LiveAt, stack_id: u64) {
    let v = match at {
        LiveAt::Table(i) => LIVE_VALS.get_ptr_mut(i),
        LiveAt::Overflow => LIVE_ALLOCS.get_ptr_mut(&AllocKey { tgid, layer, addr }),
    };
    let Some(v) = v else {
        return;
    };
    let (ts_ns, timed) = alloc_time();
    // SAFETY: the block's own record: it is not freed while the code that took it runs.
    let (size, former) = unsafe {
        let (size, former) = ((*v).size, (*v).stack_id);
        (*v).stack_id = stack_id;
        (*v).ts_ns = ts_ns;
        (*v).flags = ((*v).flags & !FLAG_TIMED) | if timed { FLAG_TIMED } else { 0 };
        (size, former)
    };
    if former == stack_id {
        return;
    }
    if let Some(s) = LAYER_STATS.get_ptr_mut(layer) {
        // SAFETY: a per-CPU slot.
        unsafe { (*s).reused += 1 };
    }
    stack_add(
        StackKey {
            tgid,
            layer,
            stack_id: former,
        },
        StackAgg {
            allocs: 0,
            alloc_bytes: 0,
            frees: 1,
            freed_bytes: size,
        },
    );
    stack_add(
        StackKey {
            tgid,
            layer,
            stack_id,
        },
        StackAgg {
            allocs: 1,
            alloc_bytes: size,
            frees: 0,
            freed_bytes: 0,
        },
    );
}

/// Stops tracking a live block and returns it; `None` if it is not tracked.
#[inline(always)]
fn live_take(tgid: u32, layer: u32, addr: u64) -> Option<LiveAlloc> {
    if let Some(k) = live_key(tgid, layer, addr) {
        let b = live_bucket(k);
        if let Some(keys) = LIVE_KEYS.get_ptr_mut(b) {
            let base = b * LIVE_BUCKET_SLOTS as u32;
            for i in 0..LIVE_BUCKET_SLOTS {
                let key = slot_key(keys, i);
                if key_load(key) != k {
                    continue;
                }
                // The block is copied out before its slot is given back.
                let Some(v) = LIVE_VALS.get(base + i as u32).copied() else {
                    continue;
                };
                if v.tgid != tgid {
                    continue;
                }
                if key_swap(key, k, 0) {
                    return Some(v);
                }
                // Another thread freed it first (a double free in the target).
                return None;
            }
        }
    }
    if overflow_count() == 0 {
        return None;
    }
    let key = AllocKey { tgid, layer, addr };
    // SAFETY: plain data copied out before the entry is removed.
    let v = (unsafe { LIVE_ALLOCS.get(&key) }).copied()?;
    if LIVE_ALLOCS.remove(&key).is_ok() {
        overflow_add(-1);
    }
    Some(v)
}

/// Adds to a stack's totals: in this CPU's slot if the stack is the slot's, else the slot
/// goes to `STACK_STATS` and takes this stack.
#[inline(always)]
fn stack_add(key: StackKey, add: StackAgg) {
    let Some(slot) = STACK_AGG_SLOT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; only this CPU writes it while the program runs.
    let slot = unsafe { &mut *slot };
    if slot.key != key {
        if slot.key.stack_id != 0 {
            flush(&slot.key, &slot.agg);
        }
        slot.key = key;
        slot.agg = StackAgg::default();
    }
    slot.agg.add(&add);
}

/// Adds a slot's totals to `STACK_STATS`, atomically (other CPUs may add to the same
/// stack's); of two CPUs inserting a new stack at once, the one refused adds to the other's.
#[inline(always)]
fn flush(key: &StackKey, add: &StackAgg) {
    if let Some(a) = STACK_STATS.get_ptr_mut(key) {
        agg_add(a, add);
        return;
    }
    match STACK_STATS.insert(key, add, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e as i64 == -EEXIST => match STACK_STATS.get_ptr_mut(key) {
            Some(a) => agg_add(a, add),
            None => count_drop(Drop::StackStatsFull),
        },
        Err(_) => count_drop(Drop::StackStatsFull),
    }
}

/// `EEXIST`: an insert with `BPF_NOEXIST` found the key there.
const EEXIST: i64 = 17;
/// Adds `add` to the totals at `a` with one atomic add a field.
#[inline(always)]
fn agg_add(a: *mut StackAgg, add: &StackAgg) {
    let xadd = |at: *mut u64, n: u64| {
        // SAFETY: a field of a map value: an aligned u64, changed only atomically.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(at, n) };
    };
    // SAFETY: only the fields' addresses are taken.
    unsafe {
        xadd(&raw mut (*a).allocs, add.allocs);
        xadd(&raw mut (*a).alloc_bytes, add.alloc_bytes);
        xadd(&raw mut (*a).frees, add.frees);
        xadd(&raw mut (*a).freed_bytes, add.freed_bytes);
    }
}
