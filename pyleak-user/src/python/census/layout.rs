//! The shape of what a census reads: where the interpreter keeps its GC lists and its
//! modules, and the layouts of types, dicts, functions and the other containers it
//! follows. The values live in each version's module (`versions/v3_X.rs`); this file only
//! declares them. Offsets in bytes, x86_64 release builds with the GIL.

/// Where one CPython keeps what a census reads (see `versions::CPython::heap_layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapLayout {
    /// GC list heads (`PyGC_Head`, two words: `_gc_next`, `_gc_prev`): the generations,
    /// then the permanent generation; offsets from `_PyRuntime` when `gc_in_runtime`
    /// (3.8: `_PyRuntime.gc`), else from the `PyInterpreterState` (3.9+: `interp->gc`).
    pub gc_heads: [u64; 4],
    /// Whether `gc_heads` count from `_PyRuntime` rather than the interpreter.
    pub gc_in_runtime: bool,
    /// `PyInterpreterState.modules` (3.12+: `imports.modules`): the `sys.modules` dict.
    pub interp_modules: u64,
    /// `PyTypeObject` and `PyHeapTypeObject` fields.
    pub ty: TypeLayout,
    /// `PyDictObject` and its keys.
    pub dict: DictLayout,
    /// Where an instance keeps its attributes when its type manages them.
    pub managed_dict: ManagedDict,
    /// `PyFunctionObject` fields.
    pub func: FuncLayout,
    /// Where a code object names its free variables (the closure's cells, in order).
    pub freevars: FreeVars,
    /// Where a frame keeps its locals and how they are named.
    pub frame_locals: FrameLocals,
    /// `int` keeps its digit count in `long_value.lv_tag >> 3` (3.12+), not in `ob_size`.
    pub long_tag: bool,
    /// Fields shared by every supported version (lists, tuples, sets, cells, modules,
    /// `PyMemberDef`), kept here so that a version that moves one says so.
    pub fixed: FixedLayout,
}

/// `PyTypeObject` / `PyHeapTypeObject` offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeLayout {
    /// `tp_name` (a C string: `module.Name` for static types, `Name` for classes).
    pub name: u64,
    /// `tp_basicsize`.
    pub basicsize: u64,
    /// `tp_itemsize`.
    pub itemsize: u64,
    /// `tp_flags`.
    pub flags: u64,
    /// `tp_base`.
    pub base: u64,
    /// `tp_dict` (a class's attributes).
    pub dict: u64,
    /// `tp_dictoffset` (where an instance's `__dict__` pointer is, when not managed).
    pub dictoffset: u64,
    /// `PyHeapTypeObject.ht_cached_keys`: the shared keys of its instances' dicts.
    pub cached_keys: u64,
}

/// How dict keys are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DictKeys {
    /// 3.8–3.10: `dk_size` (a word), indices of 1/2/4/8 bytes by size, then 24-byte
    /// `PyDictKeyEntry {hash, key, value}`.
    Sized {
        /// `dk_size`.
        size: u64,
    },
    /// 3.11+: `dk_log2_size`, `dk_log2_index_bytes`, `dk_kind` (bytes); general keys
    /// have 24-byte entries, unicode and split keys 16-byte `{key, value}`.
    Log2 {
        /// `dk_log2_size`.
        log2_size: u64,
        /// `dk_log2_index_bytes`.
        log2_index_bytes: u64,
        /// `dk_kind`.
        kind: u64,
    },
}

/// `PyDictObject` and `PyDictKeysObject` offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DictLayout {
    /// `ma_used`.
    pub used: u64,
    /// `ma_keys`.
    pub keys: u64,
    /// `ma_values` (split tables: the values, keys shared with a class).
    pub values: u64,
    /// `PyDictValues.values` (3.13 puts a header of 8 bytes first).
    pub values_array: u64,
    /// The size fields of the keys.
    pub keys_shape: DictKeys,
    /// `dk_nentries`.
    pub nentries: u64,
    /// `dk_indices`; entries follow the index table.
    pub indices: u64,
    /// `sizeof(PyDictKeysObject)` (for sizes, as `sys.getsizeof` counts them).
    pub sizeof_keys: u64,
}

/// Where an instance whose type sets `Py_TPFLAGS_MANAGED_DICT` keeps its attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagedDict {
    /// 3.8–3.10: only `tp_dictoffset`.
    None,
    /// 3.11: the dict at `obj - 3 words`, else values at `obj - 4 words`.
    DictOrValuesApart,
    /// 3.12: one word at `obj - 3 words`, values when its low bit is set (stored as
    /// `values - 1`).
    Tagged,
    /// 3.13: the dict at `obj - 3 words`, else (`Py_TPFLAGS_INLINE_VALUES`) the values
    /// inline after the object, at `obj + tp_basicsize`.
    Inline,
}

/// `PyFunctionObject` offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuncLayout {
    /// `func_code`.
    pub code: u64,
    /// `func_defaults` (a tuple or NULL).
    pub defaults: u64,
    /// `func_kwdefaults` (a dict or NULL).
    pub kwdefaults: u64,
    /// `func_closure` (a tuple of cells or NULL).
    pub closure: u64,
}

/// Where a code object names the free variables its closure's cells hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeVars {
    /// 3.8–3.10: `co_freevars`, a tuple of str.
    Tuple(u64),
    /// 3.11+: the last `co_nfreevars` (an int) names of `co_localsplusnames` (a tuple).
    LocalsPlus {
        /// `co_localsplusnames`.
        names: u64,
        /// `co_nfreevars`.
        nfreevars: u64,
    },
}

/// Where a frame keeps its local variables (the frame chain itself is the stack walk's:
/// `walk_layout`), and where its code object names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameLocals {
    /// 3.8–3.10: `PyFrameObject.f_localsplus`, the first `co_nlocals` (an int) named by
    /// `co_varnames` (a tuple).
    Object {
        /// `f_localsplus`.
        localsplus: u64,
        /// `co_nlocals`.
        nlocals: u64,
        /// `co_varnames`.
        varnames: u64,
    },
    /// 3.11+: `_PyInterpreterFrame.localsplus`, named by `co_localsplusnames` (locals,
    /// cells and free variables; `co_nlocalsplus` of them).
    Interpreter {
        /// `localsplus`.
        localsplus: u64,
        /// `co_nlocalsplus`.
        nlocalsplus: u64,
        /// `co_localsplusnames`.
        names: u64,
    },
}

/// Fields unchanged from 3.8 to 3.13 (checked with gdb on each pyenv build).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedLayout {
    /// `PyVarObject.ob_size` (len of tuple, list, bytes; digit count of int before 3.12).
    pub ob_size: u64,
    /// `PyListObject.ob_item` / `.allocated`.
    pub list_items: u64,
    /// `PyListObject.allocated`.
    pub list_allocated: u64,
    /// `PyTupleObject.ob_item`.
    pub tuple_items: u64,
    /// `PySetObject.used`, `.mask`, `.table`, `.smalltable` (entries `{key, hash}`).
    pub set_used: u64,
    /// `PySetObject.mask`.
    pub set_mask: u64,
    /// `PySetObject.table`.
    pub set_table: u64,
    /// `PySetObject.smalltable`.
    pub set_smalltable: u64,
    /// `PyCellObject.ob_ref`.
    pub cell_ref: u64,
    /// `PyModuleObject.md_dict`.
    pub module_dict: u64,
    /// `PyMethodObject.im_func` / `.im_self` (a bound method).
    pub method_func: u64,
    /// `PyMethodObject.im_self`.
    pub method_self: u64,
    /// `PyASCIIObject.length` / `.state`.
    pub str_length: u64,
    /// `PyASCIIObject.state` (kind in bits 2–4, compact bit 5, ascii bit 6).
    pub str_state: u64,
    /// `sizeof(PyMemberDef)` and its `name`, `type`, `offset` fields (slots).
    pub member_size: u64,
    /// `PyMemberDef.type`.
    pub member_type: u64,
    /// `PyMemberDef.offset`.
    pub member_offset: u64,
    /// `PyByteArrayObject.ob_alloc` (bytes in its buffer) and `.ob_bytes` (the buffer, a
    /// block of its own; `Include/cpython/bytearrayobject.h`).
    pub bytearray_alloc: u64,
    /// `PyByteArrayObject.ob_bytes`.
    pub bytearray_bytes: u64,
}

/// Fields every supported version shares.
pub const FIXED: FixedLayout = FixedLayout {
    ob_size: 16,
    list_items: 24,
    list_allocated: 32,
    tuple_items: 24,
    set_used: 24,
    set_mask: 32,
    set_table: 40,
    set_smalltable: 64,
    cell_ref: 16,
    module_dict: 16,
    method_func: 16,
    method_self: 24,
    str_length: 16,
    str_state: 32,
    member_size: 40,
    member_type: 8,
    member_offset: 16,
    bytearray_alloc: 24,
    bytearray_bytes: 32,
};

/// `tp_flags` bits (`Include/object.h`, unchanged 3.8–3.13).
pub mod flags {
    /// `Py_TPFLAGS_INLINE_VALUES` (3.13).
    pub const INLINE_VALUES: u64 = 1 << 2;
    /// `Py_TPFLAGS_MANAGED_DICT` (3.11+).
    pub const MANAGED_DICT: u64 = 1 << 4;
    /// `Py_TPFLAGS_HEAPTYPE`: a class made at run time.
    pub const HEAPTYPE: u64 = 1 << 9;
    /// `Py_TPFLAGS_HAVE_GC`: instances have a `PyGC_Head` before them.
    pub const HAVE_GC: u64 = 1 << 14;
    /// `Py_TPFLAGS_LONG_SUBCLASS`.
    pub const LONG: u64 = 1 << 24;
    /// `Py_TPFLAGS_LIST_SUBCLASS`.
    pub const LIST: u64 = 1 << 25;
    /// `Py_TPFLAGS_TUPLE_SUBCLASS`.
    pub const TUPLE: u64 = 1 << 26;
    /// `Py_TPFLAGS_BYTES_SUBCLASS`.
    pub const BYTES: u64 = 1 << 27;
    /// `Py_TPFLAGS_UNICODE_SUBCLASS`.
    pub const UNICODE: u64 = 1 << 28;
    /// `Py_TPFLAGS_DICT_SUBCLASS`.
    pub const DICT: u64 = 1 << 29;
    /// `Py_TPFLAGS_TYPE_SUBCLASS`.
    pub const TYPE: u64 = 1 << 31;
}

/// `Py_T_OBJECT` and `Py_T_OBJECT_EX` (`PyMemberDef.type` of a `__slots__` entry).
pub const MEMBER_OBJECT: i32 = 6;
/// See [`MEMBER_OBJECT`].
pub const MEMBER_OBJECT_EX: i32 = 16;
