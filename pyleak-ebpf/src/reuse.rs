//! Blocks a CPython free list hands out again (see `pyleak-user`'s `attach/reuse.rs`): a
//! dict, tuple, list or float dropped by one line sits on its type's free list, still a
//! pymalloc block, until another line takes it. Where it is taken, the block is counted
//! again under the taker's stack (`alloc::hand_over`), so the line that dropped it is not
//! blamed for what another keeps. A block the thread has just allocated is left alone.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use pyleak_common::{AllocKind, Layer, GC_HEAD_BYTES, TPFLAGS_HAVE_GC, TYPE_FLAGS_OFFSET};

use crate::{
    alloc::{args3, cookie, hand_over, live_find, live_size},
    maps::{pymalloc_handover_window, pymalloc_sampled, uprobe_target_active, THREADS},
    sites::reg,
    stack,
};

/// `_Py_NewReference(op)`: an object gets its first reference. At the function's entry
/// (`AllocKind::ReuseObject`: `op` its argument, its caller's return address on the stack)
/// or at a copy inlined into a caller (`AllocKind::SiteReuseObject`: `op` in the register
/// the cookie names, the caller the probed code itself).
#[uprobe]
pub fn reuse_enter(ctx: ProbeContext) -> u32 {
    let c = cookie(&ctx);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !uprobe_target_active(tgid) || pymalloc_handover_window().is_none() {
        return 0;
    }
    // SAFETY: `regs` is the probe's register set; rsp, rbp and rip are read as numbers.
    let (rsp, rbp, rip) = unsafe { ((*ctx.regs).rsp, (*ctx.regs).rbp, (*ctx.regs).rip) };
    let (op, caller) = if c.kind == AllocKind::SiteReuseObject as u32 {
        (reg(&ctx, c.stack_delta as u8), Caller::Is(rip))
    } else {
        let at = rsp + (c.stack_delta & 0xffff) as u64;
        (args3(&ctx)[0], Caller::At(at))
    };
    let managed = u64::from(c.stack_delta >> 16);
    let blocks = if pymalloc_sampled() {
        // Blocks tracked in a window stay in the table when their frees go unseen between
        // windows: only the block the object's type says is looked up.
        match preheader(op, managed) {
            Some(pre) => [op.wrapping_sub(pre), 0, 0],
            None => return 0,
        }
    } else {
        // Exact mode sees every free, so a tracked block that contains the object is its
        // block: each pre-header size the version allows is tried (no pre-header, a GC
        // header or the pre-header flags' two words, both), with no read of its type.
        let both = if managed != 0 {
            op.wrapping_sub(GC_HEAD_BYTES + 16)
        } else {
            0
        };
        [op, op.wrapping_sub(GC_HEAD_BYTES), both]
    };
    let chain = stack::frame_chain_plausible(rsp, rbp);
    reused(ctx.as_ptr(), blocks, op, caller, chain, true);
    0
}

/// Bytes before object `op` where its block starts, from its type's flags (two reads of
/// the target's memory): a GC header for `Py_TPFLAGS_HAVE_GC`, two words for any of the
/// version's pre-header flags `managed`.
#[inline(always)]
fn preheader(op: u64, managed: u64) -> Option<u64> {
    // SAFETY: reads `op->ob_type` and the type's `tp_flags` from the target's memory,
    // checked by the helper.
    let ty = unsafe { bpf_probe_read_user((op + 8) as *const u64) }.ok()?;
    // SAFETY: as above.
    let flags = unsafe { bpf_probe_read_user((ty + TYPE_FLAGS_OFFSET) as *const u64) }.ok()?;
    let mut pre = 0;
    if flags & TPFLAGS_HAVE_GC != 0 {
        pre += GC_HEAD_BYTES;
    }
    if flags & managed != 0 {
        pre += 16;
    }
    Some(pre)
}

/// The return of `new_keys_object`: the dict keys table it returns is the block.
#[uretprobe]
pub fn reuse_exit(ctx: RetProbeContext) -> u32 {
    let block: u64 = ctx.ret();
    // SAFETY: a return probe runs with the instruction pointer back at the return address.
    let caller = unsafe { (*ctx.regs).rip };
    table_reused(ctx.as_ptr(), block, caller);
    0
}

/// The native caller of a hand-over: known, or a return address still to be read.
#[derive(Clone, Copy)]
enum Caller {
    /// This address.
    Is(u64),
    /// The return address stored in the target's stack at this address: read only when
    /// a block is handed over, not for the objects a thread has just allocated.
    At(u64),
}

/// Hands the first tracked block of `blocks` that holds address `obj` to the current
/// stack, unless this thread has just allocated it. `object`: an object's first reference,
/// which ends the thread's "just allocated" block (`ThreadState::last_block`): each new
/// object gets exactly one, right after its block is allocated, while a keys table made
/// before an object (`{}`, then its first insert) is seen by its own probes first.
#[inline(always)]
fn reused(ctx: *mut c_void, blocks: [u64; 3], obj: u64, caller: Caller, chain: bool, object: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let layer = Layer::Pymalloc as u32;
    if !uprobe_target_active(tgid) || pymalloc_handover_window().is_none() {
        return;
    }
    let (mut last, mut last_size) = (0, 0);
    if let Some(t) = THREADS.get_ptr_mut(tid) {
        // SAFETY: a valid map value pointer; only this thread touches its own entry.
        unsafe {
            (last, last_size) = ((*t).last_block, (*t).last_size);
            if object {
                (*t).last_block = 0;
            }
        }
    }
    if last != 0
        && (blocks[0] == last || blocks[1] == last || blocks[2] == last)
        && holds(last, u64::from(last_size), obj)
    {
        return;
    }
    let mut found = None;
    for addr in blocks {
        if addr == 0 {
            continue;
        }
        if let Some(at) = live_find(tgid, layer, addr) {
            if holds(addr, live_size(tgid, layer, addr, at), obj) {
                found = Some((addr, at));
                break;
            }
        }
    }
    let Some((addr, at)) = found else {
        return;
    };
    let stack_id = match caller {
        Caller::Is(ip) => stack::capture(ctx, Some(ip), tid, chain),
        Caller::At(at) => stack::capture_at(ctx, at, tid, chain),
    };
    hand_over(tgid, layer, addr, at, stack_id);
}

/// A dict keys table `block` returned to native `caller`: handed to the current stack if
/// tracked.
#[inline(always)]
fn table_reused(ctx: *mut c_void, block: u64, caller: u64) {
    reused(ctx, [block, 0, 0], block, Caller::Is(caller), false, false);
}

/// Whether the block at `block` of `size` requested bytes holds address `obj` (it starts
/// there, or runs past it: blocks do not overlap, so a live one that runs past `obj` from
/// below is `obj`'s).
#[inline(always)]
fn holds(block: u64, size: u64, obj: u64) -> bool {
    block == obj || (block < obj && block.wrapping_add(size) > obj)
}

/// Entry of `insert_to_emptydict`: keeps the dict (argument `cookie & 0xff`) for the
/// return.
#[uprobe]
pub fn reuse_holder_enter(ctx: ProbeContext) -> u32 {
    let c = cookie(&ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if !uprobe_target_active(tgid) {
        return 0;
    }
    let Some(window) = pymalloc_handover_window() else {
        return 0;
    };
    let args = args3(&ctx);
    let holder = match c.stack_delta & 0xff {
        0 => args[0],
        1 => args[1],
        2 => args[2],
        _ => return 0,
    };
    if let Some(t) = THREADS.get_ptr_mut(tid) {
        // SAFETY: a valid map value pointer; only this thread touches its own entry.
        unsafe {
            (*t).reuse_holder = holder;
            (*t).reuse_window = window;
        }
    }
    0
}

/// Return of `insert_to_emptydict`: the dict's keys table (at byte `cookie >> 8` of it)
/// is the block.
#[uretprobe]
pub fn reuse_holder_exit(ctx: RetProbeContext) -> u32 {
    let c = cookie(&ctx);
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(t) = THREADS.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: a valid map value pointer; only this thread touches its own entry.
    let (holder, window) = unsafe {
        let h = ((*t).reuse_holder, (*t).reuse_window);
        (*t).reuse_holder = 0;
        h
    };
    // A call begun in an earlier window (its entry seen, its return link since taken out
    // and put in again) holds a dict that may be gone.
    if holder == 0 || pymalloc_handover_window() != Some(window) {
        return 0;
    }
    let field = holder.wrapping_add(u64::from(c.stack_delta >> 8));
    // SAFETY: reads a pointer from the target's memory, checked by the helper.
    let Ok(block) = (unsafe { bpf_probe_read_user(field as *const u64) }) else {
        return 0;
    };
    // SAFETY: a return probe runs with the instruction pointer back at the return address.
    let caller = unsafe { (*ctx.regs).rip };
    table_reused(ctx.as_ptr(), block, caller);
    0
}
