//! Copy-on-write after fork: which of a forked child's faults copy a page of its parent's.
//! A child that writes to what it inherited (CPython's GC writing every object's header,
//! a loop touching refcounts) gets a private copy of each page it writes: its resident
//! memory grows by pages that are neither new allocations nor leaks. They are counted
//! apart from the pages layer, per process and faulting stack (`VmModel::cow_stacks`),
//! and reported as `copy_on_write` (`analysis::cow`).

use std::collections::BTreeSet;

use super::vm::{PF_PRESENT, PF_WRITE};

/// `clone(2)`'s flag for a child sharing its parent's memory (`include/uapi/linux/sched.h`).
const CLONE_VM: u64 = 0x100;

/// What a fault is to copy-on-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CowFault {
    /// A page of the parent's, copied by this fault.
    Copy,
    /// A fault on a page copied before (no new page either).
    Again,
    /// In a process that forked, a write to a page it had before pyleak saw its memory
    /// (the fork write-protected it): no new page, and no copy of another's.
    Had,
    /// Nothing to do with copy-on-write: the pages layer's.
    No,
}

/// What a process shares with the parent that forked it, or with its children.
#[derive(Debug, Default)]
pub struct Inherited {
    /// It forked a child (since its last exec): its private pages were write-protected,
    /// and its next write to each faults though the page is present.
    pub has_forked: bool,
    /// A forked child that has not exec'd: every page present in it that it did not fault
    /// in itself is its parent's, shared until one of them writes it.
    pub forked: bool,
    /// Shared mappings (`[start, end)`, `s` in `/proc/PID/maps`) the child had when pyleak
    /// learnt of its fork: a write there is no copy.
    shared: Vec<(u64, u64)>,
    /// Pages a copy-on-write fault made this child's own, still mapped.
    pub copied: BTreeSet<u64>,
}

impl Inherited {
    /// A child just made with `clone_flags`. A child that shares its parent's memory
    /// (`CLONE_VM`: vfork, `posix_spawn`) copies nothing. Else the shared mappings it has
    /// now (`/proc/CHILD/maps`, read here: the child's right after its fork unless it has
    /// mapped more since) are noted so that a write there is not taken for a copy.
    pub fn at_fork(child: u32, clone_flags: u64) -> Inherited {
        if clone_flags & CLONE_VM != 0 {
            return Inherited::default();
        }
        Inherited {
            forked: true,
            shared: std::fs::read_to_string(format!("/proc/{child}/maps"))
                .map(|maps| shared_mappings(&maps))
                .unwrap_or_default(),
            ..Inherited::default()
        }
    }

    /// A fault at `addr` (a page address) with x86 error code `code`; `own`: the page was
    /// faulted in by this process, or lies in a mapping it made. A copy is remembered
    /// (the caller counts it per stack).
    ///
    /// A copy-on-write break is, in a forked child, a write to a present page
    /// (`PF_PRESENT | PF_WRITE`) that is not its own, outside any shared mapping: the
    /// kernel write-protects every private page at fork (`mm/memory.c`,
    /// `copy_present_pte`) and gives the writer its own copy (`wp_page_copy`). In the
    /// parent, the same fault on a page it had before pyleak attached is no new page
    /// either (`Had`; a never-written page it had only read, the shared zero page, would
    /// be one, and is missed).
    pub fn fault(&mut self, addr: u64, code: u64, own: bool) -> CowFault {
        if self.copied.contains(&addr) {
            return CowFault::Again;
        }
        let present_write = code & (PF_PRESENT | PF_WRITE) == PF_PRESENT | PF_WRITE;
        if !present_write || own {
            return CowFault::No;
        }
        if self.forked && !self.shared.iter().any(|&(s, e)| (s..e).contains(&addr)) {
            self.copied.insert(addr);
            return CowFault::Copy;
        }
        if self.has_forked {
            return CowFault::Had;
        }
        CowFault::No
    }

    /// Its program was replaced (exec): its memory is new, shared with no one.
    pub fn exec(&mut self) {
        self.forked = false;
        self.has_forked = false;
    }

    /// `[start, end)` unmapped or dropped: the copies there are gone.
    pub fn drop_range(&mut self, start: u64, end: u64) {
        let gone: Vec<u64> = self.copied.range(start..end).copied().collect();
        for addr in &gone {
            self.copied.remove(addr);
        }
    }

    /// `keep` bytes at `old` moved to `new` (`mremap`): the copies go along.
    pub fn moved(&mut self, old: u64, keep: u64, new: u64) {
        let moved: Vec<u64> = self.copied.range(old..old + keep).copied().collect();
        for addr in moved {
            self.copied.remove(&addr);
            self.copied.insert(addr - old + new);
        }
    }
}

/// The shared mappings of a `/proc/PID/maps` text (`s` in its permissions).
fn shared_mappings(maps: &str) -> Vec<(u64, u64)> {
    crate::proctext::maps(maps)
        .filter(|m| m.perms.ends_with('s'))
        .map(|m| (m.start, m.end))
        .collect()
}

#[cfg(test)]
mod tests {
    use pyleak_common::{Layer, VmEvent, VmKind};

    use super::*;
    use crate::collect::vm::{VmModel, PAGE};

    /// No such process (above the kernel's `PID_MAX_LIMIT`, 4 Mi): its maps read as none.
    const CHILD: u32 = 5_000_000;
    const PARENT: u32 = 5_000_001;
    const PRESENT_WRITE: u64 = PF_PRESENT | PF_WRITE;

    fn ev(pid: u32, kind: VmKind, addr: u64, len: u64, arg: u64, stack: u64) -> VmEvent {
        VmEvent {
            kind: kind as u32,
            tgid: pid,
            addr,
            len,
            arg,
            arg2: 0,
            stack_id: stack,
            ts_ns: 0,
            flags: 0,
            tid: pid,
        }
    }

    fn fault(m: &mut VmModel, pid: u32, addr: u64, code: u64, stack: u64) {
        m.apply(&ev(pid, VmKind::Fault, addr, PAGE, code, stack));
    }

    fn pages_at(m: &VmModel, pid: u32, stack: u64) -> u64 {
        m.stacks
            .get(&(pid, Layer::Pages, stack))
            .map_or(0, |a| a.alloc_bytes / PAGE)
    }

    #[test]
    fn a_childs_writes_to_inherited_pages_are_copies_not_pages() {
        let mut m = VmModel::default();
        // The parent's heap, faulted in while traced.
        m.apply(&ev(PARENT, VmKind::Mmap, 0x100000, 64 * PAGE, 0x20, 1));
        for i in 0..64 {
            fault(&mut m, PARENT, 0x100000 + i * PAGE, PF_WRITE, 1);
        }
        m.fork(PARENT, CHILD, 0);
        // The child's collection writes 40 of them, one twice (a later fault on its
        // copy), and one page of memory the parent had before tracing.
        for i in 0..40 {
            fault(&mut m, CHILD, 0x100000 + i * PAGE, PRESENT_WRITE, 9);
        }
        fault(&mut m, CHILD, 0x100000, PRESENT_WRITE, 9);
        fault(&mut m, CHILD, 0x900000, PRESENT_WRITE, 9);
        assert_eq!(m.cow_stacks[&(CHILD, 9)], 41);
        assert_eq!(m.cow_stacks.values().sum::<u64>(), 41);
        assert_eq!(pages_at(&m, CHILD, 9), 0, "copies are not new pages");
        assert!(m.procs[&CHILD].pages.is_empty());
        // A read, and a write to a page absent in the child, are its own new pages.
        fault(&mut m, CHILD, 0x100000 + 50 * PAGE, PF_WRITE, 9);
        assert_eq!(pages_at(&m, CHILD, 9), 1);
        // The parent's own writes after the fork are never copies of its child's.
        fault(&mut m, PARENT, 0x100000 + 60 * PAGE, PRESENT_WRITE, 1);
        fault(&mut m, PARENT, 0x900000 + PAGE, PRESENT_WRITE, 1);
        assert!(!m.cow_stacks.contains_key(&(PARENT, 1)));
        // Unmapping copies releases them.
        m.apply(&ev(CHILD, VmKind::Munmap, 0x100000, 10 * PAGE, 0, 9));
        assert_eq!(m.procs[&CHILD].inherited.copied.len(), 31);
    }

    #[test]
    fn a_retired_child_leaves_no_copies_behind() {
        let mut m = VmModel::default();
        m.apply(&ev(PARENT, VmKind::Mmap, 0x100000, 8 * PAGE, 0x20, 1));
        for i in 0..8 {
            fault(&mut m, PARENT, 0x100000 + i * PAGE, PF_WRITE, 1);
        }
        m.fork(PARENT, CHILD, 0);
        for i in 0..8 {
            fault(&mut m, CHILD, 0x100000 + i * PAGE, PRESENT_WRITE, 9);
        }
        fault(&mut m, CHILD, 0x200000, PF_WRITE, 9);
        assert_eq!(m.cow_stacks[&(CHILD, 9)], 8);
        m.forget(&[CHILD].into_iter().collect());
        assert!(m.cow_stacks.is_empty());
        assert!(!m.procs.contains_key(&CHILD));
        assert!(m.stacks.keys().all(|&(pid, _, _)| pid != CHILD));
        assert!(m.bulk_pending.iter().all(|f| f.pid != CHILD));
        // The parent keeps what it has.
        assert_eq!(pages_at(&m, PARENT, 1), 8);
    }

    #[test]
    fn what_the_child_maps_itself_and_shared_memory_are_not_copies() {
        let mut m = VmModel::default();
        m.fork(PARENT, CHILD, 0);
        // Its own mapping, read (the zero page) and then written: a new page of its own.
        m.apply(&ev(CHILD, VmKind::Mmap, 0x200000, 4 * PAGE, 0x20, 3));
        fault(&mut m, CHILD, 0x200000, 0, 3);
        fault(&mut m, CHILD, 0x200000, PRESENT_WRITE, 3);
        assert_eq!(pages_at(&m, CHILD, 3), 1);
        // A shared mapping it inherited: a write there copies nothing.
        m.procs.get_mut(&CHILD).unwrap().inherited.shared = vec![(0x300000, 0x310000)];
        fault(&mut m, CHILD, 0x300000, PRESENT_WRITE, 4);
        assert!(m.cow_stacks.is_empty());
        // After an exec its memory is its own: a write to a present page is no copy.
        m.apply(&ev(CHILD, VmKind::Exec, 0, 0, 0, 0));
        fault(&mut m, CHILD, 0x400000, PRESENT_WRITE, 5);
        assert!(m.cow_stacks.is_empty());
    }

    #[test]
    fn a_parents_writes_after_its_fork_to_pages_it_had_are_no_new_pages() {
        let mut m = VmModel::default();
        m.fork(PARENT, CHILD, 0);
        // Memory it had before pyleak attached, written after the fork.
        fault(&mut m, PARENT, 0x900000, PRESENT_WRITE, 1);
        assert_eq!(pages_at(&m, PARENT, 1), 0);
        assert!(m.cow_stacks.is_empty());
        // A page it never had is new.
        fault(&mut m, PARENT, 0x901000, PF_WRITE, 1);
        assert_eq!(pages_at(&m, PARENT, 1), 1);
        // After an exec its memory is new: a process that never forked counts it.
        m.apply(&ev(PARENT, VmKind::Exec, 0, 0, 0, 0));
        fault(&mut m, PARENT, 0x902000, PRESENT_WRITE, 1);
        assert_eq!(pages_at(&m, PARENT, 1), 2);
    }

    #[test]
    fn a_child_sharing_its_parents_memory_copies_nothing() {
        let mut m = VmModel::default();
        m.fork(PARENT, CHILD, CLONE_VM | 0x4000);
        fault(&mut m, CHILD, 0x100000, PRESENT_WRITE, 9);
        assert!(m.cow_stacks.is_empty());
        assert_eq!(pages_at(&m, CHILD, 9), 1);
    }

    #[test]
    fn shared_mappings_from_proc_maps() {
        let maps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n\
7f0000240000-7f0000340000 rw-s 00000000 00:01 5 /dev/zero (deleted)\n\
7f0000340000-7f0000440000 r--s 00000000 08:01 7 /dev/shm/sem.mp-1\n";
        assert_eq!(
            shared_mappings(maps),
            vec![
                (0x7f0000240000, 0x7f0000340000),
                (0x7f0000340000, 0x7f0000440000)
            ]
        );
    }
}
