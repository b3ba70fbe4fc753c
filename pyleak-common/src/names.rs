//! The names userspace finds the kernel side's maps, programs and settings by. The kernel
//! side's statics carry the same names (a `#[map]` takes its name from its identifier);
//! a unit test of `pyleak-user` checks every one against the built eBPF object.

/// Processes traced: tgid → state.
pub const TARGETS: &str = "TARGETS";
/// Guarded inline allocator sites.
pub const SITES: &str = "SITES";
/// The live table's keys.
pub const LIVE_KEYS: &str = "LIVE_KEYS";
/// The live table's values.
pub const LIVE_VALS: &str = "LIVE_VALS";
/// Live blocks that did not fit the live table.
pub const LIVE_ALLOCS: &str = "LIVE_ALLOCS";
/// Interned stacks.
pub const STACKS: &str = "STACKS";
/// Per (pid, layer, stack) totals.
pub const STACK_STATS: &str = "STACK_STATS";
/// Each CPU's write-back slot in front of `STACK_STATS`.
pub const STACK_AGG_SLOT: &str = "STACK_AGG_SLOT";
/// Per-layer counters.
pub const LAYER_STATS: &str = "LAYER_STATS";
/// Allocation size histograms.
pub const SIZE_HIST: &str = "SIZE_HIST";
/// Lifetime histograms of freed blocks.
pub const LIFETIME_HIST: &str = "LIFETIME_HIST";
/// Lost events by reason.
pub const DROPS: &str = "DROPS";
/// The ring buffer of vm and page events.
pub const EVENTS: &str = "EVENTS";
/// How many targets are frozen.
pub const FROZEN_COUNT: &str = "FROZEN_COUNT";
/// How to walk each process's Python frames.
pub const PY_PROCS: &str = "PY_PROCS";
/// Layout templates of group targets' runtimes.
pub const PY_TEMPLATES: &str = "PY_TEMPLATES";
/// Changes to `PY_PROCS`: `[kernel's count, userspace's count]`, see `PY_EPOCH_USER`.
pub const PY_EPOCH: &str = "PY_EPOCH";
/// The pymalloc sampling window: `[generation, open]`.
pub const PYMALLOC_WINDOW: &str = "PYMALLOC_WINDOW";

/// Setting: native frames kept per stack.
pub const NATIVE_DEPTH: &str = "NATIVE_DEPTH";
/// Setting: which processes are counted (`FILTER_*`).
pub const FILTER_MODE: &str = "FILTER_MODE";
/// Setting: the traced cgroup's id.
pub const CGROUP_ID: &str = "CGROUP_ID";
/// Setting: the traced cgroup's level.
pub const CGROUP_LEVEL: &str = "CGROUP_LEVEL";
/// Setting: 1 when pymalloc is sampled in windows.
pub const PYMALLOC_SAMPLED: &str = "PYMALLOC_SAMPLED";
/// Setting: 1 to follow the children of `--pid` and command targets.
pub const FOLLOW_CHILDREN: &str = "FOLLOW_CHILDREN";
/// Setting: the launched command's pid, held at its interpreter's shutdown (0: none).
pub const HOLD_AT_FINALIZE: &str = "HOLD_AT_FINALIZE";

/// Entry of every allocating function.
pub const ALLOC_ENTER: &str = "alloc_enter";
/// Return of every allocating function.
pub const ALLOC_EXIT: &str = "alloc_exit";
/// Entry of every freeing function.
pub const FREE_ENTER: &str = "free_enter";
/// An inlined allocator site.
pub const SITE_ENTER: &str = "site_enter";
/// Where an inlined site's result is known.
pub const SITE_JOIN: &str = "site_join";
/// The return that ends an inlined site.
pub const SITE_JOIN_RET: &str = "site_join_ret";
/// An object given its first reference (`_Py_NewReference`): a free list's reuse.
pub const REUSE_ENTER: &str = "reuse_enter";
/// A block returned by a function that may take it off a free list (`new_keys_object`).
pub const REUSE_EXIT: &str = "reuse_exit";
/// Entry of a function that gives an object a block a free list may hand out (the dict
/// of `insert_to_emptydict`).
pub const REUSE_HOLDER_ENTER: &str = "reuse_holder_enter";
/// Its return: the block is read from the object.
pub const REUSE_HOLDER_EXIT: &str = "reuse_holder_exit";
/// Interpreter start-up.
pub const PY_INIT_ENTER: &str = "py_init_enter";
/// Interpreter shutdown.
pub const PY_FINALIZE_ENTER: &str = "py_finalize_enter";
/// A code object being freed (`code_dealloc`, `PyCode_Type.tp_dealloc`): bumps the code
/// epoch.
pub const CODE_DEALLOC_ENTER: &str = "code_dealloc_enter";
/// Empty probes at the same points (`--bare`).
pub const BARE_ENTER: &str = "bare_enter";
/// Empty return probes (`--bare`).
pub const BARE_EXIT: &str = "bare_exit";
/// An empty program on pyleak's tracepoints (`--bare`).
pub const BARE_TP: &str = "bare_tp";
/// `sched:sched_process_exit`.
pub const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
/// `task:task_newtask`: a target's new process.
pub const TASK_NEWTASK: &str = "task_newtask";
/// `sched:sched_process_exec`.
pub const SCHED_PROCESS_EXEC: &str = "sched_process_exec";
/// `syscalls:sys_enter_*` of the vm calls.
pub const SYS_ENTER_VM: &str = "sys_enter_vm";
/// `syscalls:sys_exit_*` of the vm calls.
pub const SYS_EXIT_VM: &str = "sys_exit_vm";
/// `exceptions:page_fault_user`.
pub const PAGE_FAULT: &str = "page_fault";

/// Every map name.
pub const MAPS: [&str; 18] = [
    PYMALLOC_WINDOW,
    TARGETS,
    SITES,
    LIVE_KEYS,
    LIVE_VALS,
    LIVE_ALLOCS,
    STACKS,
    STACK_STATS,
    STACK_AGG_SLOT,
    LAYER_STATS,
    SIZE_HIST,
    LIFETIME_HIST,
    DROPS,
    EVENTS,
    FROZEN_COUNT,
    PY_PROCS,
    PY_TEMPLATES,
    PY_EPOCH,
];
/// Every program name.
pub const PROGRAMS: [&str; 22] = [
    ALLOC_ENTER,
    ALLOC_EXIT,
    FREE_ENTER,
    SITE_ENTER,
    SITE_JOIN,
    SITE_JOIN_RET,
    REUSE_ENTER,
    REUSE_EXIT,
    REUSE_HOLDER_ENTER,
    REUSE_HOLDER_EXIT,
    PY_INIT_ENTER,
    PY_FINALIZE_ENTER,
    CODE_DEALLOC_ENTER,
    BARE_ENTER,
    BARE_EXIT,
    BARE_TP,
    SCHED_PROCESS_EXIT,
    SCHED_PROCESS_EXEC,
    TASK_NEWTASK,
    SYS_ENTER_VM,
    SYS_EXIT_VM,
    PAGE_FAULT,
];
/// Every setting (a read-only global).
pub const SETTINGS: [&str; 7] = [
    NATIVE_DEPTH,
    FILTER_MODE,
    CGROUP_ID,
    CGROUP_LEVEL,
    PYMALLOC_SAMPLED,
    FOLLOW_CHILDREN,
    HOLD_AT_FINALIZE,
];
