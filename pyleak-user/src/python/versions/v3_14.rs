//! CPython 3.14: frames as in 3.13 (`tstate->current_frame`, `instr_ptr`), but
//! `f_executable` is a tagged `_PyStackRef` whose low bits the walk clears
//! (`code_tag_mask`), and entry frames are owned by the interpreter (owner 3; 4 is
//! reserved for the C stack): the walk skips every owner from 3 up.
//!
//! UNVERIFIED: no 3.14 was on the machines pyleak was tested on. The table below is from
//! py-spy's bindgen output for 3.14.0 (docs/python-stacks.md), not from a binary;
//! at run time the offsets in the file's `_Py_DebugOffsets` replace it (with a warning
//! when they differ), so the table only matters when that is unusable.

use pyleak_common::PyProc;

use super::{v3_13::Python313, CPython, PyVersion};
use crate::python::{
    code::CodeLayout, debug_offsets::DebugOffsetsLayout, heap::PymallocLayout, lines::LineFormat,
};

/// `_PyStackRef` tag bits cleared from `f_executable` (CPython's remote debugger masks
/// them off the same way).
const STACKREF_TAG_BITS: u64 = 3;

/// 3.14's `_Py_DebugOffsets` (`Include/internal/pycore_debug_offsets.h`): as 3.13's with
/// `threads_main`, `code_object_generation` and `tlbc_generation` in `interpreter_state`,
/// `stackpointer` and `tlbc_index` in `interpreter_frame`, `co_tlbc` in `code_object` and
/// a `set_object` group before `dict_object` (a 3.14 development header, plus the TLBC
/// fields that tools reading 3.14.0 find there). Word indexes of the fields pyleak reads;
/// unverified on a binary (none here), and checked at run time (cookie, version, every
/// offset inside its struct, the str header fields pyleak assumes).
static DEBUG_OFFSETS: DebugOffsetsLayout = DebugOffsetsLayout {
    runtime: [3, 5],
    interp: [6, 8, 9],
    tstate: [22, 24, 26, 27, 28],
    frame: [31, 32, 33, 34, 36],
    code: [39, 40, 41, 42, 43, 44, 48],
    unicode: [77, 78, 79, 80],
};

/// CPython 3.14.
#[derive(Debug)]
pub struct Python314;

impl CPython for Python314 {
    fn version(&self) -> PyVersion {
        (3, 14)
    }

    fn walk_layout(&self) -> PyProc {
        // 3.13's frame chain: the interpreter list moved, `owner` moved, and
        // `f_executable` is tagged.
        PyProc {
            interp_head: 808,
            // py-spy's bindings; `_Py_DebugOffsets` says where it is when read.
            interp_next: 7272,
            code_tag_mask: STACKREF_TAG_BITS,
            frame_owner: 74,
            // Not in `_Py_DebugOffsets` and unverified: frames are read one by one.
            tstate_datastack: 0,
            chunk_data: 0,
            ..Python313.walk_layout()
        }
    }

    fn code_layout(&self) -> CodeLayout {
        // 3.13's code object with one more field before `co_code_adaptive`.
        CodeLayout {
            code_adaptive: 208,
            ..Python313.code_layout()
        }
    }

    fn line_format(&self) -> LineFormat {
        LineFormat::Locations
    }

    fn debug_offsets(&self) -> Option<&'static DebugOffsetsLayout> {
        Some(&DEBUG_OFFSETS)
    }

    fn pymalloc(&self) -> PymallocLayout {
        // Unverified (no 3.14 binary here): 3.13's pool header and pre-header.
        Python313.pymalloc()
    }
}
