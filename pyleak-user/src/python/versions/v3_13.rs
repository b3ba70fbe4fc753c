//! CPython 3.13: no more cframe: `tstate->current_frame` leads to `_PyInterpreterFrame`s
//! whose `f_executable` is the code object and `instr_ptr` points into
//! `co_code_adaptive`; entry frames (owner 3) are skipped. Offsets from the DWARF of pyenv
//! 3.13.0 (docs/cpython-offsets-x86_64.json).

use pyleak_common::{PyProc, NO_OFFSET};

use super::{common_walk, v3_12::Python312, CPython, PyVersion};
use crate::python::{
    census::layout::{DictLayout, HeapLayout, ManagedDict},
    code::CodeLayout,
    debug_offsets::DebugOffsetsLayout,
    heap::PymallocLayout,
    lines::LineFormat,
};

/// 3.13's `_Py_DebugOffsets` (in `Include/internal/pycore_runtime.h`): word indexes of
/// the fields pyleak reads, checked on pyenv 3.13.0.
static DEBUG_OFFSETS: DebugOffsetsLayout = DebugOffsetsLayout {
    runtime: [3, 5],
    interp: [6, 8, 9],
    tstate: [19, 21, 23, 24, 25],
    frame: [28, 29, 30, 31, 33],
    code: [34, 35, 36, 37, 38, 39, 43],
    unicode: [67, 68, 69, 70],
};

/// CPython 3.13.
#[derive(Debug)]
pub struct Python313;

impl CPython for Python313 {
    fn version(&self) -> PyVersion {
        (3, 13)
    }

    fn walk_layout(&self) -> PyProc {
        PyProc {
            interp_head: 632,
            interp_next: 7264,
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
            tstate_datastack: 232,
            chunk_data: 24,
            ..common_walk()
        }
    }

    fn code_layout(&self) -> CodeLayout {
        CodeLayout {
            firstlineno: 68,
            flags: 48,
            filename: 112,
            name: 120,
            qualname: Some(128),
            linetable: 136,
            code_adaptive: 200,
            sizeof_ascii: 40,
            sizeof_compact: 56,
        }
    }

    fn line_format(&self) -> LineFormat {
        LineFormat::Locations
    }

    fn debug_offsets(&self) -> Option<&'static DebugOffsetsLayout> {
        Some(&DEBUG_OFFSETS)
    }

    fn pymalloc(&self) -> PymallocLayout {
        Python312.pymalloc()
    }

    fn heap_layout(&self) -> Option<HeapLayout> {
        // 3.13.0 still has three generations (the incremental GC came in 3.14), deep in
        // the interpreter; values inline after the object, behind an 8-byte header. From
        // the DWARF of pyenv 3.13.0.
        let old = Python312.heap_layout()?;
        Some(HeapLayout {
            gc_heads: [7424, 7448, 7472, 7504],
            interp_modules: 7656,
            dict: DictLayout {
                values_array: 8,
                ..old.dict
            },
            managed_dict: ManagedDict::Inline,
            ..old
        })
    }
}
