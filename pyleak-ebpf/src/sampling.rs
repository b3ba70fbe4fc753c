//! Whether a pymalloc sampling window is open, for the events userspace uses to measure
//! how much of a process's heap growth the windows saw (see `pyleak-user`'s
//! `collect/window.rs`).

use pyleak_common::{FLAG_IN_WINDOW, FLAG_SAMPLING, WINDOW_OPEN};

use crate::maps::{pymalloc_sampled, PYMALLOC_WINDOW};

/// `FLAG_SAMPLING` once the first pymalloc window has opened, with `FLAG_IN_WINDOW` while
/// one is open; 0 before, and always without sampled pymalloc tracing.
#[inline(always)]
pub fn window_flag() -> u32 {
    if !pymalloc_sampled() || PYMALLOC_WINDOW.get(0).is_none_or(|g| *g == 0) {
        return 0;
    }
    if PYMALLOC_WINDOW.get(1).is_some_and(|o| *o == WINDOW_OPEN) {
        FLAG_SAMPLING | FLAG_IN_WINDOW
    } else {
        FLAG_SAMPLING
    }
}
