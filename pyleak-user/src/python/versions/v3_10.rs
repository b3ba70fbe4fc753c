//! CPython 3.10: `PyFrameObject`s as in 3.9, but `f_lasti` (8 bytes earlier) counts code
//! units and lines come from the new `co_linetable`. Offsets from the DWARF of pyenv
//! 3.10.13 (shared/design/cpython-offsets-x86_64.json).

use pyleak_common::{PyProc, NO_OFFSET};

use super::{common_walk, v3_8::Python38, CPython, PyVersion};
use crate::python::{code::CodeLayout, lines::LineFormat};

/// CPython 3.10.
#[derive(Debug)]
pub struct Python310;

impl CPython for Python310 {
    fn version(&self) -> PyVersion {
        (3, 10)
    }

    fn walk_layout(&self) -> PyProc {
        PyProc {
            interp_head: 32,
            tstate_head: 8,
            tstate_native_tid: NO_OFFSET,
            tstate_thread_id: 176,
            tstate_frame: 24,
            cframe_frame: NO_OFFSET,
            frame_back: 24,
            frame_code: 32,
            frame_lasti: 96,
            lasti_is_ptr: 0,
            frame_owner: NO_OFFSET,
            code_firstlineno: 40,
            ..common_walk()
        }
    }

    fn code_layout(&self) -> CodeLayout {
        // The code object did not change from 3.8; its line table did.
        Python38.code_layout()
    }

    fn line_format(&self) -> LineFormat {
        LineFormat::Linetable310
    }
}
