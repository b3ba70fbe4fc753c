//! When a traced process's state becomes final: its interpreter starts tearing itself
//! down (in `Py_FinalizeEx`, once its non-daemon threads are joined) or the process
//! exits. From then on its frees no longer change what is reported live, so userspace can
//! read the maps at leisure. Also where a process begins: a target's children (fork,
//! vfork, clone) and new programs (exec).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_attach_cookie},
    macros::{map, tracepoint, uprobe},
    maps::LruHashMap,
    programs::{ProbeContext, TracePointContext},
    EbpfContext as _,
};
use pyleak_common::{
    Drop, VmEvent, VmKind, FILTER_CGROUP, FILTER_PIDS, FINALIZE_MARK, FINALIZE_THREADS_JOINED,
    FINALIZING_ENTRIES, TARGET_ACTIVE, TARGET_FROZEN,
};

use crate::{
    maps::emit_urgent,
    maps::{count_drop, filter_mode, target_state, FROZEN_COUNT, TARGETS, THREADS},
    pystack::{bump_code_epoch, bump_py_epoch, PY_PROCS},
};

/// The launched command's pid when its state is to be read at its interpreter's shutdown,
/// before the interpreter tears it down (sampled pymalloc: a last judgement of the
/// samples; `--census`: a last heap census), else 0. Set by userspace before load.
#[no_mangle]
static HOLD_AT_FINALIZE: u32 = 0;

/// `SIGURG` (`include/uapi/asm-generic/signal.h`): ignored by default, so that were it
/// ever delivered without pyleak's tracer to take it, nothing would happen.
const SIGURG: u32 = 23;

/// Processes inside `Py_FinalizeEx` that have not reached its `_Py_FinishPendingCalls`
/// yet: tgid → 1.
#[map]
static FINALIZING: LruHashMap<u32, u8> = LruHashMap::with_max_entries(FINALIZING_ENTRIES, 0);

/// Uprobe on the interpreter's shutdown, by its cookie: on `Py_FinalizeEx`, freeze the
/// process (`FINALIZE_FREEZE_HERE`) or mark it ([`FINALIZE_MARK`]); on
/// `_Py_FinishPendingCalls` ([`FINALIZE_THREADS_JOINED`]), freeze a marked process, its
/// non-daemon threads joined and its heap still whole. Where it freezes, the launched
/// command's main thread (`HOLD_AT_FINALIZE`), which pyleak ptraces, is also sent a
/// `SIGURG`: it stops for its tracer before its next instruction, pyleak reads its heap as
/// it is before teardown and lets it go on with the signal suppressed (`targets::launch`).
#[uprobe]
pub fn py_finalize_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: reads the cookie userspace attached with this probe.
    match unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } {
        FINALIZE_MARK => {
            let _ = FINALIZING.insert(&tgid, &1, 0);
            return 0;
        }
        FINALIZE_THREADS_JOINED => {
            if FINALIZING.remove(&tgid).is_err() {
                return 0;
            }
        }
        _ => {}
    }
    freeze(tgid);
    // SAFETY: a read-only global, patched by userspace before load.
    let hold = unsafe { core::ptr::read_volatile(&HOLD_AT_FINALIZE) };
    if hold != 0 && tgid == hold && tid == tgid {
        // SAFETY: a helper call with a signal number; it signals the current thread only
        // (`bpf_send_signal_thread`, kernel/trace/bpf_trace.c).
        unsafe { aya_ebpf::helpers::generated::bpf_send_signal_thread(SIGURG) };
    }
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
        // Its pid may be used again, by a process whose code objects sit elsewhere. Only a
        // process with a layout was ever walked, so only its exit can make a cached first
        // line stale.
        if PY_PROCS.get_ptr(&tgid).is_some() {
            bump_code_epoch();
        }
        freeze(tgid);
    }
    0
}

/// 1 to follow the children of `--pid` and command targets (`--no-follow`: 0). Set by
/// userspace before load.
#[no_mangle]
static FOLLOW_CHILDREN: u32 = 0;

/// Whether children of `--pid` and command targets are followed.
#[inline(always)]
fn follow_children() -> bool {
    // SAFETY: a read-only global, patched by userspace before load.
    unsafe { core::ptr::read_volatile(&FOLLOW_CHILDREN) != 0 }
}

/// `clone(2)`'s flag for a new thread of the same process (`include/uapi/linux/sched.h`).
const CLONE_THREAD: u64 = 0x0001_0000;

/// `task:task_newtask` (fired in `copy_process` by the parent, before the child first
/// runs), for a new process (fork, vfork, clone without `CLONE_THREAD`):
/// - of a traced `--pid` or command target: the child is traced from its first
///   instruction by the tracepoints (vm, pages, exit), takes its parent's Python layout (a
///   fork's memory is its parent's; an exec drops it), and userspace is told so it
///   attaches the child's own uprobes (a multi-uprobe link with a pid fires in that
///   process only);
/// - with `--cgroup` or `--all`, of a traced process whose Python layout the kernel has:
///   the child inherits that layout (a `multiprocessing` worker, a pre-forking server).
///   Without it, what such a child allocates before userspace has found it and placed its
///   runtime (up to a second) has native stacks only. Userspace places it again when it
///   examines the child; exec drops it. Userspace is told of the fork (with `--cgroup`, of
///   any process of the group; with `--all`, of a Python process): a worker that lives
///   and exits between two scans of the group is then still known as its parent's fork,
///   its frames named from the family's memory, its memory kept and retired like any
///   member's.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let mode = filter_mode();
    if mode == FILTER_PIDS && !follow_children() {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: `clone_flags` is a u64 at offset 32 and `pid` an i32 at offset 8 of the
    // tracepoint's format (`events/task/task_newtask/format`).
    let (flags, child) = unsafe {
        (
            ctx.read_at::<u64>(32).unwrap_or(CLONE_THREAD),
            ctx.read_at::<i32>(8).unwrap_or(0) as u32,
        )
    };
    if flags & CLONE_THREAD != 0 || child == 0 {
        return 0;
    }
    if mode != FILTER_PIDS {
        if mode == FILTER_CGROUP && target_state(parent) == 0 {
            return 0;
        }
        // SAFETY: a map value, copied out at once.
        let layout = unsafe { PY_PROCS.get(&parent) }.copied();
        if let Some(layout) = layout {
            let _ = PY_PROCS.insert(&child, &layout, 0);
            bump_py_epoch();
        }
        if mode == FILTER_CGROUP || layout.is_some() {
            announce_fork(child, parent, flags);
        }
        return 0;
    }
    if target_state(parent) != TARGET_ACTIVE {
        return 0;
    }
    if TARGETS.insert(child, TARGET_ACTIVE, 0).is_err() {
        count_drop(Drop::TargetsFull);
        return 0;
    }
    // SAFETY: a plain value copied out at once.
    if let Some(mut layout) = unsafe { PY_PROCS.get(&parent) }.copied() {
        // The parent's `code_dealloc` probe is the parent's alone: no cached first lines
        // until userspace has put in the child's.
        layout.line_cache = 0;
        let _ = PY_PROCS.insert(&child, &layout, 0);
        bump_py_epoch();
    }
    announce_fork(child, parent, flags);
    0
}

/// Tells userspace that `parent` made process `child` with `clone(2)` flags `flags`.
#[inline(always)]
fn announce_fork(child: u32, parent: u32, flags: u64) {
    emit_urgent(VmEvent {
        kind: VmKind::Fork as u32,
        tgid: child,
        addr: 0,
        len: 0,
        arg: parent as u64,
        arg2: flags,
        stack_id: 0,
        ts_ns: 0,
        flags: 0,
        tid: 0,
    });
}

/// `sched:sched_process_exec`: with `--cgroup` (a process of the group), `--all` (any
/// process), or a followed `--pid`/command target, tell userspace, which attaches to the
/// files the new program maps. The layout of the old program's Python runtime no longer
/// applies (a launched command's layout, still waiting for its interpreter with a bias of
/// 0, is for the program being exec'd and stays).
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let mode = filter_mode();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // A new program: its code objects may sit where the old one's did (in a process with
    // a layout: only those were walked). Attached whatever the mode, for this.
    if PY_PROCS.get_ptr(&tgid).is_some() {
        bump_code_epoch();
    }
    if mode == FILTER_PIDS {
        if !follow_children() || target_state(tgid) != TARGET_ACTIVE {
            return 0;
        }
        // SAFETY: a plain field copied out at once.
        if unsafe { PY_PROCS.get(&tgid) }.is_some_and(|p| p.bias != 0) {
            let _ = PY_PROCS.remove(&tgid);
            bump_py_epoch();
        }
    } else {
        if mode == FILTER_CGROUP && target_state(tgid) == 0 {
            return 0;
        }
        if PY_PROCS.remove(&tgid).is_ok() {
            bump_py_epoch();
        }
    }
    emit_urgent(VmEvent {
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
    emit_urgent(VmEvent {
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
