//! CPython 3.11: `tstate->cframe->current_frame` leads to `_PyInterpreterFrame`s (Python
//! frames only) holding `prev_instr`, a pointer into `co_code_adaptive`; lines come from the
//! location table; code objects have `co_qualname`. Offsets from the DWARF of pyenv 3.11.7
//! (docs/cpython-offsets-x86_64.json); Debian's 3.11.2 is tested to match.

use pyleak_common::PyProc;

use super::{common_walk, v3_10::Python310, CPython, PyVersion};
use crate::python::{
    census::layout::{DictKeys, DictLayout, FrameLocals, FreeVars, HeapLayout, ManagedDict},
    code::CodeLayout,
    heap::PymallocLayout,
    lines::LineFormat,
};

/// CPython 3.11.
#[derive(Debug)]
pub struct Python311;

impl CPython for Python311 {
    fn version(&self) -> PyVersion {
        (3, 11)
    }

    fn walk_layout(&self) -> PyProc {
        PyProc {
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
            tstate_datastack: 296,
            chunk_data: 24,
            ..common_walk()
        }
    }

    fn code_layout(&self) -> CodeLayout {
        CodeLayout {
            firstlineno: 72,
            flags: 48,
            filename: 112,
            name: 120,
            qualname: Some(128),
            linetable: 136,
            code_adaptive: 184,
            sizeof_ascii: 48,
            sizeof_compact: 72,
        }
    }

    fn line_format(&self) -> LineFormat {
        LineFormat::Locations
    }

    fn pymalloc(&self) -> PymallocLayout {
        // 3.10's pools; `Py_TPFLAGS_MANAGED_DICT` (1 << 4) puts the dict and values pointers
        // before the GC header.
        PymallocLayout {
            preheader_flags: 1 << 4,
            ..Python310.pymalloc()
        }
    }

    fn heap_layout(&self) -> Option<HeapLayout> {
        // Keys sized by log2 with a kind (unicode entries of 16 bytes); managed dicts
        // before the GC header; free variables at the end of `co_localsplusnames`. From
        // the DWARF of pyenv 3.11.7.
        let old = Python310.heap_layout()?;
        Some(HeapLayout {
            gc_heads: [672, 696, 720, 752],
            interp_modules: 888,
            dict: DictLayout {
                keys_shape: DictKeys::Log2 {
                    log2_size: 8,
                    log2_index_bytes: 9,
                    kind: 10,
                },
                nentries: 24,
                indices: 32,
                sizeof_keys: 32,
                ..old.dict
            },
            managed_dict: ManagedDict::DictOrValuesApart,
            frame_locals: FrameLocals::Interpreter {
                localsplus: 72,
                nlocalsplus: 76,
                names: 96,
            },
            freevars: FreeVars::LocalsPlus {
                names: 96,
                nfreevars: 92,
            },
            ..old
        })
    }
}
