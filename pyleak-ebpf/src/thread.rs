//! Each thread's allocator calls in flight, and what an inner call inherits from them:
//! the `FLAG_FOR_*` bits and the stack of the topmost upper call (the malloc under
//! PyObject_Malloc, the mmap under malloc, the page fault under all of them).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_probe_read_user};
use pyleak_common::{Drop, Layer, ThreadState, CALL_LAYERS, ON_BEHALF};

use crate::{
    maps::{count_drop, pymalloc_window, THREADS},
    stack,
};

/// This thread's state, created on first use.
#[inline(always)]
pub fn thread_state(tid: u32) -> Option<*mut ThreadState> {
    if let Some(t) = THREADS.get_ptr_mut(tid) {
        return Some(t);
    }
    let fresh = ThreadState::default();
    if THREADS.insert(&tid, &fresh, BPF_NOEXIST as u64).is_err() {
        // Either full, or another probe of this thread raced us in (not possible for one
        // thread, so full).
        count_drop(Drop::ThreadsFull);
    }
    THREADS.get_ptr_mut(tid)
}

/// The sampling window a probe of `layer` counts in: `Some(0)` for every layer but a
/// sampled pymalloc, `None` while its window is closed (the probe does nothing then).
#[inline(always)]
pub fn window_of(layer: usize) -> Option<u32> {
    if layer == Layer::Pymalloc as usize {
        pymalloc_window()
    } else {
        Some(0)
    }
}

/// Clears a pymalloc call in flight that began in an earlier sampling window: its return
/// probe was taken out with that window's links before it returned.
#[inline(always)]
pub fn forget_stale_pymalloc(t: &mut ThreadState, layer: usize, window: u32) {
    if layer == Layer::Pymalloc as usize
        && t.active & (1 << layer) != 0
        && t.pymalloc_window != window
    {
        t.active &= !(1 << layer);
    }
}

/// Marks `calls[layer]` as begun in sampling window `window` (pymalloc only).
#[inline(always)]
pub fn begun_in(t: &mut ThreadState, layer: usize, window: u32) {
    if layer == Layer::Pymalloc as usize {
        t.pymalloc_window = window;
    }
}

/// If upper layers' calls are in flight on this thread (malloc inside PyObject_Malloc, mmap
/// inside malloc inside PyObject_Malloc), the `FLAG_FOR_*` bits of every one of them and
/// the topmost call's stack to reuse. An arena mmap is `FOR_PYMALLOC` alone; a big
/// request's mmap is `FOR_PYMALLOC | FOR_LIBC`. If that call (a malloc) left its stack for
/// its return, `take_deferred` takes it now (the kernel layers do); without it there is
/// none to reuse. Allocator probes pass `false`: only the malloc family defers, and no
/// probed allocator runs inside malloc, so they never meet one, and a second stack walk
/// inlined in them would only cost verifier budget.
#[inline(always)]
pub fn upper_call(
    t: &mut ThreadState,
    layer: usize,
    tid: u32,
    take_deferred: bool,
) -> (u32, Option<u64>) {
    let mut flags = 0;
    let mut top = None;
    // Every uprobed layer above `layer` with a call in flight, bottom to top (the registry's
    // call order): each adds its on-behalf bit, and the topmost lends its stack. A
    // pymalloc call counts only while the window it began in is open (sampled mode): one
    // whose return was missed as the window closed would otherwise lend its stale stack
    // to the thread's next mallocs until the next window opens.
    for upper in (0..CALL_LAYERS).rev() {
        if upper >= layer || t.active & (1 << upper) == 0 {
            continue;
        }
        if upper == Layer::Pymalloc as usize && pymalloc_window() != Some(t.pymalloc_window) {
            continue;
        }
        flags |= ON_BEHALF[upper];
        top = Some(upper);
    }
    let Some(top) = top else {
        return (flags, None);
    };
    if top >= CALL_LAYERS {
        return (flags, None);
    }
    let call = &mut t.calls[top];
    if call.stack_id == 0 && call.ret_addr_at != 0 {
        if !take_deferred {
            return (flags, None);
        }
        // SAFETY: reads the upper call's return address from the target's stack, checked
        // by the helper.
        let caller = unsafe { bpf_probe_read_user(call.ret_addr_at as *const u64) }.ok();
        call.stack_id = stack::capture(core::ptr::null_mut(), caller, tid, false);
        call.ret_addr_at = 0;
    }
    (flags, Some(call.stack_id))
}
