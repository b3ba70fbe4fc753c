//! Capturing the stack of the current thread and interning it in `STACKS`.
//!
//! A stack is the immediate native caller (read from `[rsp]` at an allocator's entry),
//! then whatever frame pointers give. The id is a hash of the frames, so the same stack
//! seen twice is stored once.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{pt_regs, BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_current_task_btf, bpf_get_stack, bpf_loop, bpf_task_pt_regs},
    },
};
use pyleak_common::{Drop, MAX_NATIVE_FRAMES, STACK_LEAF_IS_IP};

use crate::maps::{
    count_drop, set_in_probe, KNOWN_STACKS, KNOWN_STACK_SLOTS, STACKS, STACK_SCRATCH,
};

/// How many native frames to keep, 1 to `MAX_NATIVE_FRAMES` (1: the immediate caller
/// only). Set by userspace.
#[no_mangle]
static NATIVE_DEPTH: u32 = MAX_NATIVE_FRAMES as u32;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const EEXIST: i64 = 17;

/// Captures the current thread's stack and returns its interned id (0: none kept).
///
/// `caller` is the return address read at an allocator's entry; tracepoints pass `None`
/// and keep the user instruction pointer as the leaf frame instead. `walk_native`: follow
/// the frame pointers from `ctx`'s registers (as deep as `--native-depth`); without it the
/// caller alone is the native stack.
#[inline(always)]
pub fn capture(ctx: *mut c_void, caller: Option<u64>, tid: u32, walk_native: bool) -> u64 {
    fill(ctx, caller, 0, None, tid, walk_native)
}

/// As [`capture`], with the caller the return address stored at `at` in the target's stack
/// (an allocator's entry): read together with the thread's current Python frame when that
/// lies just above it in the same stack (3.11 and 3.12 keep it in the eval loop's C frame),
/// one user read instead of two.
#[inline(always)]
pub fn capture_at(ctx: *mut c_void, at: u64, tid: u32, walk_native: bool) -> u64 {
    fill(ctx, None, at, None, tid, walk_native)
}

/// Captures the stack of a thread that entered the kernel (a page fault, an mmap-family
/// syscall; `ctx` is a tracepoint's), with the user registers saved on entry: frame
/// pointers are followed only when `rbp` can start a chain, as at an allocator's entry.
/// Otherwise the user instruction pointer alone is the native stack: `bpf_get_stack`
/// would follow the garbage in `rbp` (CPython keeps no frame pointers) through a faulting
/// read, ≈0.5 µs a page fault measured here, for frames that are noise.
#[inline(always)]
pub fn capture_user(ctx: *mut c_void, tid: u32) -> u64 {
    match user_regs() {
        // Interrupted anywhere, a leaf function's body included, where `rbp` may equal
        // `rsp` (no `sub rsp` with the red zone): that starts a chain too.
        Some((ip, sp, bp)) if bp != sp && !frame_chain_plausible(sp, bp) => {
            fill(ctx, None, 0, Some(ip), tid, false)
        }
        _ => fill(ctx, None, 0, None, tid, true),
    }
}

/// The current task's user `(rip, rsp, rbp)`, as saved when it entered the kernel
/// (`task_pt_regs`).
#[inline(always)]
fn user_regs() -> Option<(u64, u64, u64)> {
    // SAFETY: helpers on the current task; the kernel checks the pointer types, and the
    // register reads go through the checked kernel-read helper.
    unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const pt_regs;
        if regs.is_null() {
            return None;
        }
        let ip = bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rip)).ok()?;
        let sp = bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rsp)).ok()?;
        let bp = bpf_probe_read_kernel(core::ptr::addr_of!((*regs).rbp)).ok()?;
        Some((ip, sp, bp))
    }
}

/// Fills this CPU's scratch stack and interns it. The native stack starts with `caller`
/// (a return address; or the one stored at `caller_at` when that is not 0), or `leaf_ip`
/// (an instruction pointer; walking nothing further), or what `bpf_get_stack` gives.
#[inline(always)]
fn fill(
    ctx: *mut c_void,
    caller: Option<u64>,
    caller_at: u64,
    leaf_ip: Option<u64>,
    tid: u32,
    walk_native: bool,
) -> u64 {
    let Some(st) = STACK_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the per-CPU scratch slot is ours for the duration of this program.
    let st = unsafe { &mut *st };
    st.flags = 0;
    st.py_len = 0;
    st.tid = tid;
    // SAFETY: a read-only global, patched by userspace before load.
    let depth = unsafe { core::ptr::read_volatile(&NATIVE_DEPTH) };
    let mut len: usize = 0;
    set_in_probe(true);
    if walk_native && depth > 1 {
        let frames = if depth as usize >= MAX_NATIVE_FRAMES {
            MAX_NATIVE_FRAMES
        } else {
            depth as usize
        };
        // SAFETY: the helper writes at most `frames` of the buffer's frames.
        let n = unsafe {
            bpf_get_stack(
                ctx,
                st.native.as_mut_ptr().cast(),
                (frames * 8) as u32,
                BPF_F_USER_STACK as u64,
            )
        };
        if n > 0 {
            len = (n as usize) / 8;
        } else {
            count_drop(Drop::StackUnreadable);
        }
    }
    // The id hashes the Python frames as the walk pushes them, then the native frames.
    let h = crate::pystack::walk(st, FNV_OFFSET, caller_at);
    let caller = if caller_at != 0 {
        // SAFETY: reads the return address from the target's stack, checked by the helper.
        crate::pystack::walked_caller()
            .or_else(|| unsafe { bpf_probe_read_user(caller_at as *const u64) }.ok())
    } else {
        caller
    };
    set_in_probe(false);
    if caller.is_none() {
        st.flags |= STACK_LEAF_IS_IP;
    }
    if let Some(ip) = leaf_ip {
        st.native[0] = ip;
        len = 1;
    }
    if let Some(caller) = caller {
        // At an allocator's entry the first frame is the allocator itself: replace it with
        // the caller, which frame pointers would skip.
        st.native[0] = caller;
        if len == 0 {
            len = 1;
        }
    }
    if len > MAX_NATIVE_FRAMES {
        len = MAX_NATIVE_FRAMES;
    }
    st.native_len = len as u32;
    intern(st, h)
}

/// Folds Python frame `(code, lasti, sig)` into stack hash `h`.
#[inline(always)]
pub fn fold_py(h: u64, code: u64, lasti: u32, sig: u32) -> u64 {
    let h = (h ^ code).wrapping_mul(FNV_PRIME);
    (h ^ ((lasti as u64) << 32 | sig as u64)).wrapping_mul(FNV_PRIME)
}

/// Whether `rbp` at an allocator's entry (the caller's) can start a frame-pointer chain: a
/// word-aligned address in the stack just above `rsp`. Code built without frame pointers
/// uses rbp for data, and following it would cost a faulting read (≈0.7 µs) for garbage.
#[inline(always)]
pub fn frame_chain_plausible(rsp: u64, rbp: u64) -> bool {
    // SAFETY: a read-only global, patched by userspace before load.
    let depth = unsafe { core::ptr::read_volatile(&NATIVE_DEPTH) };
    depth > 1 && rbp & 7 == 0 && rbp > rsp && rbp - rsp < MAX_FRAME_SPAN
}

/// How far above the stack pointer the caller's frame may start (the default 8 MiB stack).
const MAX_FRAME_SPAN: u64 = 8 << 20;

/// Stores `st` under its hash: `h` (its Python frames, folded in by the walk), then its
/// native frames and flags.
#[inline(always)]
fn intern(st: &mut pyleak_common::StackTrace, h: u64) -> u64 {
    // Volatile: a length the verifier knows (0 where `--native-depth 1` leaves no frame
    // walk) would let it drop the loop's callback as dead while the call still names it,
    // which this kernel's verifier refuses ("No program to jit").
    // SAFETY: a field of this CPU's scratch stack.
    let len = unsafe { core::ptr::read_volatile(&st.native_len) }.min(MAX_NATIVE_FRAMES as u32);
    let h = if len == 1 {
        // The caller alone (the common case: no frame chain): the loop's one step inline.
        (h ^ st.native[0]).wrapping_mul(FNV_PRIME)
    } else {
        // Loops through `bpf_loop`: the verifier checks one step, not every unrolled one
        // per path into this function.
        let mut hs = HashState { h, len };
        // SAFETY: the callback is a static BPF function; the context is our stack variable.
        unsafe {
            bpf_loop(
                hs.len,
                hash_native_step as *mut c_void,
                (&mut hs as *mut HashState).cast(),
                0,
            );
        }
        hs.h
    };
    let h = (h ^ (st.flags as u64)).wrapping_mul(FNV_PRIME);
    // 0 means "no stack".
    let id = h | 1;
    let known = KNOWN_STACKS.get_ptr_mut(((id >> 1) as u32) & (KNOWN_STACK_SLOTS - 1));
    if let Some(known) = known {
        // SAFETY: a per-CPU slot.
        if unsafe { *known } == id {
            return id;
        }
    }
    let id = match STACKS.insert(&id, &*st, BPF_NOEXIST as u64) {
        Ok(()) => {
            if st.py_len > 0 {
                announce(id, st.tid);
            }
            id
        }
        Err(e) if e as i64 == -EEXIST => id,
        Err(_) => {
            count_drop(Drop::StacksFull);
            return 0;
        }
    };
    if let Some(known) = known {
        // SAFETY: a per-CPU slot.
        unsafe { *known = id };
    }
    id
}

/// A stack's hash being computed, between steps of `bpf_loop`.
#[repr(C)]
struct HashState {
    h: u64,
    len: u32,
}

/// Hashes native frame `i` of this CPU's scratch stack.
extern "C" fn hash_native_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the HashState `intern` passed to bpf_loop.
    let hs = unsafe { &mut *(ctx as *mut HashState) };
    let Some(st) = STACK_SCRATCH.get(0) else {
        return 1;
    };
    let Some(&ip) = st.native.get(i as usize) else {
        return 1;
    };
    hs.h = (hs.h ^ ip).wrapping_mul(FNV_PRIME);
    0
}

/// Tells userspace about a new stack with Python frames.
#[inline(always)]
fn announce(stack_id: u64, tid: u32) {
    let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
    crate::maps::emit_urgent(pyleak_common::VmEvent {
        kind: pyleak_common::VmKind::NewStack as u32,
        tgid,
        addr: 0,
        len: 0,
        arg: 0,
        arg2: 0,
        stack_id,
        ts_ns: 0,
        flags: 0,
        tid,
    });
}
