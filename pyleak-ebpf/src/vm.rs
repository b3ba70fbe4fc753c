//! The vm layer: `mmap`, `munmap`, `mremap`, `brk` (and page-dropping `madvise`) through
//! the raw syscall tracepoints. One program serves every enter, one every exit; the syscall
//! number tells them apart. Each completed call becomes one event in the ring buffer, where
//! userspace keeps an exact interval model (partial unmaps, moves, the break).

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext, EbpfContext,
};
use pyleak_common::{Layer, VmEvent, VmKind, VmPending, TARGET_ACTIVE};

use crate::{
    maps::{emit, target_state, THREADS},
    stack,
    thread::{thread_state, upper_call},
};

const NR_MMAP: i32 = 9;
const NR_MUNMAP: i32 = 11;
const NR_BRK: i32 = 12;
const NR_MREMAP: i32 = 25;
const NR_MADVISE: i32 = 28;
const MADV_DONTNEED: u64 = 4;
const MADV_FREE: u64 = 8;
const MADV_REMOVE: u64 = 9;
const MADV_DONTNEED_LOCKED: u64 = 24;

/// `syscalls:sys_enter_{mmap,munmap,mremap,brk,madvise}`: remember the arguments.
#[tracepoint]
pub fn sys_enter_vm(ctx: TracePointContext) -> u32 {
    let _ = try_sys_enter(&ctx);
    0
}

/// `syscalls:sys_exit_{mmap,munmap,mremap,brk,madvise}`: emit what the call did.
#[tracepoint]
pub fn sys_exit_vm(ctx: TracePointContext) -> u32 {
    let _ = try_sys_exit(&ctx);
    0
}

fn try_sys_enter(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if target_state(tgid) != TARGET_ACTIVE {
        return Ok(());
    }
    // SAFETY: offsets from the tracepoints' format files (all args are 8-byte slots from 16).
    let (nr, a0, a1, a2, a3, a4) = unsafe {
        (
            ctx.read_at::<i32>(8)?,
            ctx.read_at::<u64>(16)?,
            ctx.read_at::<u64>(24)?,
            ctx.read_at::<u64>(32)?,
            ctx.read_at::<u64>(40)?,
            ctx.read_at::<u64>(48)?,
        )
    };
    let pending = match nr {
        // addr slot: the fd; arg: prot << 32 | flags.
        NR_MMAP => VmPending {
            kind: VmKind::Mmap as u32 + 1,
            _pad: 0,
            addr: a4,
            len: a1,
            arg: (a2 << 32) | (a3 & 0xffff_ffff),
        },
        NR_MUNMAP => VmPending {
            kind: VmKind::Munmap as u32 + 1,
            _pad: 0,
            addr: a0,
            len: a1,
            arg: 0,
        },
        NR_MREMAP => VmPending {
            kind: VmKind::Mremap as u32 + 1,
            _pad: 0,
            addr: a0,
            len: a1,
            arg: a2,
        },
        NR_BRK => VmPending {
            kind: VmKind::Brk as u32 + 1,
            _pad: 0,
            addr: a0,
            len: 0,
            arg: 0,
        },
        NR_MADVISE => {
            let advice = a2 & 0xffff_ffff;
            if !matches!(
                advice,
                MADV_DONTNEED | MADV_FREE | MADV_REMOVE | MADV_DONTNEED_LOCKED
            ) {
                return Ok(());
            }
            VmPending {
                kind: VmKind::Madvise as u32 + 1,
                _pad: 0,
                addr: a0,
                len: a1,
                arg: advice,
            }
        }
        _ => return Ok(()),
    };
    if let Some(t) = thread_state(tid) {
        // SAFETY: a valid map value pointer; only this thread touches its own entry.
        unsafe { (*t).syscall = pending };
    }
    Ok(())
}

fn try_sys_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(t) = THREADS.get_ptr_mut(tid) else {
        return Ok(());
    };
    // SAFETY: a valid map value pointer; only this thread touches its own entry.
    let t = unsafe { &mut *t };
    let sc = t.syscall;
    if sc.kind == 0 {
        return Ok(());
    }
    t.syscall.kind = 0;
    if target_state(tgid) != TARGET_ACTIVE {
        return Ok(());
    }
    // SAFETY: `ret` sits at offset 16 in every sys_exit format.
    let ret = unsafe { ctx.read_at::<i64>(16)? };
    let failed = ret < 0 && ret > -4096;
    let kind = sc.kind - 1;
    let (addr, len, arg, arg2) = if kind == VmKind::Mmap as u32 {
        if failed {
            return Ok(());
        }
        (ret as u64, sc.len, sc.arg, sc.addr)
    } else if kind == VmKind::Munmap as u32 || kind == VmKind::Madvise as u32 {
        if ret != 0 {
            return Ok(());
        }
        (sc.addr, sc.len, sc.arg, 0)
    } else if kind == VmKind::Mremap as u32 {
        if failed {
            return Ok(());
        }
        (sc.addr, sc.len, sc.arg, ret as u64)
    } else {
        (sc.addr, 0, ret as u64, 0)
    };
    let (flags, inherited) = upper_call(t, Layer::Vm as usize, tid, true);
    let stack_id = match inherited {
        Some(id) => id,
        None => stack::capture_user(ctx.as_ptr(), tid),
    };
    emit(VmEvent {
        kind,
        tgid,
        addr,
        len,
        arg,
        arg2,
        stack_id,
        ts_ns: 0,
        flags,
        tid,
    });
    Ok(())
}
