//! What pyleak knows about each CPython minor version, one module per version behind the
//! [`CPython`] trait (as py-spy keeps one module per version): the frame layout the kernel
//! walks, where code objects keep names and line tables, and the line-table format.
//! x86_64 release builds with the GIL. [`for_version`] is the one place that picks a module;
//! 3.14's is unverified (no 3.14 binary was at hand), the others are checked on pyenv builds.

mod v3_10;
mod v3_11;
mod v3_12;
mod v3_13;
mod v3_14;
mod v3_8;
mod v3_9;

use pyleak_common::PyProc;

use super::{
    census::layout::HeapLayout,
    code::{CodeInfo, CodeLayout},
    debug_offsets::DebugOffsetsLayout,
    heap::PymallocLayout,
    lines::{self, LineFormat},
};

/// CPython (major, minor), e.g. (3, 12).
pub type PyVersion = (u8, u8);

/// Everything version-specific pyleak needs to walk and name one CPython's frames.
pub trait CPython: Send + Sync + std::fmt::Debug {
    /// The (major, minor) version this module describes.
    fn version(&self) -> PyVersion;

    /// What the kernel needs to find a thread's state and walk its frames (the runtime's
    /// address and load bias are left 0 for the caller).
    fn walk_layout(&self) -> PyProc;

    /// Where code objects keep their names, first line and line table.
    fn code_layout(&self) -> CodeLayout;

    /// The format of `co_lnotab` / `co_linetable`, which also says what the kernel's
    /// `lasti` counts (bytes, code units, or bytes from the code object).
    fn line_format(&self) -> LineFormat;

    /// pymalloc's pool and arena sizes and what precedes an object in its block (the
    /// judgement of sampled blocks, `heap`, reads them).
    fn pymalloc(&self) -> PymallocLayout;

    /// Where this version's `_PyRuntime` starts with `_Py_DebugOffsets` (3.13+), the
    /// layout of that table; its offsets then override [`CPython::walk_layout`] and
    /// [`CPython::code_layout`].
    fn debug_offsets(&self) -> Option<&'static DebugOffsetsLayout> {
        None
    }

    /// Where the interpreter keeps its GC lists and modules, and how the containers a
    /// census follows are laid out; None where pyleak has not checked them (3.14: no binary
    /// here, and its incremental GC keeps other lists).
    fn heap_layout(&self) -> Option<HeapLayout> {
        None
    }

    /// The line of the position `lasti` the kernel captured in a frame of `info`.
    fn line(&self, code: &CodeLayout, info: &CodeInfo, lasti: u32) -> u32 {
        let (first, table) = (info.firstlineno, &info.linetable);
        lines::line_for(self.line_format(), code.code_adaptive, first, table, lasti)
    }
}

/// The module for CPython `version`, or None when pyleak cannot walk it.
pub fn for_version(version: PyVersion) -> Option<&'static dyn CPython> {
    Some(match version {
        (3, 8) => &v3_8::Python38,
        (3, 9) => &v3_9::Python39,
        (3, 10) => &v3_10::Python310,
        (3, 11) => &v3_11::Python311,
        (3, 12) => &v3_12::Python312,
        (3, 13) => &v3_13::Python313,
        (3, 14) => &v3_14::Python314,
        _ => return None,
    })
}

/// glibc's `struct pthread` → `tid` on x86_64 (glibc 2.28–2.36 at least), which finds the
/// thread of a `PyThreadState` on versions without `native_thread_id`.
const GLIBC_PTHREAD_TID: u32 = 0x2d0;

/// What every supported version shares: `PyThreadState.next` is the second pointer.
fn common_walk() -> PyProc {
    PyProc {
        tstate_next: 8,
        pthread_tid: GLIBC_PTHREAD_TID,
        ..PyProc::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_module_per_known_version() {
        for minor in 8..=14 {
            let cp = for_version((3, minor)).unwrap_or_else(|| panic!("3.{minor}"));
            assert_eq!(cp.version(), (3, minor));
            // Every version names a frame's code object and its first line.
            let (walk, code) = (cp.walk_layout(), cp.code_layout());
            assert_eq!(
                walk.code_firstlineno as usize, code.firstlineno,
                "3.{minor}"
            );
        }
        // 4 KiB pools until 3.9, 16 KiB from 3.10 (measured with sys._debugmallocstats);
        // pre-headers for managed dicts from 3.11, and weakrefs from 3.12.
        for minor in 8..=14 {
            let pm = for_version((3, minor)).unwrap().pymalloc();
            assert_eq!(
                pm.pool_size,
                if minor < 10 { 4096 } else { 16384 },
                "3.{minor}"
            );
            let flags = [0, 0, 0, 0x10, 0x18, 0x18, 0x18][usize::from(minor - 8)];
            assert_eq!(pm.preheader_flags, flags, "3.{minor}");
        }
        // The census reads 3.8–3.13 (gdb on each pyenv build); 3.14 is not checked.
        for minor in 8..=14 {
            let heap = for_version((3, minor)).unwrap().heap_layout();
            assert_eq!(heap.is_some(), minor <= 13, "3.{minor}");
            if let Some(h) = heap {
                assert_eq!(h.gc_in_runtime, minor == 8, "3.{minor}");
                assert_eq!(h.long_tag, minor >= 12, "3.{minor}");
                // Three generations of 24 bytes, then the permanent one after a pointer.
                assert_eq!(h.gc_heads[3] - h.gc_heads[0], 80, "3.{minor}");
            }
        }
        for unknown in [(2, 7), (3, 6), (3, 7), (3, 15), (4, 0)] {
            assert!(for_version(unknown).is_none(), "{unknown:?}");
        }
        assert_eq!(for_version((3, 10)).unwrap().walk_layout().frame_lasti, 96);
        assert_eq!(for_version((3, 9)).unwrap().walk_layout().frame_lasti, 104);
        // Only 3.14's code pointer is tagged.
        for minor in 8..=14 {
            let mask = for_version((3, minor)).unwrap().walk_layout().code_tag_mask;
            assert_eq!(mask, if minor == 14 { 3 } else { 0 }, "3.{minor}");
        }
    }
}
