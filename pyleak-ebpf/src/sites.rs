//! Allocator calls an LTO build inlined behind a guard (see `pyleak-user`'s
//! `attach/sites.rs`): a probe on the guard's jump stands for the call's entry, one at the
//! join for its return. They share the alloc/free path of `alloc`.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
    EbpfContext,
};
use pyleak_common::{
    AllocKind, Layer, Pending, SiteInfo, CALL_LAYERS, ENTERED_SHIFT, REG_CONST, REG_NONE, REG_STACK,
};

use crate::{
    alloc::{cookie, finish, mul, record_free},
    maps::{uprobe_target_active, SITES, THREADS},
    stack,
    thread::{begun_in, forget_stale_pymalloc, thread_state, upper_call, window_of},
};

/// Register `i` of the probe's register set (numbered as in [`SiteInfo`]), 0 for none.
/// One fixed-offset read per arm: the verifier rejects a variable context offset.
#[inline(always)]
pub(crate) fn reg(ctx: &ProbeContext, i: u8) -> u64 {
    let r = ctx.regs;
    // SAFETY: `regs` points at the probe's register set for the program's whole run.
    unsafe {
        match i {
            0 => core::ptr::read_volatile(&raw const (*r).rax),
            1 => core::ptr::read_volatile(&raw const (*r).rbx),
            2 => core::ptr::read_volatile(&raw const (*r).rcx),
            3 => core::ptr::read_volatile(&raw const (*r).rdx),
            4 => core::ptr::read_volatile(&raw const (*r).rsi),
            5 => core::ptr::read_volatile(&raw const (*r).rdi),
            6 => core::ptr::read_volatile(&raw const (*r).rbp),
            7 => core::ptr::read_volatile(&raw const (*r).rsp),
            8 => core::ptr::read_volatile(&raw const (*r).r8),
            9 => core::ptr::read_volatile(&raw const (*r).r9),
            10 => core::ptr::read_volatile(&raw const (*r).r10),
            11 => core::ptr::read_volatile(&raw const (*r).r11),
            12 => core::ptr::read_volatile(&raw const (*r).r12),
            13 => core::ptr::read_volatile(&raw const (*r).r13),
            14 => core::ptr::read_volatile(&raw const (*r).r14),
            15 => core::ptr::read_volatile(&raw const (*r).r15),
            _ => 0,
        }
    }
}

#[inline(always)]
fn site_arg(ctx: &ProbeContext, s: &SiteInfo, i: usize) -> u64 {
    let r = if i == 0 { s.arg_reg[0] } else { s.arg_reg[1] };
    let k = if i == 0 {
        s.arg_const[0]
    } else {
        s.arg_const[1]
    };
    if r == REG_CONST {
        k
    } else if r == REG_STACK {
        let at = reg(ctx, 7).wrapping_add(k);
        // SAFETY: reads a stack slot of the target, checked by the helper.
        unsafe { bpf_probe_read_user(at as *const u64) }.unwrap_or(0)
    } else {
        reg(ctx, r)
    }
}

/// The guard of an allocator call an LTO/PGO build inlined (`cmp $fn,reg; jne
/// through-the-table`): when the table still points at `fn`, the inlined copy runs and
/// this probe stands for the call's entry; else the call goes through the table, to
/// functions probed on their own.
#[uprobe]
pub fn site_enter(ctx: ProbeContext) -> u32 {
    let _ = try_site_enter(&ctx);
    0
}

/// Where a guarded inline allocation's block is in a register: the call's return.
#[uprobe]
pub fn site_join(ctx: ProbeContext) -> u32 {
    let _ = try_site_join(&ctx);
    0
}

/// The return of a function whose guarded inline allocation is a tail call (`jmp
/// realloc@plt`): the block is its return value.
#[uretprobe]
pub fn site_join_ret(ctx: RetProbeContext) -> u32 {
    let _ = try_site_join(&ProbeContext::new(ctx.as_ptr()));
    0
}

fn try_site_enter(ctx: &ProbeContext) -> Result<(), i32> {
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
    let Some(s) = SITES.get(c.stack_delta) else {
        return Ok(());
    };
    let guard = if s.guard_reg == REG_NONE {
        // SAFETY: reads the table field from the target's memory, checked by the helper.
        unsafe { bpf_probe_read_user(s.guard_mem as *const u64) }.unwrap_or(0)
    } else {
        reg(ctx, s.guard_reg)
    };
    if guard != s.expected {
        return Ok(());
    }
    let a0 = site_arg(ctx, s, 0);
    let Some(t) = thread_state(tid) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer; only this thread touches its own entry.
    let t = unsafe { &mut *t };
    forget_stale_pymalloc(t, layer, window);
    if t.active & (1 << layer) != 0 && t.calls[layer].join == 0 {
        // Inside a probed call of the same layer (a tracemalloc hook called from the
        // exported PyObject_Malloc): that call accounts for this one, as for nested calls.
        return Ok(());
    }
    let (size, arg_ptr, kind) = match AllocKind::from_u32(c.kind) {
        Some(AllocKind::SiteMalloc) => (a0, 0, AllocKind::Malloc),
        Some(AllocKind::SiteCalloc) => (mul(a0, site_arg(ctx, s, 1)), 0, AllocKind::Malloc),
        Some(AllocKind::SiteRealloc) => (site_arg(ctx, s, 1), a0, AllocKind::SiteRealloc),
        Some(AllocKind::SiteFree) => {
            // No allocation of this layer is in flight on this thread now: forget one
            // whose join was never reached (it failed, or went where pyleak did not look).
            if t.active & (1 << layer) != 0 && t.calls[layer].join != 0 {
                t.active &= !(1 << layer);
            }
            if a0 != 0 {
                record_free(tgid, c.layer, a0);
            }
            return Ok(());
        }
        _ => return Ok(()),
    };
    let (flags, inherited) = upper_call(t, layer, tid, false);
    let stack_id = match inherited {
        Some(id) => id,
        None => stack::capture(ctx.as_ptr(), None, tid, true),
    };
    t.calls[layer] = Pending {
        size,
        arg_ptr,
        stack_id,
        kind: kind as u32,
        depth: 0,
        flags,
        join: s.join,
        ret_addr_at: 0,
    };
    t.active |= (1 << layer) | (1 << (ENTERED_SHIFT + layer as u32));
    begun_in(t, layer, window);
    Ok(())
}

fn try_site_join(ctx: &ProbeContext) -> Result<(), i32> {
    let c = cookie(ctx);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let layer = c.layer as usize;
    if layer >= CALL_LAYERS {
        return Ok(());
    }
    let Some(s) = SITES.get(c.stack_delta) else {
        return Ok(());
    };
    let t = THREADS.get_ptr_mut(tid);
    // SAFETY: a valid map value pointer; only this thread touches its own entry.
    let Some(t) = t.map(|t| unsafe { &mut *t }) else {
        return Ok(());
    };
    if t.active & (1 << layer) == 0 || t.calls[layer].join != s.join {
        return Ok(());
    }
    let pending = t.calls[layer];
    t.active &= !(1 << layer);
    if !uprobe_target_active(tgid) {
        return Ok(());
    }
    let ret = if s.result_reg == REG_STACK {
        let at = reg(ctx, 7).wrapping_add(s.arg_const[0]);
        // SAFETY: reads a stack slot of the target, checked by the helper.
        unsafe { bpf_probe_read_user(at as *const u64) }.unwrap_or(0)
    } else {
        reg(ctx, s.result_reg)
    };
    finish(tgid, c.layer, &pending, ret);
    // As at a function's return: the object's first reference, next, is not a hand-over
    // (an inlined `_Py_NewReference` probed further on would count the block again, on a
    // stack that differs by its native frame).
    if layer == Layer::Pymalloc as usize {
        t.last_block = ret;
        t.last_size = pending.size.min(u64::from(u32::MAX)) as u32;
    }
    Ok(())
}
