//! CPython 3.12: as 3.11 (`cframe`, `_PyInterpreterFrame`, `prev_instr`, location
//! table) with entry frames (owner 3, the C stack) in the chain, which the walk skips, and
//! smaller str headers. Offsets from the DWARF of pyenv 3.12.1
//! (docs/cpython-offsets-x86_64.json).

use pyleak_common::PyProc;

use super::{common_walk, v3_11::Python311, CPython, PyVersion};
use crate::python::{
    census::layout::{FrameLocals, FreeVars, HeapLayout, ManagedDict, TypeLayout},
    code::CodeLayout,
    heap::PymallocLayout,
    lines::LineFormat,
};

/// CPython 3.12.
#[derive(Debug)]
pub struct Python312;

impl CPython for Python312 {
    fn version(&self) -> PyVersion {
        (3, 12)
    }

    fn walk_layout(&self) -> PyProc {
        PyProc {
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
            code_adaptive: 192,
            sizeof_ascii: 40,
            sizeof_compact: 56,
        }
    }

    fn line_format(&self) -> LineFormat {
        LineFormat::Locations
    }

    fn pymalloc(&self) -> PymallocLayout {
        // `Py_TPFLAGS_PREHEADER`: `MANAGED_WEAKREF` (1 << 3) or `MANAGED_DICT` (1 << 4).
        PymallocLayout {
            preheader_flags: (1 << 3) | (1 << 4),
            ..Python311.pymalloc()
        }
    }

    fn heap_layout(&self) -> Option<HeapLayout> {
        // The GC state near the interpreter's start, `imports.modules`, one tagged
        // dict-or-values word, `int` sized by `lv_tag`. From the DWARF of pyenv 3.12.1.
        let old = Python311.heap_layout()?;
        Some(HeapLayout {
            gc_heads: [136, 160, 184, 216],
            interp_modules: 944,
            ty: TypeLayout {
                cached_keys: 880,
                ..old.ty
            },
            managed_dict: ManagedDict::Tagged,
            frame_locals: FrameLocals::Interpreter {
                localsplus: 72,
                nlocalsplus: 72,
                names: 96,
            },
            freevars: FreeVars::LocalsPlus {
                names: 96,
                nfreevars: 88,
            },
            long_tag: true,
            ..old
        })
    }
}
