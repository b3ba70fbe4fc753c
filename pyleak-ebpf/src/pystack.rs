//! Python frames of the current thread, read from the interpreter's own structures with the
//! layout userspace put in `PY_PROCS` (docs/python-stacks.md has the offsets).
//!
//! The thread's `PyThreadState` is found by walking the interpreter's thread list for the
//! one whose thread id is ours (cached per thread and re-checked on each use), which works
//! whether or not the thread holds the GIL.

use crate::maps::STACK_SCRATCH;
use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::generated::{bpf_get_ns_current_pid_tgid, bpf_loop},
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, bpf_probe_read_user_buf},
    macros::{map, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::ProbeContext,
    EbpfContext,
};
use pyleak_common::{
    PyFrame, PyProc, StackTrace, FILTER_PIDS, MAX_PY_FRAMES, MAX_PY_THREADS, MAX_PY_WALK,
    NO_OFFSET, PY_EPOCH_KERNEL, PY_EPOCH_USER, PY_INIT_VADDR_MASK, PY_TEMPLATES_ENTRIES,
    STACK_PY_TRUNCATED, STACK_PY_UNREADABLE, TARGETS_ENTRIES, TARGET_ACTIVE, THREADS_ENTRIES,
};

/// Per process: where its Python runtime is and how to walk its frames.
#[map]
pub static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(TARGETS_ENTRIES, 0);

/// Layouts of the Python runtime files seen so far (`--cgroup`, `--all`), by index: a
/// process that starts later gets its layout from the one its `Py_InitializeFromConfig`
/// probe names, with no wait for userspace. `runtime_vaddr` is one page low and the
/// kernel adds that page to the bias (a bias of 0 means "unknown").
#[map]
pub static PY_TEMPLATES: Array<PyProc> = Array::with_max_entries(PY_TEMPLATES_ENTRIES, 0);

/// Changes to [`PY_PROCS`], counted: `[PY_EPOCH_KERNEL]` by the kernel (atomically, after
/// each of its own), `[PY_EPOCH_USER]` by userspace (after each of its own). A CPU's copy
/// of a layout (`PY_SCRATCH`) serves the next walk of the same process only while both are
/// what they were when it was taken.
#[map]
pub static PY_EPOCH: Array<u64> = Array::with_max_entries(2, 0);

/// Counts a change the kernel made to [`PY_PROCS`] (after making it).
#[inline(always)]
pub fn bump_py_epoch() {
    if let Some(e) = PY_EPOCH.get_ptr_mut(PY_EPOCH_KERNEL) {
        // SAFETY: an aligned map value, changed only atomically by the kernel.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::SeqCst }>(
                e, 1,
            )
        };
    }
}

/// Thread id → its `PyThreadState` address, as last found.
#[map]
pub static TSTATES: LruHashMap<u32, u64> = LruHashMap::with_max_entries(THREADS_ENTRIES, 0);

/// `[0]`: the code epoch, bumped (atomically) before any code object of a process whose
/// `code_dealloc` is probed is freed, and at the exec and the exit of every process with a
/// layout in `PY_PROCS` (a new program in the same process, or a pid used again). A [`LINE_CACHE`] slot filled at an epoch is
/// valid only while the epoch is unchanged.
#[map]
pub static CODE_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Bumps [`CODE_EPOCH`].
#[inline(always)]
pub fn bump_code_epoch() {
    if let Some(e) = CODE_EPOCH.get_ptr_mut(0) {
        // SAFETY: an aligned map value, changed only atomically.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                e, 1,
            )
        };
    }
}

/// Uprobe on `code_dealloc` (`PyCode_Type.tp_dealloc`, `Objects/codeobject.c`), at its
/// entry, before the code object's memory can be freed: every cached first line may now
/// name a code object that is gone.
#[uprobe]
pub fn code_dealloc_enter(_ctx: ProbeContext) -> u32 {
    bump_code_epoch();
    0
}

/// One slot of [`LINE_CACHE`]: code object `code` of process `tgid` had `co_firstlineno`
/// `line` when the code epoch was `epoch`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LineSlot {
    code: u64,
    epoch: u64,
    tgid: u32,
    line: u32,
}

/// Slots of [`LINE_CACHE`] (a power of two): a deep stack of the pyperformance subset
/// uses 10–40 distinct code objects.
const LINE_SLOTS: usize = 256;

/// Each CPU's direct-mapped cache of code objects' first lines (the signature kept with
/// each frame), so a walk reads a code object only when it is new to this CPU since the
/// last code epoch. A code object a frame of the walked thread runs cannot be freed while
/// that frame exists, so one filled at the current epoch is still the object at that
/// address: any object freed there since was freed through `code_dealloc`, which bumped
/// the epoch first.
#[map]
static LINE_CACHE: PerCpuArray<[LineSlot; LINE_SLOTS]> = PerCpuArray::with_max_entries(1, 0);

/// The first line of code object `code` (0 if unreadable), from this CPU's cache when the
/// walk may use it (`s.cache`), else read from the target.
#[inline(always)]
fn first_line(s: &WalkState, p: &PyProc, code: u64) -> u32 {
    let read = || read_u32(code + p.code_firstlineno as u64).unwrap_or(0);
    if s.cache == 0 {
        return read();
    }
    let Some(cache) = LINE_CACHE.get_ptr_mut(0) else {
        return read();
    };
    let i = masked(((code >> 4) ^ (code >> 13)) as usize, LINE_SLOTS - 1);
    // SAFETY: this CPU's cache, ours while the program runs; `i` is below its length.
    let Some(slot) = (unsafe { &mut *cache }).get_mut(i) else {
        return read();
    };
    if slot.code == code && slot.tgid == s.tgid && slot.epoch == s.epoch {
        return slot.line;
    }
    let line = read();
    if line != 0 {
        *slot = LineSlot {
            code,
            epoch: s.epoch,
            tgid: s.tgid,
            line,
        };
    }
    line
}

/// Owner values from here up mark entry frames, not Python code: the C stack's (3 on
/// 3.12/3.13) and the interpreter's (3 on 3.14, where the C stack's becomes 4).
const FIRST_ENTRY_OWNER: u8 = 3;

#[inline(always)]
fn read_u64(addr: u64) -> Option<u64> {
    // SAFETY: reads target memory through the checked helper.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

#[inline(always)]
fn read_u32(addr: u64) -> Option<u32> {
    // SAFETY: reads target memory through the checked helper.
    unsafe { bpf_probe_read_user(addr as *const u32) }.ok()
}

/// Uprobe on `Py_InitializeFromConfig`: its address tells where the file holding the
/// runtime was loaded (the cookie is its link-time address, see
/// `pyleak_common::py_init_cookie`). For a command pyleak started, userspace has put the
/// layout in `PY_PROCS` with a bias of 0; for a process of a traced group that started
/// later, the layout comes from the file's template.
#[uprobe]
pub fn py_init_enter(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: reads the cookie and the probe's own instruction pointer.
    let (cookie, ip) = unsafe {
        (
            aya_ebpf::helpers::generated::bpf_get_attach_cookie(ctx.as_ptr()),
            (*ctx.regs).rip,
        )
    };
    let vaddr = cookie & PY_INIT_VADDR_MASK;
    let template = (cookie >> 48) as u32;
    if crate::maps::filter_mode() != FILTER_PIDS {
        // A file-wide probe: only processes being traced.
        if crate::maps::target_state(tgid) != TARGET_ACTIVE {
            return 0;
        }
        if template != 0 && PY_PROCS.get_ptr(&tgid).is_none() {
            if let Some(t) = PY_TEMPLATES.get(template - 1) {
                let mut p = *t;
                p.bias = ip.wrapping_sub(vaddr).wrapping_add(4096);
                let _ = PY_PROCS.insert(&tgid, &p, 0);
                bump_py_epoch();
            }
            return 0;
        }
    }
    if let Some(p) = PY_PROCS.get_ptr_mut(&tgid) {
        // Userspace may have placed the runtime already (with its own runtime_vaddr and
        // bias pair): only fill in a bias still unknown. A bias of 0 means "unknown", so
        // the runtime is described one page low with a page more of bias: a python that
        // is not position-independent (Debian's, at its link-time address) has a true
        // bias of 0 and would otherwise stay unknown until userspace read its maps.
        // SAFETY: a valid map value pointer.
        unsafe {
            if (*p).bias == 0 {
                (*p).runtime_vaddr = (*p).runtime_vaddr.wrapping_sub(4096);
                (*p).bias = ip.wrapping_sub(vaddr).wrapping_add(4096);
                bump_py_epoch();
            }
        }
    }
    0
}

/// Whether `ts` is the thread state of thread `tid`.
#[inline(always)]
fn is_ours(p: &PyProc, ts: u64, tid: u32) -> bool {
    if p.tstate_native_tid != NO_OFFSET {
        return read_u32(ts + p.tstate_native_tid as u64) == Some(tid);
    }
    let Some(pthread) = read_u64(ts + p.tstate_thread_id as u64) else {
        return false;
    };
    pthread != 0 && read_u32(pthread + p.pthread_tid as u64) == Some(tid)
}

#[inline(always)]
fn find_tstate(p: &PyProc, tid: u32) -> Option<u64> {
    // SAFETY: plain data copied out at once.
    if let Some(&ts) = unsafe { TSTATES.get(&tid) } {
        if is_ours(p, ts, tid) {
            return Some(ts);
        }
    }
    let runtime = p.runtime_vaddr.wrapping_add(p.bias);
    let mut interp = read_u64(runtime + p.interp_head as u64)?;
    let mut ts = read_u64(interp + p.tstate_head as u64)?;
    // Every interpreter's threads, the newest interpreter's first (a thread of the main
    // interpreter, last in the list, once a subinterpreter exists), in one bounded loop.
    for _ in 0..MAX_PY_THREADS {
        if ts == 0 {
            interp = read_u64(interp + p.interp_next as u64)?;
            if interp == 0 {
                return None;
            }
            ts = read_u64(interp + p.tstate_head as u64)?;
            continue;
        }
        if is_ours(p, ts, tid) {
            let _ = TSTATES.insert(&tid, &ts, 0);
            return Some(ts);
        }
        ts = read_u64(ts + p.tstate_next as u64)?;
    }
    None
}

/// Where a walk is, between steps of `bpf_loop`. It lives in a map, not on the stack: the
/// verifier then knows nothing of the frame count from one step to the next and checks a
/// step once, instead of once per count (128 times) on every path into the walk.
#[repr(C)]
struct WalkState {
    frame: u64,
    n: u32,
    flags: u32,
    /// Bytes of each frame to read: past the last field the layout uses.
    frame_len: u32,
    /// 1: first lines come through [`LINE_CACHE`] (the process's `code_dealloc` is
    /// probed), valid at code epoch `epoch`.
    cache: u32,
    epoch: u64,
    /// The walked process.
    tgid: u32,
    _pad: u32,
    /// The stack's hash so far: each Python frame pushed (the native frames come after,
    /// when the stack is interned).
    hash: u64,
    /// The return address read with the current frame (0: not read).
    caller: u64,
    /// The used part of the thread's current data-stack chunk, `[chunk_lo, chunk_hi)`
    /// (both 0 when unknown): frames there sit one after another, callers below.
    chunk_lo: u64,
    chunk_hi: u64,
    /// Target addresses `FRAME_BUF` holds now, `[win_lo, win_hi)`.
    win_lo: u64,
    win_hi: u64,
    /// Kept from one walk to the next on this CPU: the process whose layout `PY_SCRATCH`
    /// holds (0: none) and the [`PY_EPOCH`] counts when it was copied.
    proc_tgid: u32,
    _pad2: u32,
    proc_epoch: [u64; 2],
    /// Kept from one walk to the next: the thread (`pid_tgid`) whose thread state was
    /// found last on this CPU, and its address (checked again before each use).
    ts_key: u64,
    ts: u64,
}

/// Appends the Python frames of the current thread to `st`, leaf first, and returns
/// `hash` with each frame folded in as it is pushed (FNV-1a over the code address, then
/// the line offset and signature: the start of [`crate::stack`]'s stack id), saving the
/// interning a second pass over the frames.
///
/// The frame loop runs through `bpf_loop`, so the verifier checks one step instead of
/// every unrolled iteration.
///
/// `caller_at` (0: none): where an allocator's return address is stored in the target's
/// stack. When the thread's current frame pointer sits in its `_PyCFrame` (3.11, 3.12: a
/// local of the eval loop, a little above in the same stack), both come from one read
/// ([`walked_caller`] then has the return address).
#[inline(always)]
pub fn walk(st: &mut StackTrace, hash: u64, caller_at: u64) -> u64 {
    st.py_len = 0;
    let Some(state) = WALK_STATE.get_ptr_mut(0) else {
        return hash;
    };
    // SAFETY: this CPU's slot, ours while the program runs.
    let state = unsafe { &mut *state };
    state.caller = 0;
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // The layout, copied into this CPU's scratch slot for `walk_step`, unless the slot
    // holds this process's already and nothing changed `PY_PROCS` since: by the update
    // helper straight from map to map (a copy on the BPF stack would not fit in it with the
    // callers' frames; a plain assignment becomes a byte-wise memmove call).
    let epoch = [
        PY_EPOCH.get(PY_EPOCH_KERNEL).copied().unwrap_or(0),
        PY_EPOCH.get(PY_EPOCH_USER).copied().unwrap_or(0),
    ];
    if state.proc_tgid != tgid || state.proc_epoch != epoch {
        state.proc_tgid = 0;
        let Some(src) = PY_PROCS.get_ptr(&tgid) else {
            return hash;
        };
        // SAFETY: a map value, read by the helper.
        if PY_SCRATCH.set(0, unsafe { &*src }, 0).is_err() {
            return hash;
        }
        if PY_SCRATCH.get(0).is_none_or(|p| p.bias == 0) {
            return hash;
        }
        state.proc_tgid = tgid;
        state.proc_epoch = epoch;
    }
    let Some(p) = PY_SCRATCH.get(0) else {
        return hash;
    };
    // The interpreter knows its threads by the ids its own pid namespace gives them.
    let tid = if p.pidns_ino != 0 {
        let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
        // SAFETY: the helper writes at most `size` bytes into `ns`, a local.
        let rc = unsafe {
            bpf_get_ns_current_pid_tgid(
                p.pidns_dev,
                p.pidns_ino,
                &mut ns,
                core::mem::size_of::<bpf_pidns_info>() as u32,
            )
        };
        if rc != 0 {
            return hash;
        }
        ns.pid
    } else {
        tid
    };
    // The thread's state as last found, checked and read in one go (3.11+), else found
    // and read field by field.
    // This CPU's last thread's first, then the map's.
    let cached = if state.ts_key == pid_tgid {
        Some(state.ts)
    } else {
        // SAFETY: plain data copied out at once.
        unsafe { TSTATES.get(&tid) }.copied()
    };
    let view = cached.and_then(|ts| tstate_view(p, ts, tid).map(|v| (ts, v)));
    let (mut frame, (chunk_lo, chunk_hi)) = match view {
        Some((ts, v)) => {
            state.ts_key = pid_tgid;
            state.ts = ts;
            v
        }
        None => {
            let Some(ts) = find_tstate(p, tid) else {
                // Not a Python thread (or not one yet).
                return hash;
            };
            state.ts_key = pid_tgid;
            state.ts = ts;
            let Some(frame) = read_u64(ts + p.tstate_frame as u64) else {
                st.flags |= STACK_PY_UNREADABLE;
                return hash;
            };
            (frame, used_chunk(p, ts))
        }
    };
    if p.cframe_frame != NO_OFFSET && frame != 0 {
        let field = frame.wrapping_add(p.cframe_frame as u64);
        frame = match with_caller(state, caller_at, field) {
            Some(f) => f,
            None => read_u64(field).unwrap_or(0),
        };
    }
    let mut last = p.frame_code.max(p.frame_back).max(p.frame_lasti);
    if p.frame_owner != NO_OFFSET {
        last = last.max(p.frame_owner);
    }
    // Read before any code object: one freed after this read bumps the epoch past it.
    let epoch = CODE_EPOCH.get(0).copied();
    // Field by field: a whole struct would be built on the BPF stack first, which the
    // callers' frames leave no room for.
    state.frame = frame;
    state.n = 0;
    state.flags = 0;
    // A whole number of words, so that a window ending at a frame's end starts aligned.
    state.frame_len = ((last as usize + 15) & !7).min(FRAME_READ) as u32;
    state.cache = (p.line_cache != 0 && epoch.is_some()) as u32;
    state.epoch = epoch.unwrap_or(0);
    state.tgid = tgid;
    state.hash = hash;
    state.chunk_lo = chunk_lo;
    state.chunk_hi = chunk_hi;
    // Volatile: two plain stores side by side become a call to a byte-wise memset.
    // SAFETY: fields of this CPU's slot.
    unsafe {
        core::ptr::write_volatile(&mut state.win_lo, 0);
        core::ptr::write_volatile(&mut state.win_hi, 0);
    }
    // SAFETY: the callback is a static BPF function and takes no context.
    unsafe {
        bpf_loop(
            MAX_PY_WALK.div_ceil(2) as u32,
            walk_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    if state.frame != 0 && state.n as usize >= MAX_PY_FRAMES {
        state.flags |= STACK_PY_TRUNCATED;
    }
    st.flags |= state.flags;
    st.py_len = state.n.min(MAX_PY_FRAMES as u32);
    state.hash
}

/// The return address the last [`walk`] on this CPU read with the current frame, if it
/// did.
#[inline(always)]
pub fn walked_caller() -> Option<u64> {
    WALK_STATE.get(0).map(|s| s.caller).filter(|&c| c != 0)
}

/// The u64 at `field`, read with the return address at `caller_at` (kept in `s.caller`)
/// in one read of the target's stack ([`load`]), when `field` lies above `caller_at`
/// within [`WINDOW`] bytes. The walk's window starts empty after it.
#[inline(always)]
fn with_caller(s: &mut WalkState, caller_at: u64, field: u64) -> Option<u64> {
    if caller_at == 0 || field < caller_at.wrapping_add(8) {
        return None;
    }
    let buf = FRAME_BUF.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch buffer, ours while the program runs.
    let buf = unsafe { &mut *buf };
    if !load(s, buf, caller_at, field.wrapping_add(8)) {
        return None;
    }
    let value = field_u64(buf, field - caller_at)?;
    s.caller = field_u64(buf, 0)?;
    Some(value)
}

/// Each CPU's walk in progress.
#[map]
static WALK_STATE: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

/// Bytes of a frame read at once: its fields sit below this offset in every layout.
const FRAME_READ: usize = 128;

/// Bytes of a data-stack chunk read at once, ending at the end of the frame wanted, so
/// that its callers' frames come with it. One user read costs ~0.15 µs here whatever its
/// length up to a few KiB; a frame of the float benchmark takes ~100–200 bytes.
const WINDOW: usize = 2048;

/// 8-byte words of a window.
const WINDOW_WORDS: usize = WINDOW / 8;

/// Each CPU's copy of the target memory `[win_lo, win_hi)` of its walk: one frame, or a
/// window of the data-stack chunk. Kept as words: frames and chunks are 8-aligned, and so
/// are most fields.
#[map]
static FRAME_BUF: PerCpuArray<[u64; WINDOW_WORDS]> = PerCpuArray::with_max_entries(1, 0);

/// `x & mask` for an `x` already checked to fit: the mask changes nothing but shows the
/// verifier the bound, which a 32-bit check LLVM emits does not. The volatile read keeps
/// LLVM from dropping the mask as redundant.
#[inline(always)]
fn masked(x: usize, mask: usize) -> usize {
    // SAFETY: reads a local.
    unsafe { core::ptr::read_volatile(&x) & mask }
}

/// Bytes of a thread state read at once by [`tstate_view`].
const TSTATE_READ: usize = 256;

/// Each CPU's copy of part of the thread state being walked, as words.
#[map]
static TSTATE_BUF: PerCpuArray<[u64; TSTATE_READ / 8]> = PerCpuArray::with_max_entries(1, 0);

/// The u64 at byte `at` of a thread-state read, if it fits and is aligned (the fields read
/// are pointers and an `unsigned long`, and the read starts at one of them: `None` would
/// only send the walk the slow way, field by field).
#[inline(always)]
fn ts_u64(buf: &[u64; TSTATE_READ / 8], at: u32) -> Option<u64> {
    if at > (TSTATE_READ - 8) as u32 || at & 7 != 0 {
        return None;
    }
    buf.get(masked((at >> 3) as usize, TSTATE_READ / 8 - 1))
        .copied()
}

/// If `ts` is thread `tid`'s state, its frame field (`tstate_frame`) and its data stack's
/// used part ([`used_chunk`]), from one read of the thread state: 3.11+, whose layouts put
/// the native thread id, the frame and the data stack within [`TSTATE_READ`] bytes.
/// `None` when `ts` is not ours, or the layout does not allow it.
#[inline(always)]
fn tstate_view(p: &PyProc, ts: u64, tid: u32) -> Option<(u64, (u64, u64))> {
    if p.tstate_native_tid == NO_OFFSET || p.tstate_datastack == 0 {
        return None;
    }
    let lo = p
        .tstate_frame
        .min(p.tstate_native_tid)
        .min(p.tstate_datastack);
    let hi = (p.tstate_frame as u64 + 8)
        .max(p.tstate_native_tid as u64 + 8)
        .max(p.tstate_datastack as u64 + 16);
    let len = hi.wrapping_sub(lo as u64);
    if len == 0 || len > TSTATE_READ as u64 {
        return None;
    }
    let buf = TSTATE_BUF.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch buffer, ours while the program runs.
    let buf = unsafe { &mut *buf };
    // SAFETY: the same memory seen as bytes, for the read helper.
    let bytes = unsafe { &mut *(buf as *mut [u64; TSTATE_READ / 8]).cast::<[u8; TSTATE_READ]>() };
    let dst = bytes.get_mut(..len as usize)?;
    // SAFETY: the helper writes at most `dst`'s length, reading target memory checked.
    unsafe { bpf_probe_read_user_buf((ts + lo as u64) as *const u8, dst) }.ok()?;
    // `native_thread_id` is an `unsigned long`: its low half is the tid.
    if ts_u64(buf, p.tstate_native_tid - lo)? as u32 != tid {
        return None;
    }
    let frame = ts_u64(buf, p.tstate_frame - lo)?;
    let chunk = ts_u64(buf, p.tstate_datastack - lo)?;
    let top = ts_u64(buf, p.tstate_datastack + 8 - lo)?;
    let data = chunk.wrapping_add(p.chunk_data as u64);
    if chunk == 0 || top <= data {
        return Some((frame, (0, 0)));
    }
    Some((frame, (data, top)))
}

/// The used part of thread state `ts`'s current data-stack chunk, `(lo, hi)`, or `(0, 0)`
/// when the layout has none or it cannot be read.
#[inline(always)]
fn used_chunk(p: &PyProc, ts: u64) -> (u64, u64) {
    if p.tstate_datastack == 0 {
        return (0, 0);
    }
    // SAFETY: reads target memory through the checked helper.
    let Ok([chunk, top]) =
        (unsafe { bpf_probe_read_user((ts + p.tstate_datastack as u64) as *const [u64; 2]) })
    else {
        return (0, 0);
    };
    let lo = chunk.wrapping_add(p.chunk_data as u64);
    if chunk == 0 || top <= lo {
        return (0, 0);
    }
    (lo, top)
}

/// The little-endian u64 at byte `at` of the walk's buffer, if it fits: one aligned word,
/// or two for an unaligned `at` (a byte-wise copy costs the verifier's BPF ~24
/// instructions a field, a few fields a frame).
#[inline(always)]
fn field_u64(buf: &[u64; WINDOW_WORDS], at: u64) -> Option<u64> {
    if at > (WINDOW - 8) as u64 {
        return None;
    }
    let i = masked((at >> 3) as usize, WINDOW_WORDS - 1);
    let lo = *buf.get(i)?;
    let shift = (at & 7) * 8;
    if shift == 0 {
        return Some(lo);
    }
    // Below the last word, as `at` is at most `WINDOW - 8` and unaligned.
    let hi = *buf.get(masked((at >> 3) as usize + 1, WINDOW_WORDS - 1))?;
    Some(lo >> shift | hi << (64 - shift))
}

/// The byte at `at` in the walk's buffer, if it fits.
#[inline(always)]
fn field_u8(buf: &[u64; WINDOW_WORDS], at: u64) -> Option<u8> {
    if at >= WINDOW as u64 {
        return None;
    }
    let w = *buf.get(masked((at >> 3) as usize, WINDOW_WORDS - 1))?;
    Some((w >> ((at & 7) * 8)) as u8)
}

/// Fills the walk's buffer with target memory `[lo, hi)`; false if it cannot be read.
#[inline(always)]
fn load(s: &mut WalkState, buf: &mut [u64; WINDOW_WORDS], lo: u64, hi: u64) -> bool {
    let len = hi.wrapping_sub(lo);
    if len == 0 || len > WINDOW as u64 {
        return false;
    }
    // SAFETY: the same memory seen as bytes, for the read helper.
    let bytes = unsafe { &mut *(buf as *mut [u64; WINDOW_WORDS]).cast::<[u8; WINDOW]>() };
    let Some(dst) = bytes.get_mut(..len as usize) else {
        return false;
    };
    // SAFETY: the helper writes at most `dst`'s length, reading target memory checked.
    if unsafe { bpf_probe_read_user_buf(lo as *const u8, dst) }.is_err() {
        return false;
    }
    s.win_lo = lo;
    s.win_hi = hi;
    true
}

/// The layout of the process being walked, for `walk_step`.
#[map]
static PY_SCRATCH: PerCpuArray<PyProc> = PerCpuArray::with_max_entries(1, 0);

/// Two frames of the walk: returns 1 to stop, 0 to go on.
extern "C" fn walk_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(s) = WALK_STATE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, ours while the program runs.
    let s = unsafe { &mut *s };
    let (Some(p), Some(st)) = (PY_SCRATCH.get(0), STACK_SCRATCH.get_ptr_mut(0)) else {
        return 1;
    };
    let Some(buf) = FRAME_BUF.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch buffer, ours while the program runs.
    let buf = unsafe { &mut *buf };
    // Two frames a step: the lookups above are paid once for both.
    if frame_step(s, p, st, buf) != 0 {
        return 1;
    }
    frame_step(s, p, st, buf)
}

/// The walk's next frame, `s.frame`: pushed to `st` (or skipped, for an entry frame).
/// Returns 1 to stop, 0 to go on.
#[inline(always)]
fn frame_step(
    s: &mut WalkState,
    p: &PyProc,
    st: *mut StackTrace,
    buf: &mut [u64; WINDOW_WORDS],
) -> i64 {
    let frame = s.frame;
    if frame == 0 {
        return 1;
    }
    // The frame's fields, up to the last one the layout uses: from the buffer if an earlier
    // read brought them, else from one read (each user read costs ~0.15 µs here, whatever
    // its length). A frame in the data-stack chunk in use comes with the chunk below it,
    // its callers' frames: one read for most of a 3.11+ walk. The buffer is the target's
    // memory at those addresses however the window was chosen; a window that cannot be
    // read falls back to the frame alone.
    let end = frame.wrapping_add(s.frame_len as u64);
    if frame < s.win_lo || end > s.win_hi || end < frame {
        let in_chunk = frame >= s.chunk_lo && end <= s.chunk_hi && end > frame;
        let windowed = in_chunk
            && load(
                s,
                buf,
                s.chunk_lo.max(end.saturating_sub(WINDOW as u64)),
                end,
            );
        if !windowed && !load(s, buf, frame, end) {
            s.flags |= STACK_PY_UNREADABLE;
            return 1;
        }
    }
    let base = frame - s.win_lo;
    let Some(code) = field_u64(buf, base + p.frame_code as u64) else {
        s.flags |= STACK_PY_UNREADABLE;
        return 1;
    };
    let code = code & !p.code_tag_mask;
    let back = field_u64(buf, base + p.frame_back as u64).unwrap_or(0);
    if p.frame_owner != NO_OFFSET
        && field_u8(buf, base + p.frame_owner as u64).unwrap_or(0) >= FIRST_ENTRY_OWNER
    {
        s.frame = back;
        return 0;
    }
    let lasti_raw = field_u64(buf, base + p.frame_lasti as u64).unwrap_or(0);
    let lasti = if p.lasti_is_ptr != 0 {
        lasti_raw.wrapping_sub(code) as u32
    } else {
        lasti_raw as u32
    };
    let sig = first_line(s, p, code);
    let n = s.n as usize;
    if n >= MAX_PY_FRAMES {
        s.flags |= STACK_PY_TRUNCATED;
        return 1;
    }
    // SAFETY: the per-CPU scratch stack; `n` is below the array's length.
    unsafe { (*st).py[n] = PyFrame { code, lasti, sig } };
    s.hash = crate::stack::fold_py(s.hash, code, lasti, sig);
    s.n += 1;
    s.frame = back;
    0
}
