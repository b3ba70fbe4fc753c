//! How much of each traced process's work fell inside pymalloc sampling windows: the
//! probability that one of its allocations was sampled.
//!
//! A window's traps slow the target several-fold while it is open, so wall time is no
//! measure of how much of its work a window saw, and neither is CPU time: a tick that falls
//! in a trap's handler is delivered as the handler returns to user mode, so exact pymalloc
//! tracing showed 7x the untraced user time (`bytes2.py`, pyenv 3.12). The events of the
//! layers traced all the time (libc allocations and frees, page faults) are counted
//! instead: the program does the same things inside and outside windows, only slower, so
//! the share of those events that fall inside windows is the share of its work they saw.

use pyleak_common::Layer;

use crate::maps::{pymalloc_sampled, PROGRESS, PYMALLOC_WINDOW};

/// Counts one event of an always-traced layer for process `tgid`, inside or outside a
/// pymalloc window. Nothing without sampled pymalloc tracing.
#[inline(always)]
pub fn progress_event(tgid: u32) {
    if !pymalloc_sampled() {
        return;
    }
    let open = PYMALLOC_WINDOW.get(1).is_some_and(|o| *o != 0);
    match PROGRESS.get_ptr_mut(&tgid) {
        Some(t) => {
            // SAFETY: a per-CPU value, only this CPU writes it while the program runs.
            unsafe {
                (*t)[0] += 1;
                if open {
                    (*t)[1] += 1;
                }
            }
        }
        None => {
            let _ = PROGRESS.insert(&tgid, &[1, open as u64], 0);
        }
    }
}

/// Whether allocator events of `layer` count as progress (the libc layer's).
#[inline(always)]
pub fn counts_progress(layer: u32) -> bool {
    layer == Layer::Libc as u32
}
