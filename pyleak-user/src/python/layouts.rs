//! Frame-walk layouts per CPython version (x86_64 release builds), checked against the
//! DWARF of pyenv 3.8.18–3.13.0 (shared/design/cpython-offsets-x86_64.json). What the
//! kernel needs to find a thread's state and walk its frames.

use pyleak_common::{PyProc, NO_OFFSET};

/// glibc's `struct pthread` → `tid` on x86_64 (glibc 2.28–2.36 at least).
const GLIBC_PTHREAD_TID: u32 = 0x2d0;

/// The layout for CPython `version`, or None when pyleak does not know it.
pub fn for_version(version: (u8, u8)) -> Option<PyProc> {
    let base = PyProc {
        tstate_next: 8,
        pthread_tid: GLIBC_PTHREAD_TID,
        ..PyProc::default()
    };
    let p = match version {
        // 3.8–3.10: tstate->frame, PyFrameObject chain, f_lasti an int.
        (3, 8) | (3, 9) | (3, 10) => PyProc {
            interp_head: 32,
            tstate_head: 8,
            tstate_native_tid: NO_OFFSET,
            tstate_thread_id: 176,
            tstate_frame: 24,
            cframe_frame: NO_OFFSET,
            frame_back: 24,
            frame_code: 32,
            frame_lasti: if version == (3, 10) { 96 } else { 104 },
            lasti_is_ptr: 0,
            frame_owner: NO_OFFSET,
            code_firstlineno: 40,
            ..base
        },
        // 3.11: tstate->cframe->current_frame, _PyInterpreterFrame, prev_instr a pointer.
        (3, 11) => PyProc {
            interp_head: 40,
            tstate_head: 16,
            tstate_native_tid: 160,
            tstate_thread_id: 152,
            tstate_frame: 56,
            cframe_frame: 8,
            frame_back: 48,
            frame_code: 32,
            frame_lasti: 56,
            lasti_is_ptr: 1,
            frame_owner: 69,
            code_firstlineno: 72,
            ..base
        },
        // 3.12: as 3.11 with entry frames (owner 3) in the chain.
        (3, 12) => PyProc {
            interp_head: 40,
            tstate_head: 72,
            tstate_native_tid: 144,
            tstate_thread_id: 136,
            tstate_frame: 56,
            cframe_frame: 0,
            frame_back: 8,
            frame_code: 0,
            frame_lasti: 56,
            lasti_is_ptr: 1,
            frame_owner: 70,
            code_firstlineno: 68,
            ..base
        },
        // 3.13: tstate->current_frame, f_executable, instr_ptr.
        (3, 13) => PyProc {
            interp_head: 632,
            tstate_head: 7344,
            tstate_native_tid: 160,
            tstate_thread_id: 152,
            tstate_frame: 72,
            cframe_frame: NO_OFFSET,
            frame_back: 8,
            frame_code: 0,
            frame_lasti: 56,
            lasti_is_ptr: 1,
            frame_owner: 70,
            code_firstlineno: 68,
            ..base
        },
        _ => return None,
    };
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_versions_only() {
        for minor in 8..=13 {
            assert!(for_version((3, minor)).is_some(), "3.{minor}");
        }
        assert!(for_version((3, 7)).is_none());
        assert!(for_version((2, 7)).is_none());
        assert_eq!(for_version((3, 10)).unwrap().frame_lasti, 96);
    }
}
