//! The layers of CPython's allocator stack and their registry, [`LAYERS`].

use crate::{CALL_LAYERS, FLAG_FOR_LIBC, FLAG_FOR_PYMALLOC, FLAG_FOR_PYMEM_RAW};

/// One level of CPython's allocator stack (`Objects/obmalloc.c`), top to bottom.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// `PyObject_*` and `PyMem_*`: what Python code asks for, object by object.
    Pymalloc = 0,
    /// `PyMem_Raw*`: buffers CPython takes straight from the C heap.
    PymemRaw = 1,
    /// The C library's malloc family.
    Libc = 2,
    /// Address space: `mmap`, `munmap`, `mremap`, `brk`.
    Vm = 3,
    /// Physical pages faulted in.
    Pages = 4,
}

/// Number of [`Layer`]s.
pub const NUM_LAYERS: usize = 5;

/// How a layer is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    /// Uprobes on allocator functions, one alloc/free path for all (`alloc_enter`…):
    /// the layer's calls can be in flight on a thread, and calls inside them inherit
    /// their stack and on-behalf flag.
    Uprobes,
    /// Tracepoints, with a model in userspace (mappings, pages).
    Tracepoints,
}

/// One layer, as the registry [`LAYERS`] describes it.
#[derive(Clone, Copy, Debug)]
pub struct LayerInfo {
    /// The layer (its number is its place in the call order, top first).
    pub layer: Layer,
    /// Its name on the command line and in reports.
    pub name: &'static str,
    /// How it is probed.
    pub probed: Probed,
    /// The `FLAG_FOR_*` bit a block of a lower layer carries when made inside this
    /// layer's call; 0 when no lower layer is made inside it.
    pub on_behalf: u32,
    /// What its stacks count, for titles and help.
    pub counts: &'static str,
    /// The JSON field of its live bytes in the report's linkage (a suspect's and the
    /// whole recording's): the output contract.
    pub linkage: &'static str,
    /// Its word in a suspect's "this stack at every layer" line.
    pub shown: &'static str,
}

/// The registry of layers, in call order: everything that lists layers reads it.
pub const LAYERS: [LayerInfo; NUM_LAYERS] = [
    LayerInfo {
        layer: Layer::Pymalloc,
        name: "pymalloc",
        probed: Probed::Uprobes,
        on_behalf: FLAG_FOR_PYMALLOC,
        counts: "what Python code requested (PyObject_Malloc, PyMem_Malloc)",
        linkage: "pymalloc_live_bytes",
        shown: "pymalloc",
    },
    LayerInfo {
        layer: Layer::PymemRaw,
        name: "pymem_raw",
        probed: Probed::Uprobes,
        on_behalf: FLAG_FOR_PYMEM_RAW,
        counts: "PyMem_RawMalloc requests",
        linkage: "pymem_raw_live_bytes",
        shown: "pymem_raw",
    },
    LayerInfo {
        layer: Layer::Libc,
        name: "libc",
        probed: Probed::Uprobes,
        on_behalf: FLAG_FOR_LIBC,
        counts: "malloc blocks",
        linkage: "libc_live_bytes",
        shown: "malloc",
    },
    LayerInfo {
        layer: Layer::Vm,
        name: "vm",
        probed: Probed::Tracepoints,
        on_behalf: 0,
        counts: "mappings (mmap, brk)",
        linkage: "vm_live_bytes",
        shown: "mapped",
    },
    LayerInfo {
        layer: Layer::Pages,
        name: "pages",
        probed: Probed::Tracepoints,
        on_behalf: 0,
        counts: "pages faulted in",
        linkage: "resident_bytes",
        shown: "resident",
    },
];

/// The `FLAG_FOR_*` bit of each uprobed layer (the first [`CALL_LAYERS`] of [`LAYERS`]),
/// indexed by layer number: what the kernel side sets on a block made inside that layer's
/// call.
pub const ON_BEHALF: [u32; CALL_LAYERS] = {
    let mut flags = [0; CALL_LAYERS];
    let mut i = 0;
    while i < CALL_LAYERS {
        flags[i] = LAYERS[i].on_behalf;
        i += 1;
    }
    flags
};

impl Layer {
    /// Every layer, top to bottom.
    pub const ALL: [Layer; NUM_LAYERS] = [
        Layer::Pymalloc,
        Layer::PymemRaw,
        Layer::Libc,
        Layer::Vm,
        Layer::Pages,
    ];

    /// The layers probed with uprobes on allocator functions (whose calls can be in flight
    /// on a thread, see [`ThreadState`](crate::ThreadState)), top to bottom; the others are tracepoints.
    pub const UPROBED: [Layer; CALL_LAYERS] = [Layer::Pymalloc, Layer::PymemRaw, Layer::Libc];

    /// This layer's entry in [`LAYERS`].
    pub const fn info(self) -> &'static LayerInfo {
        &LAYERS[self as usize]
    }

    /// The layer with this number, if any.
    pub fn from_u32(n: u32) -> Option<Layer> {
        LAYERS.get(n as usize).map(|i| i.layer)
    }

    /// Whether the layer is probed with uprobes on allocator functions.
    pub const fn is_uprobed(self) -> bool {
        matches!(self.info().probed, Probed::Uprobes)
    }

    /// The layer with this name (as [`Layer::name`] gives it), if any.
    pub fn named(name: &str) -> Option<Layer> {
        LAYERS.iter().find(|i| i.name == name).map(|i| i.layer)
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        self.info().name
    }
}
