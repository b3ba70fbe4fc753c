//! Judgement of sampled blocks against pools and objects laid out by hand in fake memory.

use super::*;
use crate::python::versions::for_version;

const POOL: u64 = 0x7f00_0000_4000;
const TUPLE: u64 = 0x5000_0000;
const INSTANCE: u64 = 0x5000_1000;
const FLOAT: u64 = 0x5000_2000;
const META: u64 = 0x5000_3000;
const NAMES: u64 = 0x5000_4000;
/// Size class 4: 80-byte blocks (a 2-tuple with its GC header is 56: class 3, 64 bytes).
const SIZE: u64 = 64;

/// A type object at `at` named `name` (its name stored at `name_at`).
fn put_type(mem: &mut FakeMemory, at: u64, flags: u64, basicsize: u64, name_at: u64, name: &str) {
    let mut t = vec![0u8; 400];
    t[8..16].copy_from_slice(&META.to_le_bytes());
    t[TP_NAME..TP_NAME + 8].copy_from_slice(&name_at.to_le_bytes());
    t[TP_BASICSIZE..TP_BASICSIZE + 8].copy_from_slice(&basicsize.to_le_bytes());
    t[TP_FLAGS..TP_FLAGS + 8].copy_from_slice(&flags.to_le_bytes());
    mem.map(at, t);
    let mut n = name.as_bytes().to_vec();
    n.resize(64, 0);
    mem.map(name_at, n);
}

/// Types, and a used pool of 64-byte blocks: blocks 0–5 carved, 1 and 4 free (4 → 1).
fn world() -> FakeMemory {
    let mut mem = FakeMemory::default();
    let ready = TPFLAGS_READY;
    put_type(
        &mut mem,
        META,
        ready | TPFLAGS_TYPE_SUBCLASS,
        400,
        NAMES,
        "type",
    );
    let gc = ready | TPFLAGS_HAVE_GC;
    put_type(
        &mut mem,
        TUPLE,
        gc | TPFLAGS_TUPLE_SUBCLASS,
        24,
        NAMES + 64,
        "tuple",
    );
    put_type(&mut mem, INSTANCE, gc | (1 << 4), 16, NAMES + 128, "Obj");
    put_type(&mut mem, FLOAT, ready, 24, NAMES + 192, "float");
    let mut pool = vec![0u8; 16384];
    let hdr =
        |p: &mut Vec<u8>, off: usize, v: u32| p[off..off + 4].copy_from_slice(&v.to_le_bytes());
    hdr(&mut pool, POOL_COUNT, 4);
    hdr(&mut pool, POOL_SZIDX, 3);
    hdr(&mut pool, POOL_NEXTOFFSET, 48 + 6 * 64);
    hdr(&mut pool, POOL_MAXNEXTOFFSET, 16384 - 64);
    mem.map(POOL, pool);
    mem.put(POOL + POOL_FREEBLOCK as u64, block(4));
    mem.put(block(4), block(1));
    mem.put(block(1), 0);
    mem
}

fn block(n: u64) -> u64 {
    POOL + POOL_OVERHEAD + n * SIZE
}

/// A 2-tuple (GC header, refcount 1, items) in block `n`.
fn put_tuple(mem: &mut FakeMemory, n: u64, items: [u64; 2]) {
    let b = block(n);
    mem.put(b + 16, 1);
    mem.put(b + 24, TUPLE);
    mem.put(b + 32, 2);
    mem.put(b + 40, items[0]);
    mem.put(b + 48, items[1]);
}

fn heap(mem: FakeMemory, minor: u8) -> Heap<FakeMemory> {
    Heap::new(mem, for_version((3, minor)).expect("known version"))
}

fn sampled(h: &mut Heap<FakeMemory>, n: u64) -> Sample {
    let addr = block(n);
    let fingerprint = h.fingerprint(&[(addr, 56)]).remove(0).expect("readable");
    Sample {
        addr,
        size: 56,
        fingerprint,
    }
}

#[test]
fn size_classes() {
    assert_eq!(size_class(0), None);
    assert_eq!(size_class(1), Some(0));
    assert_eq!(size_class(16), Some(0));
    assert_eq!(size_class(17), Some(1));
    assert_eq!(size_class(512), Some(31));
    assert_eq!(size_class(513), None);
}

#[test]
fn fingerprints_find_the_object_after_its_preheader() {
    let mut mem = world();
    put_tuple(&mut mem, 0, [0x1111, 0x2222]);
    // An instance with a managed dict: pointers, GC header, then the object.
    mem.put(block(2) + 32, 1);
    mem.put(block(2) + 40, INSTANCE);
    mem.put(block(3), 1);
    mem.put(block(3) + 8, FLOAT);
    mem.put(block(3) + 16, 1.5f64.to_bits());
    let mut h = heap(mem.clone(), 12);
    let fps = h.fingerprint(&[(block(0), 56), (block(2), 48), (block(3), 24)]);
    let tuple = fps[0].clone().expect("tuple");
    assert_eq!(tuple.object_at, Some(16));
    assert_eq!(tuple.type_name.as_deref(), Some("tuple"));
    let tuple_words = [(24, TUPLE), (32, 2), (40, 0x1111), (48, 0x2222)];
    assert_eq!(tuple.words, tuple_words);
    let obj = fps[1].clone().expect("instance");
    assert_eq!((obj.object_at, obj.words), (Some(32), vec![(40, INSTANCE)]));
    let float = fps[2].clone().expect("float");
    assert_eq!(float.words, [(8, FLOAT), (16, 1.5f64.to_bits())]);
    // 3.10 has no managed dict: the same block holds no object where 3.10 would put it.
    let fp = heap(mem, 10).fingerprint(&[(block(2), 48)]).remove(0);
    assert_eq!(fp.expect("readable").object_at, None);
    // A raw buffer: no words.
    let fp = h
        .fingerprint(&[(block(5), 56)])
        .remove(0)
        .expect("readable");
    assert_eq!(fp, Fingerprint::default());
}

#[test]
fn judges_live_freed_and_reused_blocks() {
    let mut mem = world();
    for n in [0, 2, 3, 5] {
        put_tuple(&mut mem, n, [0x1000 + n, 0x2000]);
    }
    let mut h = heap(mem, 12);
    let samples: Vec<Sample> = [0, 2, 3, 5].iter().map(|&n| sampled(&mut h, n)).collect();
    // Block 0 lives on; 2 is freed onto the free list; 3 is reused by another 2-tuple;
    // 5 by something else.
    let mem = &mut h.mem;
    mem.put(POOL + POOL_FREEBLOCK as u64, block(2));
    mem.put(block(2), block(4));
    mem.regions.get_mut(&POOL).expect("pool")[..4].copy_from_slice(&3u32.to_le_bytes());
    put_tuple(mem, 3, [0x9999, 0x2000]);
    mem.put(block(5) + 24, FLOAT);
    let v = h.judge(&samples);
    assert_eq!(
        v,
        [
            Verdict::Live,
            Verdict::Freed(Freed::FreeList),
            Verdict::Reused,
            Verdict::Reused
        ]
    );
    // A tuple kept dead by its type's free list: refcount 0, its first item the link.
    h.mem.put(block(0) + 16, 0);
    h.mem.put(block(0) + 40, block(3) + 16);
    assert_eq!(h.judge(&samples[..1]), [Verdict::Freed(Freed::DeadObject)]);
    // A word 0 where the refcount was, in a block now holding something else.
    h.mem.put(block(0) + 24, 0x1234_5000);
    assert_eq!(h.judge(&samples[..1]), [Verdict::Reused]);
}

#[test]
fn the_pool_header_settles_whole_pools() {
    let mut mem = world();
    put_tuple(&mut mem, 0, [1, 2]);
    let mut h = heap(mem, 12);
    let s = sampled(&mut h, 0);
    let set = |h: &mut Heap<FakeMemory>, off: usize, v: u32| {
        h.mem.regions.get_mut(&POOL).expect("pool")[off..off + 4].copy_from_slice(&v.to_le_bytes())
    };
    assert_eq!(h.judge(std::slice::from_ref(&s)), [Verdict::Live]);
    // Re-carved for another class (and its maximum with it).
    set(&mut h, POOL_COUNT, 1);
    set(&mut h, POOL_SZIDX, 5);
    set(&mut h, POOL_MAXNEXTOFFSET, 16384 - 96);
    set(&mut h, POOL_NEXTOFFSET, 48 + 2 * 96);
    assert_eq!(
        h.judge(std::slice::from_ref(&s)),
        [Verdict::Freed(Freed::PoolReassigned)]
    );
    set(&mut h, POOL_COUNT, 0);
    assert_eq!(
        h.judge(std::slice::from_ref(&s)),
        [Verdict::Freed(Freed::PoolEmpty)]
    );
    // Back in our class, fresh: only blocks 0 and 1 carved, the sample is block 3.
    let mut s3 = s.clone();
    s3.addr = block(3);
    set(&mut h, POOL_SZIDX, 3);
    set(&mut h, POOL_MAXNEXTOFFSET, 16384 - 64);
    set(&mut h, POOL_NEXTOFFSET, 48 + 2 * 64);
    set(&mut h, POOL_COUNT, 1);
    h.mem.put(POOL + POOL_FREEBLOCK as u64, block(1));
    h.mem.put(block(1), 0);
    assert_eq!(h.judge(&[s3]), [Verdict::Freed(Freed::UnusedTail)]);
    // Garbage in the header: the arena's memory is something else now.
    set(&mut h, POOL_MAXNEXTOFFSET, 7);
    assert_eq!(
        h.judge(std::slice::from_ref(&s)),
        [Verdict::Freed(Freed::NotAPool)]
    );
    // A fresh zeroed mapping, then none at all.
    h.mem.map(POOL, vec![0; 16384]);
    assert_eq!(
        h.judge(std::slice::from_ref(&s)),
        [Verdict::Freed(Freed::PoolUnused)]
    );
    h.mem.regions.remove(&POOL);
    assert_eq!(h.judge(&[s]), [Verdict::Freed(Freed::ArenaUnmapped)]);
}

#[test]
fn garbage_free_lists_and_addresses_are_unknown() {
    let mut mem = world();
    put_tuple(&mut mem, 0, [1, 2]);
    let mut h = heap(mem, 12);
    let s = sampled(&mut h, 0);
    // A loop (4 → 1 → 4), a pointer out of the pool, a list too short for the count.
    for (at, to) in [(block(1), block(4)), (block(1), 0xdead_0000), (block(4), 0)] {
        let mut h = heap(h.mem.clone(), 12);
        h.mem.put(at, to);
        let before = h.stats().syscalls;
        let want = [Verdict::Unknown(Unknown::BadFreeList)];
        assert_eq!(h.judge(std::slice::from_ref(&s)), want);
        // The headers, the pool, and the pool once more in case the copy was torn.
        assert_eq!(h.stats().syscalls - before, 3);
    }
    let mut odd = s.clone();
    odd.addr += 8;
    assert_eq!(h.judge(&[odd]), [Verdict::Unknown(Unknown::NotABlock)]);
    let mut big = s;
    big.size = 600;
    assert_eq!(h.judge(&[big]), [Verdict::Unknown(Unknown::NotPymalloc)]);
}

#[test]
fn one_pool_read_serves_all_its_samples() {
    let mut mem = world();
    for n in [0, 2, 3, 5] {
        put_tuple(&mut mem, n, [n, n]);
    }
    let mut h = heap(mem, 12);
    let samples: Vec<Sample> = [0, 2, 3, 5].iter().map(|&n| sampled(&mut h, n)).collect();
    let before = h.stats();
    assert!(h.judge(&samples).iter().all(|v| v.is_live()));
    let after = h.stats();
    // One batch of headers, one of pools: one range each.
    assert_eq!(after.syscalls - before.syscalls, 2);
    assert_eq!(after.ranges - before.ranges, 2);
    assert_eq!(after.bytes - before.bytes, 48 + 48 + 6 * 64);
}

#[test]
fn pools_headers_count_blocks_in_use_per_class() {
    let mut mem = world();
    // A second used pool right after the first: class 5 (96-byte blocks), 7 in use; a
    // third with garbage in its header, a fourth empty (count 0, a stale class).
    let next = POOL + 16384;
    let mut pool = vec![0u8; 3 * 16384];
    let hdr = |p: &mut Vec<u8>, at: usize, off: usize, v: u32| {
        p[at + off..at + off + 4].copy_from_slice(&v.to_le_bytes())
    };
    hdr(&mut pool, 0, POOL_COUNT, 7);
    hdr(&mut pool, 0, POOL_SZIDX, 5);
    hdr(&mut pool, 0, POOL_NEXTOFFSET, 48 + 9 * 96);
    hdr(&mut pool, 0, POOL_MAXNEXTOFFSET, 16384 - 96);
    hdr(&mut pool, 16384, POOL_COUNT, 50);
    hdr(&mut pool, 16384, POOL_SZIDX, 5);
    hdr(&mut pool, 16384, POOL_MAXNEXTOFFSET, 12);
    hdr(&mut pool, 2 * 16384, POOL_SZIDX, 9);
    mem.map(next, pool);
    let mut h = heap(mem, 12);
    // A region that starts mid-pool reads from the next pool boundary; one that ends
    // mid-pool leaves the partial pool out; an unmapped one reads nothing.
    let classes = h.in_use_by_class(&[
        (POOL - 100, next + 2 * 16384 + 5),
        (next + 2 * 16384, next + 3 * 16384),
        (0x10_0000, 0x10_0000 + 16384),
    ]);
    let mut want = [0u64; NUM_CLASSES];
    want[3] = 4;
    want[5] = 7;
    assert_eq!(classes, want);
}
