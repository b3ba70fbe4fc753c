//! When a traced process's state becomes final: its interpreter starts shutting down
//! (`Py_FinalizeEx`) or the process exits. From then on its frees no longer change what is
//! reported live, so userspace can read the maps at leisure.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{tracepoint, uprobe},
    programs::{ProbeContext, TracePointContext},
};
use pyleak_common::{
    Drop, VmEvent, VmKind, FILTER_CGROUP, FILTER_PIDS, TARGET_ACTIVE, TARGET_FROZEN,
};

use crate::{
    maps::emit,
    maps::{count_drop, filter_mode, target_state, FROZEN_COUNT, TARGETS, THREADS},
    pystack::PY_PROCS,
};

/// Uprobe on `Py_FinalizeEx`: freeze the process.
#[uprobe]
pub fn py_finalize_enter(_ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    freeze(tgid);
    0
}

/// `sched:sched_process_exit`: forget the thread; freeze the process when its last
/// thread exits.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let _ = THREADS.remove(tid);
    // SAFETY: `group_dead` is a bool at offset 32 of the format.
    let group_dead = unsafe { ctx.read_at::<u8>(32) }.unwrap_or(0);
    if group_dead != 0 {
        freeze(tgid);
    }
    0
}

/// `sched:sched_process_exec`: with `--cgroup` (a process of the group) or `--all` (any
/// process), tell userspace, which attaches to the files the new program maps. The layout
/// of the old program's Python runtime no longer applies.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let mode = filter_mode();
    if mode == FILTER_PIDS {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if mode == FILTER_CGROUP && target_state(tgid) == 0 {
        return 0;
    }
    let _ = PY_PROCS.remove(&tgid);
    emit(VmEvent {
        kind: VmKind::Exec as u32,
        tgid,
        addr: 0,
        len: 0,
        arg: 0,
        arg2: 0,
        stack_id: 0,
        ts_ns: 0,
        flags: 0,
        tid: 0,
    });
    0
}

/// `CLONE_THREAD` (`include/uapi/linux/sched.h`): the new task is a thread of its parent.
const CLONE_THREAD: u64 = 0x0001_0000;

/// `task:task_newtask`: with `--cgroup` or `--all`, a new process (not a thread) of a traced
/// process whose Python layout the kernel has inherits that layout: its memory is a copy
/// of its parent's, the interpreter at the same addresses (a `multiprocessing` worker, a
/// pre-forking server). Without it, what such a child allocates before userspace has found
/// it and placed its runtime (up to a second) has native stacks only. Userspace places it
/// again when it examines the child; exec drops it.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let mode = filter_mode();
    if mode == FILTER_PIDS {
        return 0;
    }
    // SAFETY: `clone_flags` is a u64 at offset 32 of the format, `pid` an i32 at 8.
    let (flags, child) = unsafe { (ctx.read_at::<u64>(32), ctx.read_at::<i32>(8)) };
    let (Ok(flags), Ok(child)) = (flags, child) else {
        return 0;
    };
    if flags & CLONE_THREAD != 0 || child <= 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if mode == FILTER_CGROUP && target_state(tgid) == 0 {
        return 0;
    }
    // SAFETY: a map value, copied out at once.
    let Some(layout) = (unsafe { PY_PROCS.get(&tgid) }).copied() else {
        return 0;
    };
    let _ = PY_PROCS.insert(&(child as u32), &layout, 0);
    0
}

#[inline(always)]
fn freeze(tgid: u32) {
    if target_state(tgid) != TARGET_ACTIVE {
        return;
    }
    if TARGETS.insert(tgid, TARGET_FROZEN, 0).is_err() {
        count_drop(Drop::TargetsFull);
        return;
    }
    if let Some(n) = FROZEN_COUNT.get_ptr_mut(0) {
        // SAFETY: a map value; concurrent freezes of two processes at once may lose an
        // increment, which only makes uprobes look the state up more often.
        unsafe { *n += 1 };
    }
    emit(VmEvent {
        kind: VmKind::Freeze as u32,
        tgid,
        addr: 0,
        len: 0,
        arg: 0,
        arg2: 0,
        stack_id: 0,
        ts_ns: 0,
        flags: 0,
        tid: 0,
    });
}
