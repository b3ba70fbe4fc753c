//! Whether a pymalloc sampling window is open, for the events userspace uses to measure
//! how much of a process's heap growth the windows saw (see `pyleak-user`'s
//! `collect/window.rs`).

use pyleak_common::FLAG_IN_WINDOW;

use crate::maps::{pymalloc_sampled, PYMALLOC_WINDOW};

/// `FLAG_IN_WINDOW` while a pymalloc window is open, else 0 (always 0 without sampled
/// pymalloc tracing).
#[inline(always)]
pub fn window_flag() -> u32 {
    if pymalloc_sampled() && PYMALLOC_WINDOW.get(1).is_some_and(|o| *o != 0) {
        FLAG_IN_WINDOW
    } else {
        0
    }
}
