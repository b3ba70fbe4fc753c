//! Types shared by pyleak's eBPF programs (`pyleak-ebpf`) and its userspace (`pyleak-user`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, so the same bytes
//! mean the same thing on both sides. Map sizes live here too, next to the types they hold.
#![no_std]

mod layer;
mod live;
pub mod names;
mod python;

pub use layer::*;
pub use live::*;
pub use python::*;

/// Threads with allocator calls or syscalls in flight, over all traced processes.
pub const THREADS_ENTRIES: u32 = 16 << 10;
/// Distinct stacks interned (allocated on first use: a Python program has tens of
/// thousands, one per call path and instruction).
pub const STACKS_ENTRIES: u32 = 128 << 10;
/// Distinct (process, layer, stack) aggregates at most (allocated on first use, ~150 bytes
/// each as `bpftool map show` counts them, whatever the CPU count: ~37 MiB full). Twice
/// [`STACKS_ENTRIES`]: a stack's totals are kept per layer, and in exact mode one
/// interpreter running pyperformance's `float` with its imports makes 96 k.
pub const STACK_STATS_ENTRIES: u32 = 256 << 10;
/// Processes traced at once.
pub const TARGETS_ENTRIES: u32 = 4096;

/// Cookie of the shutdown probe on `Py_FinalizeEx` when the file has no later point
/// probed: freeze the process there (Debian's LTO build, whose `_Py_FinishPendingCalls`
/// has no symbol).
pub const FINALIZE_FREEZE_HERE: u64 = 0;
/// Cookie of the shutdown probe on `Py_FinalizeEx` when the file's `_Py_FinishPendingCalls`
/// is probed too: only mark the process as finalizing. `Py_FinalizeEx` first joins the
/// non-daemon threads (`wait_for_thread_shutdown`, `Python/pylifecycle.c`, 3.8–3.13), and
/// what they do until then still counts.
pub const FINALIZE_MARK: u64 = 1;
/// Cookie of the shutdown probe on `_Py_FinishPendingCalls`, which `Py_FinalizeEx` calls
/// right after joining the threads and before the `atexit` functions and the teardown (in
/// a build that does not name it, on the instruction after `Py_FinalizeEx`'s call of
/// `wait_for_thread_shutdown`): freeze a process marked by [`FINALIZE_MARK`] there
/// (`Py_EndInterpreter` calls it too, in 3.12+, and is not a shutdown of the process).
pub const FINALIZE_THREADS_JOINED: u64 = 2;
/// Processes between `Py_FinalizeEx` and its `_Py_FinishPendingCalls` at once.
pub const FINALIZING_ENTRIES: u32 = 1024;
/// Bytes of the ring buffer that carries vm and page events to userspace.
pub const EVENTS_RING_BYTES: u32 = 16 << 20;
/// Native frames kept per stack (the immediate caller, then frame pointers).
pub const MAX_NATIVE_FRAMES: usize = 32;
/// Python frames kept per stack.
pub const MAX_PY_FRAMES: usize = 128;
/// Size-histogram buckets per layer (see [`size_bucket`]).
pub const HIST_BUCKETS: usize = 1024;

/// What an allocator entry point does with its arguments; carried in the uprobe cookie.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    /// `malloc(size)`, `valloc(size)`, `PyObject_Malloc(size)`.
    Malloc = 0,
    /// `calloc(nmemb, size)`.
    Calloc = 1,
    /// `realloc(ptr, size)`.
    Realloc = 2,
    /// `reallocarray(ptr, nmemb, size)`.
    Reallocarray = 3,
    /// `posix_memalign(&ptr, align, size)`: the block comes back through memory.
    PosixMemalign = 4,
    /// `aligned_alloc(align, size)`, `memalign(align, size)`.
    Aligned = 5,
    /// `pvalloc(size)`: size rounded up to whole pages.
    Pvalloc = 6,
    /// `free(ptr)`.
    Free = 7,
    /// `PyObject_Malloc(ctx, size)` reached through a `PyMemAllocatorEx` table.
    CtxMalloc = 8,
    /// `PyObject_Calloc(ctx, nelem, elsize)` through a table.
    CtxCalloc = 9,
    /// `PyObject_Realloc(ctx, ptr, size)` through a table.
    CtxRealloc = 10,
    /// `PyObject_Free(ctx, ptr)` through a table.
    CtxFree = 11,
    /// A `malloc(ctx, size)` inlined behind a guard (`cmp $fn,reg; jne call-through-table`):
    /// the probe sits on the guard's jump; arguments in the registers [`SiteInfo`] names.
    SiteMalloc = 12,
    /// A guarded inline `calloc(ctx, nelem, elsize)`.
    SiteCalloc = 13,
    /// A guarded inline `realloc(ctx, ptr, size)`.
    SiteRealloc = 14,
    /// A guarded inline `free(ctx, ptr)`.
    SiteFree = 15,
    /// Where a guarded inline allocation's result is in a register ([`SiteInfo::result_reg`]).
    SiteJoin = 16,
    /// `_Py_NewReference(op)`: an object given its first reference, fresh from pymalloc or
    /// taken again from a CPython free list (tuples, lists, dicts, floats…); its block
    /// starts before `op` by the object's pre-header (`Include/internal/pycore_object.h`
    /// `_PyType_PreHeaderSize`: 16 bytes of GC header for `Py_TPFLAGS_HAVE_GC`, two words
    /// for the version's pre-header flags). The cookie's `stack_delta`: see
    /// [`object_cookie`].
    ReuseObject = 17,
    /// The return of `new_keys_object` (`Objects/dictobject.c`): a dict keys table, fresh
    /// or taken again from the keys free list; the block is the return value.
    ReuseBlock = 18,
    /// `insert_to_emptydict(…, mp, …)` (`Objects/dictobject.c`): an empty dict gets its
    /// first keys table, fresh or off the keys free list; at the return the table is
    /// `mp->ma_keys`. The cookie's `stack_delta` packs the argument index of `mp` (low
    /// byte) and the offset of `ma_keys` (next bytes): see [`holder_cookie`].
    ReuseHolder = 19,
    /// A `_Py_NewReference(op)` an LTO build inlined into its caller (3.9–3.11's
    /// `Objects/object.c`: `if (_Py_tracemalloc_config.tracing)
    /// _PyTraceMalloc_NewReference(op);` then the reference count set): the probe sits on the
    /// jump of that tracemalloc check, `op` in a register. The cookie's `stack_delta`: see
    /// [`site_object_cookie`].
    SiteReuseObject = 20,
}

/// The `stack_delta` of a [`AllocKind::ReuseObject`] cookie: how far below `rsp` the
/// return address is (low 16 bits) and the `tp_flags` bits that put two pre-header words
/// before an object in this CPython (high 16 bits; all below bit 5 in 3.11–3.14).
pub const fn object_cookie(stack_delta: u32, preheader_flags: u32) -> u32 {
    (stack_delta & 0xffff) | (preheader_flags << 16)
}

/// The `stack_delta` of a [`AllocKind::SiteReuseObject`] cookie: the register holding the
/// object at the probe (low byte, numbered as in [`SiteInfo`]) and the pre-header flags
/// as in [`object_cookie`] (high 16 bits).
pub const fn site_object_cookie(reg: u8, preheader_flags: u32) -> u32 {
    reg as u32 | (preheader_flags << 16)
}

/// `offsetof(PyTypeObject, tp_flags)` in every CPython 3.8–3.14
/// (`Include/cpython/object.h`: the variable-size head, then 18 pointer-sized slots).
pub const TYPE_FLAGS_OFFSET: u64 = 168;
/// `Py_TPFLAGS_HAVE_GC` (`Include/object.h`): a GC header precedes the object.
pub const TPFLAGS_HAVE_GC: u64 = 1 << 14;
/// `sizeof(PyGC_Head)` on 64-bit builds.
pub const GC_HEAD_BYTES: u64 = 16;

/// The `stack_delta` of a [`AllocKind::ReuseHolder`] cookie: the holder is argument `arg`
/// (System V order), its block pointer at byte `field` of it.
pub const fn holder_cookie(arg: u32, field: u32) -> u32 {
    arg | (field << 8)
}

impl AllocKind {
    /// The kind with this number, if any.
    pub fn from_u32(n: u32) -> Option<AllocKind> {
        Some(match n {
            0 => AllocKind::Malloc,
            1 => AllocKind::Calloc,
            2 => AllocKind::Realloc,
            3 => AllocKind::Reallocarray,
            4 => AllocKind::PosixMemalign,
            5 => AllocKind::Aligned,
            6 => AllocKind::Pvalloc,
            7 => AllocKind::Free,
            8 => AllocKind::CtxMalloc,
            9 => AllocKind::CtxCalloc,
            10 => AllocKind::CtxRealloc,
            11 => AllocKind::CtxFree,
            12 => AllocKind::SiteMalloc,
            13 => AllocKind::SiteCalloc,
            14 => AllocKind::SiteRealloc,
            15 => AllocKind::SiteFree,
            16 => AllocKind::SiteJoin,
            17 => AllocKind::ReuseObject,
            18 => AllocKind::ReuseBlock,
            19 => AllocKind::ReuseHolder,
            20 => AllocKind::SiteReuseObject,
            _ => return None,
        })
    }
}

/// The 64-bit cookie given to every allocator uprobe: which kind, which layer, and how far
/// below `rsp` the return address sits at the attach point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeCookie {
    /// What the function does with its arguments.
    pub kind: u32,
    /// Which [`Layer`] it belongs to.
    pub layer: u32,
    /// Bytes pushed since entry at the attach point: the caller is at `[rsp + stack_delta]`.
    pub stack_delta: u32,
}

impl ProbeCookie {
    /// Packs the cookie into the 64 bits the kernel carries.
    pub const fn encode(self) -> u64 {
        (self.kind as u64 & 0xff)
            | ((self.layer as u64 & 0xff) << 8)
            | ((self.stack_delta as u64) << 16)
    }

    /// Unpacks a cookie made by [`ProbeCookie::encode`].
    pub const fn decode(raw: u64) -> ProbeCookie {
        ProbeCookie {
            kind: (raw & 0xff) as u32,
            layer: ((raw >> 8) & 0xff) as u32,
            stack_delta: (raw >> 16) as u32,
        }
    }
}

/// Guarded inline allocator sites and their joins described at once, over all files.
pub const SITES_ENTRIES: u32 = 8192;
/// [`SiteInfo`] register number meaning "a constant" (`arg_const`).
pub const REG_CONST: u8 = 0xfe;
/// [`SiteInfo`] register number meaning "the stack slot at rsp + `arg_const`".
pub const REG_STACK: u8 = 0xfd;
/// [`SiteInfo`] register number meaning "none" (a guard that compares memory).
pub const REG_NONE: u8 = 0xff;

/// One guarded inline allocator call (an LTO/PGO build's `if (table.malloc == &fn)
/// { inlined fn } else { table.malloc(ctx, ...) }`) or its join, indexed by the probe
/// cookie's third field. Registers are numbered rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp,
/// r8…r15 (0–15).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteInfo {
    /// The function the guard compares the table's pointer with: equal means the inlined
    /// copy runs (the probe counts it); else the call goes through the table.
    pub expected: u64,
    /// The table field the guard compares, when it compares memory (`guard_reg == REG_NONE`).
    pub guard_mem: u64,
    /// Constant arguments (`arg_reg[i] == REG_CONST`), or the stack offsets of arguments in
    /// stack slots (`REG_STACK`).
    pub arg_const: [u64; 2],
    /// Guards: the id of the join completing the call. Joins: their own id. Never 0.
    pub join: u32,
    /// The register the guard compares.
    pub guard_reg: u8,
    /// Where the arguments after ctx are (size; nelem, elsize; ptr, size; ptr).
    pub arg_reg: [u8; 2],
    /// Joins: the register holding the block (`REG_STACK`: the slot at rsp + `arg_const[0]`).
    pub result_reg: u8,
}

/// Set on a block a lower layer allocated while serving a `pymalloc` request.
pub const FLAG_FOR_PYMALLOC: u32 = 1;
/// Set on a block a lower layer allocated while serving a `pymem_raw` request.
pub const FLAG_FOR_PYMEM_RAW: u32 = 2;
/// Set on a mapping made while serving a libc malloc-family request.
pub const FLAG_FOR_LIBC: u32 = 4;
/// Set on a live block whose allocation time is exact, so its lifetime is measured when it
/// is freed; the others carry the time of their CPU's first allocation in the same kernel
/// tick (see `pyleak-ebpf`'s `alloc_time`).
pub const FLAG_TIMED: u32 = 8;
/// `PYMALLOC_WINDOW[1]` while a pymalloc sampling window is open.
pub const WINDOW_OPEN: u32 = 1;
/// `PYMALLOC_WINDOW[1]` while a window closes: allocations and frees no longer count,
/// free-list hand-overs still do (until userspace has fingerprinted the window's samples).
pub const WINDOW_CLOSING: u32 = 2;
/// Set on a page fault taken while a pymalloc sampling window was open.
pub const FLAG_IN_WINDOW: u32 = 16;
/// Set on a page fault taken once the first pymalloc sampling window has opened (from then
/// on, faults measure what the windows saw).
pub const FLAG_SAMPLING: u32 = 32;
/// Set on a stack whose Python frames did not all fit.
pub const STACK_PY_TRUNCATED: u32 = 1;
/// Set on a stack whose Python frames could not be read.
pub const STACK_PY_UNREADABLE: u32 = 2;
/// Set on a stack whose first native frame is an instruction pointer (a tracepoint's), not
/// a return address.
pub const STACK_LEAF_IS_IP: u32 = 4;

/// An allocator call entered and not yet returned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Bytes requested (already multiplied out for calloc/reallocarray).
    pub size: u64,
    /// The block being resized (realloc) or the `void **` to read (posix_memalign).
    pub arg_ptr: u64,
    /// Interned stack of the calling thread.
    pub stack_id: u64,
    /// [`AllocKind`] number.
    pub kind: u32,
    /// Nested calls of the same layer inside this one (e.g. reallocarray → realloc), ignored.
    pub depth: u32,
    /// `FLAG_*` bits inherited from an upper layer's call in flight.
    pub flags: u32,
    /// For a call inlined at a guarded site ([`SiteInfo`]): the id of the join probe that
    /// completes it; 0 for a real call.
    pub join: u32,
    /// While the stack is not captured yet (`stack_id` 0): where the call's return address
    /// is on the stack. The stack is taken at the return, where the return address is the
    /// instruction pointer, unless a lower layer needs it first.
    pub ret_addr_at: u64,
}

/// Layers whose calls can be in flight on a thread (those probed with uprobes).
pub const CALL_LAYERS: usize = 3;

/// Where the "entry seen" bits start in [`ThreadState::active`].
pub const ENTERED_SHIFT: u32 = 16;

/// Per-thread state, keyed by thread id: the allocator calls in flight, one slot per layer
/// (a `malloc` inside `PyObject_Malloc` is two), and the syscall in flight.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    /// Calls in flight, indexed by [`Layer`] number.
    pub calls: [Pending; CALL_LAYERS],
    /// Bit `1 << layer` set while `calls[layer]` is in flight; bit
    /// `1 << (ENTERED_SHIFT + layer)` once an entry of that layer was seen on this thread
    /// (a return before any is of a call in flight when its probes were attached).
    pub active: u32,
    /// The pymalloc sampling window `calls[Layer::Pymalloc]` began in: a call from an
    /// earlier window lost its return when the window's links were taken out, and is stale.
    pub pymalloc_window: u32,
    /// The mmap-family syscall in flight, if `syscall.kind != 0`.
    pub syscall: VmPending,
    /// The last pymalloc block this thread was seen allocating, until the thread's next
    /// object gets its first reference: an object or keys table made in it is new, not one
    /// a free list hands out again. Cleared there, or a block the thread made, dropped to
    /// a free list and took back with no allocation between would stay charged to the line
    /// that made it.
    pub last_block: u64,
    /// The holder of a [`AllocKind::ReuseHolder`] call in flight (0: none).
    pub reuse_holder: u64,
    /// The sampling window that call began in.
    pub reuse_window: u32,
    /// Bytes requested for `last_block` (at most `u32::MAX`): an object whose address
    /// falls in `[last_block, last_block + last_size)` was made in it.
    pub last_size: u32,
}

/// Key of per-stack aggregates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StackKey {
    /// Process id.
    pub tgid: u32,
    /// [`Layer`] number.
    pub layer: u32,
    /// Interned stack id.
    pub stack_id: u64,
}

/// Totals for one (process, layer, stack), kept in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackAgg {
    /// Allocations made from this stack.
    pub allocs: u64,
    /// Their bytes.
    pub alloc_bytes: u64,
    /// Of those, how many were freed.
    pub frees: u64,
    /// Their bytes.
    pub freed_bytes: u64,
}

impl StackAgg {
    /// Adds `o`'s counts to these.
    #[inline(always)]
    pub fn add(&mut self, o: &StackAgg) {
        self.allocs += o.allocs;
        self.alloc_bytes += o.alloc_bytes;
        self.frees += o.frees;
        self.freed_bytes += o.freed_bytes;
    }
}

/// The per-CPU write-back slot in front of the per-stack totals: updates for the stack a CPU
/// saw last add up here, and reach the hash map only when another stack comes (a loop
/// allocating and freeing at one place touches no hash map for its totals). Readers add
/// every CPU's slot to the map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackAggSlot {
    /// Whose totals these are; `stack_id` 0 when the slot is empty.
    pub key: StackKey,
    /// Not yet in the map.
    pub agg: StackAgg,
}

/// Per-layer counters, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Successful allocations seen.
    pub allocs: u64,
    /// Their bytes.
    pub alloc_bytes: u64,
    /// Frees of blocks allocated while tracing.
    pub frees: u64,
    /// Their bytes.
    pub freed_bytes: u64,
    /// Frees of blocks not known (allocated before tracing began, or dropped).
    pub unmatched_frees: u64,
    /// Allocation calls that failed (returned NULL).
    pub failed_allocs: u64,
    /// Live blocks a CPython free list handed out again to code at another stack: the
    /// block was counted again under the stack that took it (pymalloc only).
    pub reused: u64,
}

/// Why an event was lost; index into the `DROPS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// A live-table bucket and the overflow map `LIVE_ALLOCS` were full: an allocation is
    /// not tracked.
    LiveAllocsFull = 0,
    /// An allocator returned to a thread with no call in flight, though the thread's
    /// earlier calls of that layer were seen entering: no probe should have missed.
    OrphanReturn = 1,
    /// `STACKS` was full: an event kept no stack.
    StacksFull = 2,
    /// `STACK_STATS` was full: a stack's totals are short.
    StackStatsFull = 3,
    /// The ring buffer was full: a vm or page event is lost.
    RingFull = 4,
    /// An allocator returned without a matching entry, before any entry of its layer was
    /// seen on the thread: a call in flight while its probes were attached.
    UnmatchedReturn = 5,
    /// A user stack could not be read.
    StackUnreadable = 6,
    /// `THREADS` was full: a thread's calls are not tracked.
    ThreadsFull = 7,
    /// posix_memalign's result could not be read back.
    MemptrUnreadable = 8,
    /// `TARGETS` was full: a process of a traced cgroup could not be frozen at exit or
    /// interpreter shutdown, so its teardown's frees count.
    TargetsFull = 9,
}

/// Number of [`Drop`] reasons.
pub const NUM_DROPS: usize = 10;

impl Drop {
    /// Every reason, in index order.
    pub const ALL: [Drop; NUM_DROPS] = [
        Drop::LiveAllocsFull,
        Drop::OrphanReturn,
        Drop::StacksFull,
        Drop::StackStatsFull,
        Drop::RingFull,
        Drop::UnmatchedReturn,
        Drop::StackUnreadable,
        Drop::ThreadsFull,
        Drop::MemptrUnreadable,
        Drop::TargetsFull,
    ];

    /// Short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Drop::LiveAllocsFull => "live_allocs_full",
            Drop::OrphanReturn => "orphan_return",
            Drop::StacksFull => "stacks_full",
            Drop::StackStatsFull => "stack_stats_full",
            Drop::RingFull => "ring_full",
            Drop::UnmatchedReturn => "unmatched_return",
            Drop::StackUnreadable => "stack_unreadable",
            Drop::ThreadsFull => "threads_full",
            Drop::MemptrUnreadable => "memptr_unreadable",
            Drop::TargetsFull => "targets_full",
        }
    }
}

/// One Python frame as captured in the kernel: resolved to names in userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    /// Address of the code object.
    pub code: u64,
    /// Instruction position (`f_lasti`, or the instruction pointer's offset in the code).
    pub lasti: u32,
    /// A signature of the code object read in the kernel, to detect reused addresses.
    pub sig: u32,
}

/// An interned stack: native frames (leaf first) and Python frames (leaf first).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackTrace {
    /// Used entries of `native`.
    pub native_len: u32,
    /// Used entries of `py`.
    pub py_len: u32,
    /// `STACK_*` bits.
    pub flags: u32,
    /// Thread id that first produced this stack (for the report's thread column).
    pub tid: u32,
    /// Native return addresses, leaf first.
    pub native: [u64; MAX_NATIVE_FRAMES],
    /// Python frames, leaf first.
    pub py: [PyFrame; MAX_PY_FRAMES],
}

/// What a vm or page event in the ring buffer describes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmKind {
    /// `mmap` returned `addr` for `len` bytes; `arg` = prot << 32 | flags.
    Mmap = 0,
    /// `munmap(addr, len)` succeeded.
    Munmap = 1,
    /// `mremap(addr, len, arg = new_len)` returned `arg2` = new address.
    Mremap = 2,
    /// `brk(addr)` returned `arg` = the new break.
    Brk = 3,
    /// A user page fault at `addr`; `arg` = error code.
    Fault = 4,
    /// `madvise(addr, len, arg = advice)` dropped pages (`MADV_DONTNEED`, `MADV_FREE`...).
    Madvise = 5,
    /// The process's interpreter began its teardown (see [`FINALIZE_FREEZE_HERE`]) or the
    /// process exited: its state is frozen from here on.
    Freeze = 6,
    /// A stack with Python frames was interned for the first time (`stack_id`): userspace
    /// reads its code objects now, while they surely exist.
    NewStack = 7,
    /// A process of the traced group (or, with `--all`, any process) called `exec`:
    /// userspace looks at its files and attaches to the ones not probed yet.
    Exec = 8,
    /// A traced `--pid` or command target made a new process (fork, vfork, clone without
    /// `CLONE_THREAD`): `tgid` is the child, `arg` its parent, `arg2` the clone flags. The
    /// kernel traces it from here on; userspace attaches its uprobes.
    Fork = 9,
}

/// An event in the ring buffer (vm layer, pages layer, freezes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmEvent {
    /// [`VmKind`] number.
    pub kind: u32,
    /// Process id.
    pub tgid: u32,
    /// Address (mapping start, fault address, break requested).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Kind-specific (see [`VmKind`]).
    pub arg: u64,
    /// Kind-specific second value (see [`VmKind`]).
    pub arg2: u64,
    /// Interned stack of the thread.
    pub stack_id: u64,
    /// `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Thread id.
    pub tid: u32,
}

/// Arguments of a syscall entered and not yet returned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmPending {
    /// [`VmKind`] number plus one (0: no syscall in flight).
    pub kind: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// First argument.
    pub addr: u64,
    /// Second argument.
    pub len: u64,
    /// Third argument.
    pub arg: u64,
}

/// `FILTER_MODE`: the processes in `TARGETS`, probed one by one (`--pid`, a command).
pub const FILTER_PIDS: u32 = 0;
/// `FILTER_MODE`: every process in the cgroup `CGROUP_ID` (at `CGROUP_LEVEL`) and its
/// descendants, with file-wide uprobes; `TARGETS` holds only frozen processes.
pub const FILTER_CGROUP: u32 = 1;
/// `FILTER_MODE`: the processes in `TARGETS`, with file-wide uprobes (`--all`).
pub const FILTER_PID_SET: u32 = 2;

/// Distinct Python runtime files whose layout the kernel can apply by itself to a process
/// that starts later (see [`py_init_cookie`]).
pub const PY_TEMPLATES_ENTRIES: u32 = 64;

/// The cookie of a `py_init_enter` probe: the link-time address of the probed function,
/// and (when not 0) one plus the index of the layout template for its file.
pub const fn py_init_cookie(vaddr: u64, template: Option<u32>) -> u64 {
    let t = match template {
        Some(i) => i as u64 + 1,
        None => 0,
    };
    (vaddr & PY_INIT_VADDR_MASK) | (t << 48)
}

/// The address part of a [`py_init_cookie`].
pub const PY_INIT_VADDR_MASK: u64 = (1 << 48) - 1;

/// Value of the `TARGETS` map: the process is traced and not frozen.
pub const TARGET_ACTIVE: u32 = 1;
/// Value of the `TARGETS` map: the process has begun shutting down; its state is final.
pub const TARGET_FROZEN: u32 = 2;

/// Histogram bucket of an allocation size: exact below 16, then 16 linear steps per power
/// of two (relative error under 6.25%).
#[inline(always)]
pub fn size_bucket(size: u64) -> usize {
    if size < 16 {
        return size as usize;
    }
    let log = 63 - size.leading_zeros() as u64;
    let sub = (size >> (log - 4)) & 0xf;
    ((log - 3) * 16 + sub) as usize
}

/// Smallest size that falls into `bucket` (inverse of [`size_bucket`]).
pub fn bucket_low(bucket: usize) -> u64 {
    if bucket < 16 {
        return bucket as u64;
    }
    let log = (bucket / 16) as u64 + 3;
    let sub = (bucket % 16) as u64;
    (1u64 << log) | (sub << (log - 4))
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is #[repr(C)], Copy, made of integers only, with explicit
    // padding fields so no byte is uninitialised.
    unsafe impl aya::Pod for super::AllocKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LiveAlloc {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LiveBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ThreadState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StackKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StackAgg {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StackAggSlot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LayerStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StackTrace {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VmEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PyProc {}
    // SAFETY: repr(C), Copy, no padding (8+8+16+4+1+2+1 bytes).
    unsafe impl aya::Pod for super::SiteInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_is_listed_numbered_and_named_once() {
        for (i, layer) in Layer::ALL.into_iter().enumerate() {
            assert_eq!(layer as usize, i, "Layer::ALL in call order");
            assert_eq!(Layer::from_u32(i as u32), Some(layer));
            assert_eq!(Layer::named(layer.name()), Some(layer));
            assert_eq!(layer.is_uprobed(), Layer::UPROBED.contains(&layer));
            assert_eq!(LAYERS[i].layer, layer, "LAYERS in call order");
            // Uprobe layers are the first CALL_LAYERS, each with its own on-behalf bit.
            assert_eq!(layer.is_uprobed(), i < CALL_LAYERS);
            assert_eq!(layer.info().on_behalf != 0, layer.is_uprobed());
            if i < CALL_LAYERS {
                assert_eq!(ON_BEHALF[i], layer.info().on_behalf);
                assert_eq!(
                    ON_BEHALF[..i]
                        .iter()
                        .filter(|&&f| f == ON_BEHALF[i])
                        .count(),
                    0
                );
            }
        }
        assert_eq!(Layer::from_u32(NUM_LAYERS as u32), None);
    }

    #[test]
    fn live_keys_round_trip_and_refuse_what_does_not_fit() {
        for (tgid, layer, addr) in [
            (1, 0, 0x10),
            (4_194_303, 2, 0x7fff_ffff_fff0),
            (524_289, 1, 0x5555_5555_9000),
        ] {
            let k = live_key(tgid, layer, addr).expect("fits");
            assert_ne!(k, 0);
            assert_eq!(live_key_parts(k), (layer, addr));
            assert!(live_bucket(k) < LIVE_TABLE_BUCKETS);
        }
        // Process ids equal in their low 19 bits share a key: the slot's tgid tells them
        // apart.
        assert_eq!(live_key(1, 2, 0x1000), live_key(1 + (1 << 19), 2, 0x1000));
        assert_eq!(live_key(1, 2, 0), None);
        assert_eq!(live_key(1, 2, 0x1008), None);
        assert_eq!(live_key(1, 2, 1 << 47), None);
    }

    #[test]
    fn buckets_are_monotonic_and_invertible() {
        let mut last = 0;
        for size in 0..100_000u64 {
            let b = size_bucket(size);
            assert!(b >= last, "bucket went down at {size}");
            assert!(
                bucket_low(b) <= size,
                "{size} below its bucket's low {}",
                bucket_low(b)
            );
            assert_eq!(size_bucket(bucket_low(b)), b);
            last = b;
        }
        assert!(size_bucket(u64::MAX) < HIST_BUCKETS);
        assert_eq!(size_bucket(15), 15);
        assert_eq!(size_bucket(16), 16);
        assert_eq!(size_bucket(17), 17);
        assert_eq!(size_bucket(32), 32);
        assert_eq!(size_bucket(34), 33);
    }

    #[test]
    fn cookie_round_trips() {
        let c = ProbeCookie {
            kind: AllocKind::PosixMemalign as u32,
            layer: Layer::Libc as u32,
            stack_delta: 24,
        };
        assert_eq!(ProbeCookie::decode(c.encode()), c);
    }
}
