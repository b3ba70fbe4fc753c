//! Unit tests of the vm and pages model (`vm.rs`).

use super::*;

#[test]
fn arena_shaped_mappings_from_proc_maps() {
    let maps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n\
7f0000100000-7f0000140000 rw-p 00000000 00:00 0 \n\
7f0000140000-7f0000240000 r--p 00000000 00:00 0 \n\
7f0000240000-7f0000340000 rw-s 00000000 00:01 5 /dev/zero (deleted)\n\
7f0000340000-7f0000440000 rw-p 00000000 08:01 7 /usr/lib/x.so\n\
7f0000440000-7f0000480001 rw-p 00000000 00:00 0 \n";
    assert_eq!(
        earlier_arenas(maps),
        vec![
            (0x7f0000000000, 0x7f0000100000),
            (0x7f0000100000, 0x7f0000140000)
        ]
    );
}

fn ev(kind: VmKind, addr: u64, len: u64, arg: u64, arg2: u64, stack: u64) -> VmEvent {
    VmEvent {
        kind: kind as u32,
        tgid: 1,
        addr,
        len,
        arg,
        arg2,
        stack_id: stack,
        ts_ns: 0,
        flags: 0,
        tid: 1,
    }
}

fn live(m: &VmModel) -> u64 {
    m.procs[&1].regions.iter().map(|(s, r)| r.end - s).sum()
}

#[test]
fn partial_munmap_splits_and_counts_exactly() {
    let mut m = VmModel::default();
    m.apply(&ev(VmKind::Mmap, 0x10000, 10 * PAGE, 0, 0, 7));
    m.apply(&ev(VmKind::Munmap, 0x10000 + 2 * PAGE, 3 * PAGE, 0, 0, 9));
    assert_eq!(live(&m), 7 * PAGE);
    assert_eq!(m.procs[&1].regions.len(), 2);
    assert_eq!(m.vm.freed_bytes, 3 * PAGE);
    m.apply(&ev(VmKind::Munmap, 0x10000, 10 * PAGE, 0, 0, 9));
    assert_eq!(live(&m), 0);
    assert_eq!(
        m.vm,
        Totals {
            allocs: 1,
            alloc_bytes: 10 * PAGE,
            frees: 2,
            freed_bytes: 10 * PAGE,
            unmatched_frees: 0
        }
    );
    let a = m.stacks[&(1, Layer::Vm, 7)];
    assert_eq!((a.alloc_bytes, a.freed_bytes), (10 * PAGE, 10 * PAGE));
}

#[test]
fn exec_releases_the_old_programs_address_space() {
    let mut m = VmModel::default();
    m.apply(&ev(VmKind::Brk, 0, 0, 0x50000, 0, 0));
    m.apply(&ev(VmKind::Brk, 0x52000, 0, 0x52000, 0, 3));
    m.apply(&ev(VmKind::Mmap, 0x10000, 4 * PAGE, 0, 0, 7));
    m.apply(&ev(VmKind::Fault, 0x10000, PAGE, 0, 0, 7));
    assert_eq!(live(&m), 6 * PAGE);
    m.apply(&ev(VmKind::Exec, 0, 0, 0, 0, 0));
    assert_eq!(live(&m), 0);
    assert!(m.procs[&1].pages.is_empty());
    assert_eq!(m.procs[&1].brk, None);
    // Not frees the old program made: no call counted.
    assert_eq!(m.vm.frees, 0);
    // The new program's heap starts afresh.
    m.apply(&ev(VmKind::Brk, 0, 0, 0x90000, 0, 0));
    m.apply(&ev(VmKind::Brk, 0x91000, 0, 0x91000, 0, 4));
    assert_eq!(live(&m), PAGE);
}

#[test]
fn pages_count_once_until_unmapped() {
    let mut m = VmModel::default();
    m.apply(&ev(VmKind::Mmap, 0x10000, 4 * PAGE, 0, 0, 7));
    for _ in 0..3 {
        m.apply(&ev(VmKind::Fault, 0x10000, PAGE, 0, 0, 5));
    }
    m.apply(&ev(VmKind::Fault, 0x11000, PAGE, 0, 0, 5));
    assert_eq!(m.pages.allocs, 2);
    m.apply(&ev(VmKind::Munmap, 0x10000, PAGE, 0, 0, 5));
    assert_eq!(m.procs[&1].pages.len(), 1);
    m.apply(&ev(VmKind::Fault, 0x10000, PAGE, 0, 0, 5));
    assert_eq!(m.pages.allocs, 3);
    m.apply(&ev(VmKind::Madvise, 0x10000, 2 * PAGE, 4, 0, 5));
    assert_eq!(m.procs[&1].pages.len(), 0);
    assert_eq!(m.pages.frees, 3);
}

#[test]
fn mremap_moves_regions_and_pages() {
    let mut m = VmModel::default();
    m.apply(&ev(VmKind::Mmap, 0x10000, 2 * PAGE, 0, 0, 7));
    m.apply(&ev(VmKind::Fault, 0x10000, PAGE, 0, 0, 7));
    m.apply(&ev(VmKind::Mremap, 0x10000, 2 * PAGE, 4 * PAGE, 0x80000, 8));
    let p = &m.procs[&1];
    assert_eq!(
        p.regions.keys().copied().collect::<Vec<_>>(),
        vec![0x80000, 0x82000]
    );
    assert!(p.pages.contains_key(&0x80000));
    assert_eq!(live(&m), 4 * PAGE);
    // Growing in place.
    m.apply(&ev(VmKind::Mremap, 0x80000, 4 * PAGE, 6 * PAGE, 0x80000, 8));
    assert_eq!(live(&m), 6 * PAGE);
    // Shrinking in place.
    m.apply(&ev(VmKind::Mremap, 0x80000, 6 * PAGE, PAGE, 0x80000, 8));
    assert_eq!(live(&m), PAGE);
}

#[test]
fn brk_grows_and_shrinks_the_heap() {
    let mut m = VmModel::default();
    m.add_process(1, Some(0x50000));
    // After exec, brk(0) reports the new break: nothing is mapped.
    m.apply(&ev(VmKind::Brk, 0, 0, 0x100000, 0, 3));
    assert_eq!(live(&m), 0);
    m.apply(&ev(VmKind::Brk, 0x121000, 0, 0x121000, 0, 3));
    assert_eq!(live(&m), 0x21000);
    m.apply(&ev(VmKind::Brk, 0x110000, 0, 0x110000, 0, 3));
    assert_eq!(live(&m), 0x10000);
}

#[test]
fn reads_of_fresh_anonymous_memory_are_not_resident() {
    let mut m = VmModel::default();
    let anon = 0x22; // MAP_PRIVATE | MAP_ANONYMOUS
    m.apply(&ev(VmKind::Mmap, 0x10000, 2 * PAGE, anon, u64::MAX, 7));
    m.apply(&ev(VmKind::Fault, 0x10000, PAGE, 0, 0, 5)); // read: the zero page
    assert_eq!(m.pages.allocs, 0);
    m.apply(&ev(
        VmKind::Fault,
        0x10000,
        PAGE,
        PF_PRESENT | PF_WRITE,
        0,
        6,
    )); // COW
    m.apply(&ev(VmKind::Fault, 0x11000, PAGE, PF_WRITE, 0, 6));
    assert_eq!(m.pages.allocs, 2);
    assert_eq!(m.stacks[&(1, Layer::Pages, 6)].alloc_bytes, 2 * PAGE);
    // A file mapping's pages are resident when read.
    m.apply(&ev(VmKind::Mmap, 0x40000, PAGE, 0x2, 3, 8));
    m.apply(&ev(VmKind::Fault, 0x40000, PAGE, 0, 0, 5));
    assert_eq!(m.pages.allocs, 3);
}

#[test]
fn mapping_kinds() {
    let region = |flags, origin, made_len| Region {
        end: 0,
        stack_id: 0,
        flags,
        ts_ns: 0,
        origin,
        made_len,
        map_arg: 0x3 << 32 | 0x22,
    };
    let arena = 1 << 20;
    assert_eq!(
        region(FLAG_FOR_PYMALLOC, Origin::Anonymous, arena).kind(),
        MappingKind::PymallocArena
    );
    assert_eq!(
        region(FLAG_FOR_PYMALLOC | FLAG_FOR_LIBC, Origin::Anonymous, arena).kind(),
        MappingKind::MallocMmap,
        "a big pymalloc request's block, mapped by malloc"
    );
    assert_eq!(
        region(FLAG_FOR_LIBC, Origin::Anonymous, 3 << 20).kind(),
        MappingKind::MallocMmap
    );
    assert_eq!(
        region(0, Origin::Anonymous, 256 << 10).kind(),
        MappingKind::PymallocArena,
        "an arena made where pymalloc is not probed"
    );
    assert_eq!(
        region(0, Origin::Anonymous, 3 << 20).kind(),
        MappingKind::Anonymous
    );
    assert_eq!(
        region(FLAG_FOR_LIBC, Origin::Brk, PAGE).kind(),
        MappingKind::MallocHeap
    );
    assert_eq!(region(0, Origin::File, arena).kind(), MappingKind::File);
    // glibc's new_heap: PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, made
    // inside a thread's first free (no malloc in flight) or inside malloc.
    for (flags, len) in [(0, 128 << 20), (FLAG_FOR_LIBC, 64 << 20)] {
        let heap = Region {
            map_arg: 0x4022,
            ..region(flags, Origin::Anonymous, len)
        };
        assert_eq!(heap.kind(), MappingKind::MallocArena);
    }
    let shrunk = Region {
        map_arg: 0x4032,
        ..region(0, Origin::Anonymous, 3 * PAGE)
    };
    assert_eq!(shrunk.kind(), MappingKind::MallocArena);
    let reserved = Region {
        map_arg: 0x4022,
        ..region(0, Origin::Anonymous, 3 << 20)
    };
    assert_eq!(reserved.kind(), MappingKind::Anonymous, "not a heap's size");
    let thread_stack = Region {
        map_arg: 0x20022,
        ..region(0, Origin::Anonymous, 8 << 20)
    };
    assert_eq!(thread_stack.kind(), MappingKind::Stack);
}

#[test]
fn frozen_processes_ignore_later_events() {
    let mut m = VmModel::default();
    m.apply(&ev(VmKind::Mmap, 0x10000, PAGE, 0, 0, 7));
    m.apply(&ev(VmKind::Freeze, 0, 0, 0, 0, 0));
    m.apply(&ev(VmKind::Munmap, 0x10000, PAGE, 0, 0, 7));
    assert_eq!(live(&m), PAGE);
}
