//! The walk on a heap made in code (CPython 3.12's layout): a module whose dict holds a
//! dict of tuples of str and a list, checked for types, sizes, holders, their lengths and
//! retained objects, and the allocator blocks attributed to each holder.

use super::image::Image;
use super::layout::flags;
use super::objects::Heap;
use super::{Walk, NO_HOLDER};
use crate::python::versions::for_version;

/// Where the made-up heap starts.
const BASE: u64 = 0x10_0000;

/// A bump allocator over one region, writing objects as CPython 3.12 lays them out.
struct Made {
    bytes: Vec<u8>,
    next: u64,
}

impl Made {
    fn new() -> Made {
        Made {
            bytes: vec![0; 1 << 16],
            next: BASE + 64,
        }
    }

    /// `len` zeroed bytes, 16-aligned, after `header` bytes left for a GC header.
    fn alloc(&mut self, header: u64, len: u64) -> u64 {
        let at = self.next + header;
        self.next = (at + len + 15) & !15;
        at
    }

    fn put(&mut self, addr: u64, v: u64) {
        let off = (addr - BASE) as usize;
        self.bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn put_byte(&mut self, addr: u64, v: u8) {
        self.bytes[(addr - BASE) as usize] = v;
    }

    fn cstring(&mut self, s: &str) -> u64 {
        let at = self.alloc(0, s.len() as u64 + 1);
        let off = (at - BASE) as usize;
        self.bytes[off..off + s.len()].copy_from_slice(s.as_bytes());
        at
    }

    /// A static type named `name` with `flags`, its type `meta` (0: itself).
    fn ty(&mut self, meta: u64, name: &str, fl: u64, basic: u64, item: u64) -> u64 {
        let t = self.alloc(0, 416);
        let name = self.cstring(name);
        self.put(t + 8, if meta == 0 { t } else { meta });
        self.put(t + 24, name);
        self.put(t + 32, basic);
        self.put(t + 40, item);
        self.put(t + 168, fl | (1 << 12));
        t
    }

    /// An ASCII str (3.12: `PyASCIIObject` is 40 bytes).
    fn str(&mut self, t: u64, s: &str) -> u64 {
        let o = self.alloc(0, 40 + s.len() as u64 + 1);
        self.put(o + 8, t);
        self.put(o + 16, s.len() as u64);
        self.put(o + 32, (1 << 5) | (1 << 6) | (1 << 2));
        let off = (o + 40 - BASE) as usize;
        self.bytes[off..off + s.len()].copy_from_slice(s.as_bytes());
        o
    }

    /// A dict with unicode keys (3.11+ keys: log2 size 3, 8 index bytes, 16-byte entries).
    fn dict(&mut self, t: u64, entries: &[(u64, u64)]) -> u64 {
        let d = self.alloc(16, 48);
        let k = self.alloc(0, 32 + 8 + 16 * entries.len() as u64);
        self.put(d + 8, t);
        self.put(d + 16, entries.len() as u64);
        self.put(d + 32, k);
        self.put(k, 1);
        self.put_byte(k + 8, 3);
        self.put_byte(k + 9, 3);
        self.put_byte(k + 10, 1);
        self.put(k + 24, entries.len() as u64);
        for (i, &(key, value)) in entries.iter().enumerate() {
            self.put(k + 40 + 16 * i as u64, key);
            self.put(k + 48 + 16 * i as u64, value);
        }
        d
    }

    fn tuple(&mut self, t: u64, items: &[u64]) -> u64 {
        let o = self.alloc(16, 24 + 8 * items.len() as u64);
        self.put(o + 8, t);
        self.put(o + 16, items.len() as u64);
        for (i, &it) in items.iter().enumerate() {
            self.put(o + 24 + 8 * i as u64, it);
        }
        o
    }
}

/// The census of the memory `m` made, walked from the module object `module` (a
/// `__main__` with 3.12's layouts).
fn census_from(m: Made, module: u64) -> super::Census {
    let img = Image::from_regions(vec![(BASE, m.bytes)]);
    let cp = for_version((3, 12)).expect("3.12");
    let layout = cp.heap_layout().expect("layout");
    let pre = cp.pymalloc().preheader_flags;
    let mut heap = Heap::new(std::process::id(), &img, layout, pre, 40, 56);
    let mut w = Walk::default();
    let root = w.node(NO_HOLDER, "__main__".to_owned(), module);
    w.reach(&mut heap, module, root, true);
    w.bfs(&mut heap);
    w.finish(&heap)
}

#[test]
fn holders_retain_what_is_reached_through_them() {
    let mut m = Made::new();
    let meta = m.ty(0, "type", flags::TYPE, 920, 40);
    let str_t = m.ty(meta, "str", flags::UNICODE, 40, 0);
    let dict_t = m.ty(meta, "dict", flags::DICT | flags::HAVE_GC, 48, 0);
    let tuple_t = m.ty(meta, "tuple", flags::TUPLE | flags::HAVE_GC, 24, 8);
    let list_t = m.ty(meta, "list", flags::LIST | flags::HAVE_GC, 40, 0);
    let module_t = m.ty(meta, "module", flags::HAVE_GC, 72, 0);
    // REGISTRY = {"a": ("x", "y"), "b": ("z", "w")}
    let (a, b) = (m.str(str_t, "a"), m.str(str_t, "b"));
    let xs = [("x", "y"), ("z", "w")].map(|(p, q)| {
        let (p, q) = (m.str(str_t, p), m.str(str_t, q));
        m.tuple(tuple_t, &[p, q])
    });
    let registry = m.dict(dict_t, &[(a, xs[0]), (b, xs[1])]);
    // CACHE = [item]; items in an array of their own.
    let item = m.str(str_t, "item");
    let cache = m.alloc(16, 40);
    let items = m.alloc(0, 8);
    m.put(items, item);
    m.put(cache + 8, list_t);
    m.put(cache + 16, 1);
    m.put(cache + 24, items);
    m.put(cache + 32, 1);
    let names = [m.str(str_t, "REGISTRY"), m.str(str_t, "CACHE")];
    let globals = m.dict(dict_t, &[(names[0], registry), (names[1], cache)]);
    let module = m.alloc(16, 72);
    m.put(module + 8, module_t);
    m.put(module + 16, globals);
    let census = census_from(m, module);

    assert_eq!(census.unreadable, 0);
    let count = |name: &str| {
        census
            .types
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.count)
    };
    // str: a, b, x, y, z, w, item, REGISTRY, CACHE.
    assert_eq!(count("str"), Some(9));
    assert_eq!(
        (count("tuple"), count("dict"), count("list")),
        (Some(2), Some(2), Some(1))
    );
    let tuple_bytes = census
        .types
        .iter()
        .find(|t| t.name == "tuple")
        .map(|t| t.bytes);
    // A 2-tuple: 24 + 2 × 8 bytes and the GC header.
    assert_eq!(tuple_bytes, Some(2 * (24 + 16 + 16)));
    let holder = |path: &[&str]| {
        census
            .holders
            .iter()
            .find(|h| h.path == path)
            .unwrap_or_else(|| panic!("no holder {path:?} in {:?}", census.holders))
    };
    let reg = holder(&["__main__", "REGISTRY"]);
    assert_eq!((reg.type_name.as_str(), reg.len), ("dict", Some(2)));
    // The dict, its two keys, two tuples and their four str.
    assert_eq!(reg.retained_count, 9);
    assert_eq!(reg.by_type.get("tuple"), Some(&(2, 2 * 56)));
    let cache_h = holder(&["__main__", "CACHE"]);
    assert_eq!((cache_h.len, cache_h.retained_count), (Some(1), 2));
    // The module holds itself, its dict and the global names.
    assert_eq!(holder(&["__main__"]).retained_count, 4);
    // Allocator blocks: a GC object's starts at its GC header; a list's items too.
    let index = |path: &[&str]| census.holders.iter().position(|h| h.path == path);
    let reg_i = index(&["__main__", "REGISTRY"]).map(|i| i as u32);
    let cache_i = index(&["__main__", "CACHE"]).map(|i| i as u32);
    assert_eq!(census.blocks.get(&(registry - 16)).copied(), reg_i);
    assert_eq!(census.blocks.get(&(xs[1] - 16)).copied(), reg_i);
    assert_eq!(census.blocks.get(&items).copied(), cache_i);
    assert_eq!(census.blocks.get(&item).copied(), cache_i);
}

/// A bytearray counts its buffer as `sys.getsizeof` does (56 + `ob_alloc` bytes; it was
/// 56 alone), and the buffer, a block of its own, is its holder's.
#[test]
fn a_bytearray_counts_and_holds_its_buffer() {
    let mut m = Made::new();
    let meta = m.ty(0, "type", flags::TYPE, 920, 40);
    let str_t = m.ty(meta, "str", flags::UNICODE, 40, 0);
    let dict_t = m.ty(meta, "dict", flags::DICT | flags::HAVE_GC, 48, 0);
    let module_t = m.ty(meta, "module", flags::HAVE_GC, 72, 0);
    let bytearray_t = m.ty(meta, "bytearray", 0, 56, 1);
    // BUF = bytearray(4000): ob_size 4000, ob_alloc 4001, ob_bytes -> its buffer.
    let buffer = m.alloc(0, 4008);
    let buf = m.alloc(0, 56);
    m.put(buf + 8, bytearray_t);
    m.put(buf + 16, 4000);
    m.put(buf + 24, 4001);
    m.put(buf + 32, buffer);
    m.put(buf + 40, buffer);
    let name = m.str(str_t, "BUF");
    let globals = m.dict(dict_t, &[(name, buf)]);
    let module = m.alloc(16, 72);
    m.put(module + 8, module_t);
    m.put(module + 16, globals);
    let census = census_from(m, module);

    let bytearrays = census
        .types
        .iter()
        .find(|t| t.name == "bytearray")
        .map(|t| (t.count, t.bytes));
    assert_eq!(bytearrays, Some((1, 56 + 4001)));
    let holder = census
        .holders
        .iter()
        .position(|h| h.path == ["__main__", "BUF"])
        .expect("BUF holds its bytearray") as u32;
    assert_eq!(census.blocks.get(&buf).copied(), Some(holder));
    assert_eq!(census.blocks.get(&buffer).copied(), Some(holder));
}
