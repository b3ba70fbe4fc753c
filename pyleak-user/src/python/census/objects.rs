//! Python objects as read from an [`Image`]: their types (name, size, what kind of
//! container), their sizes as `sys.getsizeof` counts them (plus the GC header and the
//! pre-header), and the references a census follows: dict entries, list/tuple/set items,
//! instance attributes (a `__dict__`, managed dicts and inline values), `__slots__`,
//! closure cells, defaults, bound methods, class and module dicts.
//!
//! Nothing is trusted: an object is one whose `ob_type` is a type whose own type is a
//! type; anything else (a racing or garbage pointer) is refused and counted by the
//! caller. Lengths are bounded before anything is read.

use std::collections::HashMap;
use std::rc::Rc;

use super::image::Image;
use super::layout::{flags, FreeVars, HeapLayout, ManagedDict};
use super::layout::{MEMBER_OBJECT, MEMBER_OBJECT_EX};
use crate::python::heap::{ReadMemory, VmReader};

/// Longest container (items, dict entries, set slots) walked; longer ones are refused.
pub(super) const MAX_ITEMS: u64 = 1 << 26;
/// Longest type or attribute name kept.
const MAX_NAME: usize = 200;
/// `PyGC_Head` (two words before a GC object) and the managed pre-header (two more).
const GC_HEAD: u64 = 16;
const PREHEADER: u64 = 16;

/// What kind of object a type makes, for sizing and following references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dict,
    List,
    Tuple,
    Set,
    Cell,
    Function,
    Method,
    Module,
    Type,
    Str,
    Bytes,
    ByteArray,
    Long,
    Other,
}

/// What a census knows of one type.
#[derive(Debug, Clone)]
pub struct TypeInfo {
    /// `tp_name`; a class's is prefixed with its `__module__` (`__main__.Item`).
    pub name: String,
    /// `tp_flags`.
    pub flags: u64,
    /// `tp_basicsize`, `tp_itemsize`.
    pub basicsize: u64,
    /// `tp_itemsize`.
    pub itemsize: u64,
    /// The container layout (a class inherits its base's).
    pub kind: Kind,
    /// `tp_dictoffset`.
    pub dictoffset: i64,
    /// `ht_cached_keys` (classes only).
    pub cached_keys: u64,
    /// `__slots__` holding objects: (name, offset in the instance), bases' included.
    pub slots: Vec<(String, u64)>,
}

/// One reference out of an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edge {
    /// An item, key or value: paths read `[*]`.
    Item(u64),
    /// A named reference: a global, an attribute, a closure variable.
    Named(String, u64),
    /// An object that is part of its referrer's structure (a module's, class's or
    /// instance's `__dict__`, a closure's tuple and cells): counted with the referrer.
    Part(u64),
}

/// Objects of one process read from its image; type facts cached by address.
pub struct Heap<'a> {
    /// The copied memory.
    pub img: &'a Image,
    /// The version's layout.
    pub layout: HeapLayout,
    /// `tp_flags` bits that add a pre-header (managed dict, weakrefs).
    pub preheader_flags: u64,
    /// `sizeof(PyASCIIObject)`, `sizeof(PyCompactUnicodeObject)`.
    pub sizeof_ascii: u64,
    /// `sizeof(PyCompactUnicodeObject)`.
    pub sizeof_compact: u64,
    /// Reads names outside the image (static types' `tp_name` in read-only data).
    live: VmReader,
    /// Type address → index in `types`, or None when not a type.
    type_index: HashMap<u64, Option<u32>>,
    /// Types seen, by index.
    pub types: Vec<Rc<TypeInfo>>,
    /// C strings read outside the image.
    cstrings: HashMap<u64, Option<String>>,
}

impl<'a> Heap<'a> {
    /// Reads objects of `pid` from `img` (names of static types from the live process).
    pub fn new(
        pid: u32,
        img: &'a Image,
        layout: HeapLayout,
        preheader_flags: u64,
        sizeof_ascii: u64,
        sizeof_compact: u64,
    ) -> Heap<'a> {
        Heap {
            img,
            layout,
            preheader_flags,
            sizeof_ascii,
            sizeof_compact,
            live: VmReader::new(pid),
            type_index: HashMap::new(),
            types: Vec::new(),
            cstrings: HashMap::new(),
        }
    }

    pub(super) fn word(&self, addr: u64) -> Option<u64> {
        self.img.word(addr)
    }

    pub(super) fn ptr(&self, addr: u64) -> Option<u64> {
        self.word(addr).filter(|&p| p != 0 && p & 7 == 0)
    }

    pub(super) fn byte(&self, addr: u64) -> Option<u8> {
        self.img.bytes(addr, 1).map(|b| b[0])
    }

    /// `ob_size` as a bounded length.
    pub(super) fn len_at(&self, addr: u64) -> Option<u64> {
        let n = self.word(addr)? as i64;
        (0..=MAX_ITEMS as i64).contains(&n).then_some(n as u64)
    }

    /// The type index of the object at `addr`, or None when it is not an object.
    pub fn type_of(&mut self, addr: u64) -> Option<u32> {
        if addr == 0 || addr & 7 != 0 {
            return None;
        }
        let tp = self.word(addr + 8)?;
        if let Some(&known) = self.type_index.get(&tp) {
            return known;
        }
        let idx = self.read_type(tp).map(|info| {
            self.types.push(Rc::new(info));
            (self.types.len() - 1) as u32
        });
        self.type_index.insert(tp, idx);
        idx
    }

    /// Whether `tp` is a type: one whose own type is a type.
    fn is_type(&self, tp: u64) -> bool {
        let t = self.layout.ty;
        let Some(meta) = self.ptr(tp + 8) else {
            return false;
        };
        // (Not `Py_TPFLAGS_READY`: a static type nobody readied still names its objects.)
        let meta_flags = self.word(meta + t.flags).unwrap_or(0);
        self.word(tp + t.flags).is_some() && meta_flags & flags::TYPE != 0
    }

    fn read_type(&mut self, tp: u64) -> Option<TypeInfo> {
        if tp == 0 || tp & 7 != 0 || !self.is_type(tp) {
            return None;
        }
        let t = self.layout.ty;
        let fl = self.word(tp + t.flags)?;
        let mut name = self.cstring(self.word(tp + t.name)?)?;
        let heap = fl & flags::HEAPTYPE != 0;
        if heap && !name.contains('.') {
            if let Some(module) = self.class_module(tp) {
                if module != "builtins" {
                    name = format!("{module}.{name}");
                }
            }
        }
        let mut info = TypeInfo {
            name,
            flags: fl,
            basicsize: self.word(tp + t.basicsize)?,
            itemsize: self.word(tp + t.itemsize)?,
            kind: Kind::Other,
            dictoffset: self.word(tp + t.dictoffset)? as i64,
            cached_keys: if heap {
                self.word(tp + t.cached_keys).unwrap_or(0)
            } else {
                0
            },
            slots: Vec::new(),
        };
        // Follow the bases to the first static type: its kind is the instances' layout;
        // each class on the way adds its `__slots__`.
        let mut base = tp;
        for _ in 0..64 {
            let bfl = self.word(base + t.flags)?;
            if bfl & flags::HEAPTYPE == 0 {
                let bname = self.cstring(self.word(base + t.name)?)?;
                info.kind = kind_of(bfl, &bname);
                break;
            }
            self.add_slots(base, &mut info.slots);
            match self.ptr(base + t.base) {
                Some(b) if self.is_type(b) => base = b,
                _ => break,
            }
        }
        Some(info)
    }

    /// `__slots__` members of class `tp` holding objects.
    fn add_slots(&mut self, tp: u64, out: &mut Vec<(String, u64)>) {
        let f = self.layout.fixed;
        let (Some(meta), Some(n)) = (self.ptr(tp + 8), self.len_at(tp + f.ob_size)) else {
            return;
        };
        let Some(meta_size) = self.word(meta + self.layout.ty.basicsize) else {
            return;
        };
        for i in 0..n.min(256) {
            let m = tp + meta_size + i * f.member_size;
            let (Some(name), Some(kind), Some(off)) = (
                self.word(m).filter(|&p| p != 0),
                self.img.bytes(m + f.member_type, 4),
                self.word(m + f.member_offset),
            ) else {
                continue;
            };
            let kind = i32::from_le_bytes([kind[0], kind[1], kind[2], kind[3]]);
            if kind == MEMBER_OBJECT || kind == MEMBER_OBJECT_EX {
                if let Some(name) = self.cstring(name) {
                    out.push((name, off));
                }
            }
        }
    }

    /// A class's `__module__`, from its dict.
    fn class_module(&mut self, tp: u64) -> Option<String> {
        let d = self.ptr(tp + self.layout.ty.dict)?;
        let entries = self.dict_entries(d)?;
        entries.into_iter().find_map(|(k, v)| {
            (self.str_value(k).as_deref() == Some("__module__"))
                .then(|| self.str_value(v))
                .flatten()
        })
    }

    /// A NUL-terminated string, from the image or else the live process.
    fn cstring(&mut self, addr: u64) -> Option<String> {
        if addr == 0 {
            return None;
        }
        let from = |b: &[u8]| {
            let end = b.iter().position(|&c| c == 0)?;
            Some(String::from_utf8_lossy(&b[..end]).into_owned())
        };
        for len in [MAX_NAME, 64, 16] {
            if let Some(s) = self.img.bytes(addr, len).and_then(from) {
                return Some(s);
            }
        }
        if let Some(s) = self.cstrings.get(&addr) {
            return s.clone();
        }
        // Page by page: the string may end just before an unmapped page.
        let mut got = None;
        let mut bytes = Vec::new();
        let mut at = addr;
        while bytes.len() < MAX_NAME {
            let len = (0x1000 - (at & 0xfff)) as usize;
            let Some(Ok(b)) = self.live.read_batch(&[(at, len)]).pop() else {
                break;
            };
            bytes.extend_from_slice(&b);
            if let Some(s) = from(&bytes) {
                got = Some(s);
                break;
            }
            at += len as u64;
        }
        self.cstrings.insert(addr, got.clone());
        got
    }

    /// The text of a `str` object (compact ones, up to `MAX_NAME` characters).
    pub fn str_value(&mut self, addr: u64) -> Option<String> {
        let ty = self.type_of(addr)?;
        if self.types[ty as usize].kind != Kind::Str {
            return None;
        }
        let f = self.layout.fixed;
        let len = self.len_at(addr + f.str_length)? as usize;
        let state = self.img.bytes(addr + f.str_state, 4)?;
        let state = u32::from_le_bytes([state[0], state[1], state[2], state[3]]);
        let kind = ((state >> 2) & 7) as usize;
        if state & (1 << 5) == 0 || len > MAX_NAME || ![1, 2, 4].contains(&kind) {
            return None;
        }
        if state & (1 << 6) != 0 {
            let b = self.img.bytes(addr + self.sizeof_ascii, len)?;
            return Some(String::from_utf8_lossy(b).into_owned());
        }
        let b = self.img.bytes(addr + self.sizeof_compact, len * kind)?;
        let unit = |c: &[u8]| match kind {
            1 => u32::from(c[0]),
            2 => u32::from(u16::from_le_bytes([c[0], c[1]])),
            _ => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        };
        Some(
            b.chunks_exact(kind)
                .map(|c| char::from_u32(unit(c)).unwrap_or(char::REPLACEMENT_CHARACTER))
                .collect(),
        )
    }

    /// The object's size in bytes: `sys.getsizeof` plus the pre-header.
    pub fn size(&self, addr: u64, ty: &TypeInfo) -> u64 {
        let f = self.layout.fixed;
        let mut n = ty.basicsize;
        let ob_size = || {
            self.word(addr + f.ob_size)
                .map_or(0, |s| (s as i64).unsigned_abs())
        };
        match ty.kind {
            Kind::Str => {
                let len = self.len_at(addr + f.str_length).unwrap_or(0);
                let state = self
                    .img
                    .bytes(addr + f.str_state, 4)
                    .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
                let kind = u64::from((state >> 2) & 7);
                if state & (1 << 6) != 0 {
                    n = self.sizeof_ascii + len + 1;
                } else if state & (1 << 5) != 0 {
                    n = self.sizeof_compact + (len + 1) * kind;
                }
            }
            Kind::Long if self.layout.long_tag => {
                n += (self.word(addr + 16).unwrap_or(0) >> 3).min(MAX_ITEMS) * ty.itemsize;
            }
            Kind::List => {
                n += self.len_at(addr + f.list_allocated).unwrap_or(0) * 8;
            }
            // `bytearray.__sizeof__`: the object and its whole buffer (`ob_alloc`).
            // (Bytes, not items: a buffer up to 1 TiB is believed.)
            Kind::ByteArray => {
                n += self
                    .word(addr + f.bytearray_alloc)
                    .filter(|&a| a < 1 << 40)
                    .unwrap_or(0);
            }
            Kind::Dict => {
                if let Some(keys) = self.ptr(addr + self.layout.dict.keys) {
                    n += self.keys_bytes(keys);
                }
            }
            Kind::Set => {
                let table = self.word(addr + f.set_table).unwrap_or(0);
                if table != addr + f.set_smalltable {
                    n += (self.len_at(addr + f.set_mask).unwrap_or(0) + 1) * 16;
                }
            }
            // Only these keep their length in `ob_size` (a generator's or a code
            // object's item size counts something else).
            Kind::Tuple | Kind::Bytes | Kind::Long => {
                n += ob_size().min(MAX_ITEMS) * ty.itemsize;
            }
            _ => {}
        }
        if ty.flags & flags::HAVE_GC != 0 {
            n += GC_HEAD;
        }
        if ty.flags & self.preheader_flags != 0 {
            n += PREHEADER;
        }
        n
    }

    /// Bytes before the object in its allocator block: the GC header and the pre-header.
    pub fn header_bytes(&self, ty: &TypeInfo) -> u64 {
        let gc = if ty.flags & flags::HAVE_GC != 0 {
            GC_HEAD
        } else {
            0
        };
        gc + if ty.flags & self.preheader_flags != 0 {
            PREHEADER
        } else {
            0
        }
    }

    /// The block of its own an object's contents live in, if any: a list's item array, a
    /// bytearray's buffer.
    pub fn own_buffer(&self, addr: u64, ty: &TypeInfo) -> Option<u64> {
        let f = self.layout.fixed;
        match ty.kind {
            Kind::List => self.ptr(addr + f.list_items),
            Kind::ByteArray => self.ptr(addr + f.bytearray_bytes),
            _ => None,
        }
    }

    /// How many items a container holds (dict, list, tuple, set), for holder reports.
    pub fn container_len(&self, addr: u64, ty: &TypeInfo) -> Option<u64> {
        let f = self.layout.fixed;
        match ty.kind {
            Kind::Dict => self.len_at(addr + self.layout.dict.used),
            Kind::List | Kind::Tuple => self.len_at(addr + f.ob_size),
            Kind::Set => self.len_at(addr + f.set_used),
            _ => None,
        }
    }

    /// The references out of the object at `addr` (of type `ty`) that a census follows.
    pub fn edges(&mut self, addr: u64, ty: u32, out: &mut Vec<Edge>) {
        let info = Rc::clone(&self.types[ty as usize]);
        let f = self.layout.fixed;
        match info.kind {
            Kind::Dict => {
                for (k, v) in self.dict_entries(addr).unwrap_or_default() {
                    out.extend([Edge::Item(k), Edge::Item(v)]);
                }
            }
            Kind::List => {
                let n = self.len_at(addr + f.ob_size).unwrap_or(0);
                let cap = self.len_at(addr + f.list_allocated).unwrap_or(0);
                if let Some(items) = self.ptr(addr + f.list_items) {
                    self.items(items, n.min(cap), out);
                }
            }
            Kind::Tuple => {
                let n = self.len_at(addr + f.ob_size).unwrap_or(0);
                self.items(addr + f.tuple_items, n, out);
            }
            Kind::Set => {
                let mask = self.len_at(addr + f.set_mask).unwrap_or(0);
                if let Some(table) = self.ptr(addr + f.set_table) {
                    let b = self.img.bytes(table, ((mask + 1) * 16) as usize);
                    for e in b.into_iter().flat_map(|b| b.chunks_exact(16)) {
                        let k = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
                        if k != 0 {
                            out.push(Edge::Item(k));
                        }
                    }
                }
            }
            Kind::Cell => out.extend(self.ptr(addr + f.cell_ref).map(Edge::Item)),
            Kind::Method => {
                out.extend(self.ptr(addr + f.method_func).map(Edge::Item));
                out.extend(self.ptr(addr + f.method_self).map(Edge::Item));
            }
            Kind::Function => self.function_edges(addr, out),
            Kind::Module => {
                if let Some(d) = self.ptr(addr + f.module_dict) {
                    self.named_dict(d, out);
                }
            }
            Kind::Type => {
                if let Some(d) = self.ptr(addr + self.layout.ty.dict) {
                    self.named_dict(d, out);
                }
            }
            _ => {}
        }
        if info.flags & flags::HEAPTYPE != 0 {
            self.attribute_edges(addr, &info, out);
        }
    }

    pub(super) fn items(&self, items: u64, n: u64, out: &mut Vec<Edge>) {
        if let Some(b) = self.img.bytes(items, (n * 8) as usize) {
            for w in b.chunks_exact(8) {
                let p = u64::from_le_bytes(w.try_into().unwrap_or_default());
                if p != 0 {
                    out.push(Edge::Item(p));
                }
            }
        }
    }

    /// An instance's attributes: its `__dict__` (at `tp_dictoffset` or managed), its
    /// values (3.11+: shared keys), its `__slots__`.
    fn attribute_edges(&mut self, addr: u64, info: &TypeInfo, out: &mut Vec<Edge>) {
        let l = self.layout;
        let managed = info.flags & flags::MANAGED_DICT != 0;
        let values_array = l.dict.values_array;
        match (l.managed_dict, managed) {
            (ManagedDict::DictOrValuesApart, true) => {
                if let Some(d) = self.ptr(addr.wrapping_sub(24)) {
                    self.named_dict(d, out);
                } else if let Some(v) = self.ptr(addr.wrapping_sub(32)) {
                    self.named_values(info.cached_keys, v + values_array, MAX_ITEMS, out);
                }
            }
            (ManagedDict::Tagged, true) => match self.word(addr.wrapping_sub(24)) {
                Some(w) if w & 1 == 1 => {
                    self.named_values(info.cached_keys, w + 1 + values_array, MAX_ITEMS, out)
                }
                Some(d) if d != 0 => self.named_dict(d, out),
                _ => {}
            },
            (ManagedDict::Inline, true) => {
                if let Some(d) = self.ptr(addr.wrapping_sub(24)) {
                    self.named_dict(d, out);
                } else if info.flags & flags::INLINE_VALUES != 0 {
                    // `PyDictValues {capacity, size, embedded, valid, ...}` then values.
                    let v = addr + info.basicsize;
                    let (cap, valid) = (self.byte(v), self.byte(v + 3));
                    if let (Some(cap), Some(1)) = (cap, valid) {
                        let cap = u64::from(cap);
                        self.named_values(info.cached_keys, v + values_array, cap, out);
                    }
                }
            }
            _ if info.dictoffset > 0 => {
                if let Some(d) = self.ptr(addr + info.dictoffset as u64) {
                    self.named_dict(d, out);
                }
            }
            _ => {}
        }
        for (name, off) in &info.slots {
            if let Some(v) = self.ptr(addr + off) {
                out.push(Edge::Named(name.clone(), v));
            }
        }
    }

    /// A function's closure cells (named `<closure NAME>`), defaults and keyword defaults.
    fn function_edges(&mut self, addr: u64, out: &mut Vec<Edge>) {
        let (fl, fixed) = (self.layout.func, self.layout.fixed);
        if let Some(closure) = self.ptr(addr + fl.closure) {
            out.push(Edge::Part(closure));
            let names = self.ptr(addr + fl.code).and_then(|c| self.freevar_names(c));
            let n = self.len_at(closure + fixed.ob_size).unwrap_or(0);
            for i in 0..n {
                let Some(cell) = self.ptr(closure + fixed.tuple_items + i * 8) else {
                    continue;
                };
                out.push(Edge::Part(cell));
                if let Some(v) = self.ptr(cell + fixed.cell_ref) {
                    let name = names.as_ref().and_then(|n| n.get(i as usize));
                    let name = name.map_or_else(|| format!("{i}"), String::clone);
                    out.push(Edge::Named(format!("<closure {name}>"), v));
                }
            }
        }
        if let Some(defaults) = self.ptr(addr + fl.defaults) {
            out.push(Edge::Part(defaults));
            let n = self.len_at(defaults + fixed.ob_size).unwrap_or(0);
            for i in 0..n {
                if let Some(v) = self.ptr(defaults + fixed.tuple_items + i * 8) {
                    out.push(Edge::Named(format!("<default {i}>"), v));
                }
            }
        }
        if let Some(kw) = self.ptr(addr + fl.kwdefaults) {
            self.named_dict(kw, out);
        }
    }

    /// The names of a code object's free variables, in closure order.
    fn freevar_names(&mut self, code: u64) -> Option<Vec<String>> {
        let fixed = self.layout.fixed;
        let (tuple, skip) = match self.layout.freevars {
            FreeVars::Tuple(off) => (self.ptr(code + off)?, 0),
            FreeVars::LocalsPlus { names, nfreevars } => {
                let t = self.ptr(code + names)?;
                let n = self.img.bytes(code + nfreevars, 4)?;
                let free = u64::from(u32::from_le_bytes([n[0], n[1], n[2], n[3]]));
                let total = self.len_at(t + fixed.ob_size)?;
                (t, total.checked_sub(free)?)
            }
        };
        let total = self.len_at(tuple + fixed.ob_size)?;
        (skip..total)
            .map(|i| {
                let s = self.ptr(tuple + fixed.tuple_items + i * 8)?;
                self.str_value(s)
            })
            .collect()
    }
}

impl Heap<'_> {
    /// The value of attribute (or module global) `name` of `obj`, as a census sees it.
    pub fn attr(&mut self, obj: u64, name: &str) -> Option<u64> {
        let ty = self.type_of(obj)?;
        let mut edges = Vec::new();
        self.edges(obj, ty, &mut edges);
        edges.into_iter().find_map(|e| match e {
            Edge::Named(n, v) if n == name => Some(v),
            _ => None,
        })
    }

    /// The value of a non-negative `int` below 2^64 (30-bit digits after the header).
    pub fn int_value(&mut self, addr: u64) -> Option<u64> {
        let ty = self.type_of(addr)?;
        if self.types[ty as usize].kind != Kind::Long {
            return None;
        }
        let word = self.word(addr + self.layout.fixed.ob_size)?;
        let digits = if self.layout.long_tag {
            // `lv_tag`: digit count above 3 bits, sign in the low 2 (2: negative).
            (word & 3 != 2).then_some(word >> 3)?
        } else {
            u64::try_from(word as i64).ok()?
        };
        if digits > 3 {
            return None;
        }
        let mut v: u128 = 0;
        for i in 0..digits {
            let d = self.img.bytes(addr + 24 + i * 4, 4)?;
            v |= u128::from(u32::from_le_bytes([d[0], d[1], d[2], d[3]])) << (30 * i);
        }
        u64::try_from(v).ok()
    }
}

/// The kind of a static type, from its flags and `tp_name`.
fn kind_of(fl: u64, name: &str) -> Kind {
    match () {
        _ if fl & flags::DICT != 0 => Kind::Dict,
        _ if fl & flags::LIST != 0 => Kind::List,
        _ if fl & flags::TUPLE != 0 => Kind::Tuple,
        _ if fl & flags::UNICODE != 0 => Kind::Str,
        _ if fl & flags::BYTES != 0 => Kind::Bytes,
        _ if fl & flags::LONG != 0 => Kind::Long,
        _ if fl & flags::TYPE != 0 => Kind::Type,
        _ => match name {
            "set" | "frozenset" => Kind::Set,
            "bytearray" => Kind::ByteArray,
            "cell" => Kind::Cell,
            "function" => Kind::Function,
            "method" => Kind::Method,
            "module" => Kind::Module,
            _ => Kind::Other,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(kind_of(flags::LIST, "mylist"), Kind::List);
        assert_eq!(
            kind_of(flags::DICT | flags::HAVE_GC, "collections.OrderedDict"),
            Kind::Dict
        );
        assert_eq!(kind_of(0, "frozenset"), Kind::Set);
        assert_eq!(kind_of(0, "cell"), Kind::Cell);
        assert_eq!(kind_of(flags::TYPE, "type"), Kind::Type);
        assert_eq!(kind_of(0, "collections.deque"), Kind::Other);
    }
}
