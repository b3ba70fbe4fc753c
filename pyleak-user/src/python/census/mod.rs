//! A heap census from outside: live Python objects counted by type, and the module
//! globals, class attributes and closure variables through which they are reached
//! (issue 14). Reads the target's memory only (see `image`), never writes.
//!
//! One census: copy the target's writable memory (the target stopped meanwhile), then,
//! in the copy, walk from the roots (every module of `sys.modules`) breadth first through
//! dicts, lists, tuples, sets, instance attributes, slots, closure cells and defaults, so
//! that each object gets the shortest path from a root; then from the local variables of
//! every thread's frames (`frames`) for what no global reaches; then take every object on
//! the interpreter's GC lists not reached that way, and what they reference. Each object is
//! attributed to its **holder**: the last object on its path reached through names only
//! (`__main__.REGISTRY`, `__main__.Registry._all`, `__main__.make.<closure seen>`), so
//! the items of a global dict, and everything below them, are held by that global.

mod dicts;
mod frames;
pub mod image;
pub mod layout;
mod objects;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use self::image::{CopyStats, Image};
use self::objects::{Edge, Heap};
use super::PythonRuntime;

/// Objects visited at most (a runaway walk on garbage stops there, counted unreadable).
const MAX_OBJECTS: usize = 50_000_000;
/// Holder node of objects reached from no root (GC lists only).
const NO_HOLDER: u32 = u32::MAX;

/// One type's live objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeCount {
    /// `tp_name` (classes: `module.Name`).
    pub name: String,
    /// Live objects.
    pub count: u64,
    /// Their bytes (see [`Census`]).
    pub bytes: u64,
}

/// What one holder keeps alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Names from the root: `["__main__", "REGISTRY"]`.
    pub path: Vec<String>,
    /// The holding object's type.
    pub type_name: String,
    /// Its items (dict, list, tuple, set), if a container.
    pub len: Option<u64>,
    /// Objects attributed to it (itself included).
    pub retained_count: u64,
    /// Their bytes.
    pub retained_bytes: u64,
    /// Per type name: (count, bytes) among those.
    pub by_type: HashMap<String, (u64, u64)>,
}

/// One census of a process.
#[derive(Debug, Clone, Default)]
pub struct Census {
    /// Live objects found.
    pub objects: u64,
    /// Their bytes: `sys.getsizeof` (GC header included) plus the managed pre-header.
    pub bytes: u64,
    /// Per type, most bytes first.
    pub types: Vec<TypeCount>,
    /// Every holder that retains something.
    pub holders: Vec<Holder>,
    /// Pointers that led nowhere readable or to no object (racing or garbage reads,
    /// memory not copied): counted and skipped.
    pub unreadable: u64,
    /// How the memory was copied.
    pub copy: CopyStats,
    /// Milliseconds spent parsing the copy (the target runs meanwhile).
    pub parse_ms: f64,
    /// The holder (index in `holders`) of each held object's allocator block: the
    /// object's address less its GC header and pre-header, as `PyObject_Malloc` returned
    /// it; a list's item array too.
    pub blocks: AddrMap<u32>,
}

/// Why a census could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum CensusError {
    /// The process is gone (or its memory cannot be read).
    #[error("its memory cannot be read ({0})")]
    Gone(std::io::Error),
    /// The interpreter state could not be found in the copy.
    #[error("{0}")]
    NoInterpreter(&'static str),
}

/// A node in the tree of holder paths.
struct Node {
    parent: u32,
    label: String,
    /// The object at this path (the first one reached).
    obj: u64,
}

/// Takes a census of `pid`, which runs `rt` loaded `bias` bytes above its link address.
/// `pause` stops the target while its memory is copied.
pub fn take(pid: u32, rt: &PythonRuntime, bias: u64, pause: bool) -> Result<Census, CensusError> {
    let layout = rt.cpython.heap_layout().ok_or(CensusError::NoInterpreter(
        "no heap layout for this version",
    ))?;
    let (img, copy) = image::copy(pid, pause).map_err(CensusError::Gone)?;
    let started = std::time::Instant::now();
    let mut census = parse(pid, rt, bias, layout, &img)?;
    census.copy = copy;
    census.parse_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(census)
}

/// Interpreters followed from the head of the list to the main one, at most.
const MAX_INTERPRETERS: usize = 64;

/// The main interpreter: the last of the runtime's list, which starts with the newest (a
/// subinterpreter, once one exists; `Python/pystate.c` links each new one at the head).
/// `head` itself when the list cannot be followed.
fn main_interpreter(img: &Image, head: u64, next_offset: u32) -> u64 {
    let mut interp = head;
    for _ in 0..MAX_INTERPRETERS {
        match img.word(interp + u64::from(next_offset)) {
            Some(next) if next != 0 => interp = next,
            _ => break,
        }
    }
    interp
}

/// Parses one copied image (see [`take`]).
fn parse(
    pid: u32,
    rt: &PythonRuntime,
    bias: u64,
    layout: layout::HeapLayout,
    img: &Image,
) -> Result<Census, CensusError> {
    let runtime = rt.runtime_vaddr.wrapping_add(bias);
    let head = img
        .word(runtime + u64::from(rt.walk.interp_head))
        .filter(|&p| p != 0)
        .ok_or(CensusError::NoInterpreter(
            "no interpreter in _PyRuntime (not initialised yet, or finalised)",
        ))?;
    let interp = main_interpreter(img, head, rt.walk.interp_next);
    let modules = img
        .word(interp + layout.interp_modules)
        .filter(|&p| p != 0)
        .ok_or(CensusError::NoInterpreter(
            "the interpreter has no sys.modules (starting up, or finalised)",
        ))?;
    let pm = rt.cpython.pymalloc();
    let mut heap = Heap::new(
        pid,
        img,
        layout,
        pm.preheader_flags,
        rt.code.sizeof_ascii,
        rt.code.sizeof_compact,
    );
    let mut w = Walk::default();
    // Roots: each module, named as sys.modules names it.
    let roots = heap
        .dict_entries(modules)
        .ok_or(CensusError::NoInterpreter("sys.modules cannot be read"))?;
    for (k, v) in roots {
        let Some(name) = heap.str_value(k) else {
            continue;
        };
        let node = w.node(NO_HOLDER, name, v);
        w.reach(&mut heap, v, node, true);
    }
    w.bfs(&mut heap);
    // Then the threads' frames: what only a local variable holds.
    for (label, v) in frames::locals(pid, &mut heap, rt, interp, modules) {
        if !w.seen.contains_key(&v) {
            let node = w.node(NO_HOLDER, label, v);
            w.reach(&mut heap, v, node, true);
        }
    }
    w.bfs(&mut heap);
    // Then everything on the GC lists not reached from a root, and what it references.
    let base = if layout.gc_in_runtime {
        runtime
    } else {
        interp
    };
    for head in layout.gc_heads.map(|h| base + h) {
        let mut at = img.word(head).unwrap_or(0) & !3;
        let mut steps = 0usize;
        while at != head && at != 0 && steps < MAX_OBJECTS {
            w.reach(&mut heap, at + 16, NO_HOLDER, false);
            match img.word(at) {
                Some(next) => at = next & !3,
                None => {
                    w.unreadable += 1;
                    break;
                }
            }
            steps += 1;
        }
        w.bfs(&mut heap);
    }
    Ok(w.finish(&heap))
}

/// Hashes object addresses (distinct, 16-aligned) with one folded multiply: SipHash
/// was a third of the parse time on a million objects.
#[derive(Default, Clone, Copy)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let m = u128::from(n ^ self.0) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m >> 64) as u64 ^ m as u64;
    }
}

/// A map keyed by object address.
pub type AddrMap<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

/// (count, bytes) per type index.
type PerType = HashMap<u32, (u64, u64)>;

/// One object reached: its type, size and holder.
struct Rec {
    ty: u32,
    bytes: u64,
    holder: u32,
}

/// The breadth-first walk and what it has found.
#[derive(Default)]
struct Walk {
    seen: AddrMap<Rec>,
    /// (object, holder node, reached through names only from a root).
    queue: VecDeque<(u64, u32, bool)>,
    nodes: Vec<Node>,
    node_of: HashMap<(u32, String), u32>,
    unreadable: u64,
}

impl Walk {
    /// The node for `label` under `parent`, made when new.
    fn node(&mut self, parent: u32, label: String, obj: u64) -> u32 {
        let next = self.nodes.len() as u32;
        *self
            .node_of
            .entry((parent, label.clone()))
            .or_insert_with(|| {
                self.nodes.push(Node { parent, label, obj });
                next
            })
    }

    /// Records `addr` (held by `holder`) when it is a new object; queues it when `walk`.
    fn visit(&mut self, heap: &mut Heap, addr: u64, holder: u32) -> bool {
        // NULL: an empty slot (a split dict's missing value, an unset slot).
        if addr == 0 || self.seen.contains_key(&addr) {
            return false;
        }
        if self.seen.len() >= MAX_OBJECTS {
            self.unreadable += 1;
            return false;
        }
        let Some(ty) = heap.type_of(addr) else {
            if self.unreadable < 10 {
                let ty = heap.img.word(addr + 8);
                log::debug!("not an object at {addr:#x} (ob_type {ty:x?})");
            }
            self.unreadable += 1;
            return false;
        };
        let bytes = heap.size(addr, &heap.types[ty as usize]);
        self.seen.insert(addr, Rec { ty, bytes, holder });
        true
    }

    fn reach(&mut self, heap: &mut Heap, addr: u64, holder: u32, named: bool) {
        if self.visit(heap, addr, holder) {
            self.queue.push_back((addr, holder, named));
        }
    }

    fn bfs(&mut self, heap: &mut Heap) {
        let mut edges = Vec::new();
        while let Some((addr, holder, named)) = self.queue.pop_front() {
            let Some(ty) = self.seen.get(&addr).map(|r| r.ty) else {
                continue;
            };
            edges.clear();
            heap.edges(addr, ty, &mut edges);
            for e in edges.drain(..) {
                match e {
                    Edge::Part(p) => {
                        self.visit(heap, p, holder);
                    }
                    Edge::Item(p) => self.reach(heap, p, holder, false),
                    Edge::Named(name, p) if named && !self.seen.contains_key(&p) => {
                        let node = self.node(holder, name, p);
                        self.reach(heap, p, node, true);
                    }
                    Edge::Named(_, p) => self.reach(heap, p, holder, false),
                }
            }
        }
    }

    /// Totals per type and per holder.
    fn finish(self, heap: &Heap) -> Census {
        let mut census = Census {
            unreadable: self.unreadable,
            ..Census::default()
        };
        let mut per_type: PerType = HashMap::new();
        let mut per_holder: HashMap<u32, (u64, u64, PerType)> = HashMap::new();
        for rec in self.seen.values() {
            census.objects += 1;
            census.bytes += rec.bytes;
            let t = per_type.entry(rec.ty).or_default();
            t.0 += 1;
            t.1 += rec.bytes;
            if rec.holder != NO_HOLDER {
                let h = per_holder.entry(rec.holder).or_default();
                h.0 += 1;
                h.1 += rec.bytes;
                let ht = h.2.entry(rec.ty).or_default();
                ht.0 += 1;
                ht.1 += rec.bytes;
            }
        }
        let name = |t: u32| heap.types[t as usize].name.clone();
        // Classes of different modules may share a name: merge by name.
        let mut by_name: HashMap<String, (u64, u64)> = HashMap::new();
        for (t, (c, b)) in per_type {
            let e = by_name.entry(name(t)).or_default();
            e.0 += c;
            e.1 += b;
        }
        census.types = by_name
            .into_iter()
            .map(|(name, (count, bytes))| TypeCount { name, count, bytes })
            .collect();
        census
            .types
            .sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.name.cmp(&b.name)));
        for (node, (count, bytes, types)) in per_holder {
            let obj = self.nodes[node as usize].obj;
            let (type_name, len) = match self.seen.get(&obj) {
                Some(r) => {
                    let info = &heap.types[r.ty as usize];
                    (info.name.clone(), heap.container_len(obj, info))
                }
                None => ("?".to_owned(), None),
            };
            let mut by_type = HashMap::new();
            for (t, (c, b)) in types {
                let e: &mut (u64, u64) = by_type.entry(name(t)).or_default();
                e.0 += c;
                e.1 += b;
            }
            census.holders.push(Holder {
                path: self.path(node),
                type_name,
                len,
                retained_count: count,
                retained_bytes: bytes,
                by_type,
            });
        }
        census
            .holders
            .sort_by_key(|h| std::cmp::Reverse(h.retained_bytes));
        let index: HashMap<Vec<String>, u32> = census
            .holders
            .iter()
            .enumerate()
            .map(|(i, h)| (h.path.clone(), i as u32))
            .collect();
        let node_index: HashMap<u32, u32> = (0..self.nodes.len() as u32)
            .filter_map(|n| Some((n, *index.get(&self.path(n))?)))
            .collect();
        for (&addr, rec) in &self.seen {
            let Some(&h) = node_index.get(&rec.holder) else {
                continue;
            };
            let info = &heap.types[rec.ty as usize];
            census.blocks.insert(addr - heap.header_bytes(info), h);
            if let Some(buffer) = heap.own_buffer(addr, info) {
                census.blocks.insert(buffer, h);
            }
        }
        census
    }

    /// The names from the root to `node`.
    fn path(&self, mut node: u32) -> Vec<String> {
        let mut out = Vec::new();
        while node != NO_HOLDER {
            let n = &self.nodes[node as usize];
            out.push(n.label.clone());
            node = n.parent;
        }
        out.reverse();
        out
    }
}
