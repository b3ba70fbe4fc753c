//! CPython 3.10: `PyFrameObject`s as in 3.9, but `f_lasti` (8 bytes earlier) counts code
//! units and lines come from the new `co_linetable`. Offsets from the DWARF of pyenv
//! 3.10.13 (docs/cpython-offsets-x86_64.json). The census finds `f_localsplus` 8 bytes
//! earlier too, and functions start with `COMMON_FIELDS`.

use pyleak_common::PyProc;

use super::{v3_8::Python38, v3_9::Python39, CPython, PyVersion};
use crate::python::{
    census::layout::{FrameLocals, FuncLayout, HeapLayout, TypeLayout},
    code::CodeLayout,
    heap::PymallocLayout,
    lines::LineFormat,
};

/// CPython 3.10.
#[derive(Debug)]
pub struct Python310;

impl CPython for Python310 {
    fn version(&self) -> PyVersion {
        (3, 10)
    }

    fn walk_layout(&self) -> PyProc {
        // 3.8's frame chain; only `f_lasti` moved (it is an int after an 8-byte field less).
        PyProc {
            frame_lasti: 96,
            ..Python38.walk_layout()
        }
    }

    fn code_layout(&self) -> CodeLayout {
        // The code object did not change from 3.8; its line table did.
        Python38.code_layout()
    }

    fn line_format(&self) -> LineFormat {
        LineFormat::Linetable310
    }

    fn pymalloc(&self) -> PymallocLayout {
        // 64-bit builds with the radix tree: 16 KiB pools in 1 MiB arenas.
        PymallocLayout {
            pool_size: 16 << 10,
            arena_size: 1 << 20,
            ..Python38.pymalloc()
        }
    }

    fn heap_layout(&self) -> Option<HeapLayout> {
        // 3.9's interpreter; functions gained `func_globals`.. `func_qualname` first
        // (`COMMON_FIELDS`). From the DWARF of pyenv 3.10.13.
        let old = Python39.heap_layout()?;
        Some(HeapLayout {
            ty: TypeLayout {
                cached_keys: 872,
                ..old.ty
            },
            frame_locals: FrameLocals::Object {
                localsplus: 352,
                nlocals: 28,
                varnames: 72,
            },
            func: FuncLayout {
                code: 48,
                defaults: 56,
                kwdefaults: 64,
                closure: 72,
            },
            ..old
        })
    }
}
