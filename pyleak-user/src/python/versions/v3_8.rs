//! CPython 3.8: `tstate->frame` leads to a chain of `PyFrameObject`s; `f_lasti` is an
//! int counting bytes, and lines come from `co_lnotab`. Offsets from the DWARF of pyenv
//! 3.8.18 (docs/cpython-offsets-x86_64.json).

use pyleak_common::{PyProc, NO_OFFSET};

use super::{common_walk, CPython, PyVersion};
use crate::python::{
    census::layout::{
        DictKeys, DictLayout, FrameLocals, FreeVars, FuncLayout, HeapLayout, ManagedDict,
        TypeLayout, FIXED,
    },
    code::CodeLayout,
    heap::PymallocLayout,
    lines::LineFormat,
};

/// CPython 3.8.
#[derive(Debug)]
pub struct Python38;

impl CPython for Python38 {
    fn version(&self) -> PyVersion {
        (3, 8)
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
            frame_lasti: 104,
            lasti_is_ptr: 0,
            frame_owner: NO_OFFSET,
            code_firstlineno: 40,
            ..common_walk()
        }
    }

    fn code_layout(&self) -> CodeLayout {
        CodeLayout {
            firstlineno: 40,
            flags: 36,
            filename: 104,
            name: 112,
            qualname: None,
            linetable: 120,
            code_adaptive: 0,
            sizeof_ascii: 48,
            sizeof_compact: 72,
        }
    }

    fn line_format(&self) -> LineFormat {
        LineFormat::Lnotab
    }

    fn pymalloc(&self) -> PymallocLayout {
        // 4 KiB pools (the system page) in 256 KiB arenas; no pre-header but the GC's.
        PymallocLayout {
            pool_size: 4 << 10,
            arena_size: 256 << 10,
            preheader_flags: 0,
        }
    }

    fn heap_layout(&self) -> Option<HeapLayout> {
        // GC state in `_PyRuntime.gc` (3 generations of 24 bytes, `generation0`, then
        // the permanent one); `interp->modules`; pre-3.11 dicts; closures named by
        // `co_freevars`. From the DWARF of pyenv 3.8.18.
        Some(HeapLayout {
            gc_heads: [368, 392, 416, 448],
            gc_in_runtime: true,
            interp_modules: 56,
            ty: TypeLayout {
                name: 24,
                basicsize: 32,
                itemsize: 40,
                flags: 168,
                base: 256,
                dict: 264,
                dictoffset: 288,
                cached_keys: 872,
            },
            dict: DictLayout {
                used: 16,
                keys: 32,
                values: 40,
                values_array: 0,
                keys_shape: DictKeys::Sized { size: 8 },
                nentries: 32,
                indices: 40,
                sizeof_keys: 40,
            },
            managed_dict: ManagedDict::None,
            func: FuncLayout {
                code: 16,
                defaults: 32,
                kwdefaults: 40,
                closure: 48,
            },
            freevars: FreeVars::Tuple(80),
            frame_locals: FrameLocals::Object {
                localsplus: 360,
                nlocals: 28,
                varnames: 72,
            },
            long_tag: false,
            fixed: FIXED,
        })
    }
}
