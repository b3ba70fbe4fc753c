//! CPython 3.9: laid out exactly as 3.8 (`tstate->frame`, `PyFrameObject`, `f_lasti` in
//! bytes, `co_lnotab`); checked against the DWARF of pyenv 3.9.18
//! (docs/cpython-offsets-x86_64.json), so it takes 3.8's tables.

use pyleak_common::PyProc;

use super::{v3_8::Python38, CPython, PyVersion};
use crate::python::{
    census::layout::{HeapLayout, TypeLayout},
    code::CodeLayout,
    heap::PymallocLayout,
    lines::LineFormat,
};

/// CPython 3.9.
#[derive(Debug)]
pub struct Python39;

impl CPython for Python39 {
    fn version(&self) -> PyVersion {
        (3, 9)
    }

    fn walk_layout(&self) -> PyProc {
        Python38.walk_layout()
    }

    fn code_layout(&self) -> CodeLayout {
        Python38.code_layout()
    }

    fn line_format(&self) -> LineFormat {
        Python38.line_format()
    }

    fn pymalloc(&self) -> PymallocLayout {
        Python38.pymalloc()
    }

    fn heap_layout(&self) -> Option<HeapLayout> {
        // The GC state moved into the interpreter (`interp->gc`); the rest is 3.8's. From
        // the DWARF of pyenv 3.9.18.
        let old = Python38.heap_layout()?;
        Some(HeapLayout {
            gc_heads: [640, 664, 688, 720],
            gc_in_runtime: false,
            interp_modules: 856,
            ty: TypeLayout {
                cached_keys: 864,
                ..old.ty
            },
            ..old
        })
    }
}
