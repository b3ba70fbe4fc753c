//! The pages layer: user page faults (`exceptions:page_fault_user`, and
//! `page_fault_kernel` for user addresses the kernel touches on the process's behalf, as in
//! `read()` into a fresh buffer). Each fault becomes one event; userspace counts a page once
//! until it is unmapped.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext, EbpfContext,
};
use pyleak_common::{Layer, VmEvent, VmKind, TARGET_ACTIVE};

use crate::{
    maps::{emit_quiet, in_probe, target_state, THREADS},
    stack,
    thread::upper_call,
};

/// Highest user-space address on x86_64 (47-bit).
const USER_MAX: u64 = 0x0000_8000_0000_0000;
const PAGE_MASK: u64 = !0xfff;

/// `exceptions:page_fault_user` / `page_fault_kernel`: a page of a traced process faulted.
#[tracepoint]
pub fn page_fault(ctx: TracePointContext) -> u32 {
    let _ = try_page_fault(&ctx);
    0
}

fn try_page_fault(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if in_probe() || target_state(tgid) != TARGET_ACTIVE {
        return Ok(());
    }
    // SAFETY: offsets from the tracepoint's format file.
    let (address, error_code) = unsafe { (ctx.read_at::<u64>(8)?, ctx.read_at::<u64>(24)?) };
    if address >= USER_MAX {
        return Ok(());
    }
    // SAFETY: a valid map value pointer; only this thread touches its own entry.
    let upper = THREADS
        .get_ptr_mut(tid)
        .map(|t| upper_call(unsafe { &mut *t }, Layer::Pages as usize, tid, true));
    let (flags, stack_id) = match upper {
        Some((flags, Some(id))) => (flags, id),
        _ => (0, stack::capture_user(ctx.as_ptr(), tid)),
    };
    emit_quiet(VmEvent {
        kind: VmKind::Fault as u32,
        tgid,
        addr: address & PAGE_MASK,
        len: 4096,
        arg: error_code,
        arg2: 0,
        stack_id,
        ts_ns: 0,
        flags: flags | crate::sampling::window_flag(),
        tid,
    });
    Ok(())
}
