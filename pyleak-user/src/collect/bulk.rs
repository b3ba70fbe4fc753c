//! Pages the kernel maps in bulk: a read fault on a file mapping maps the neighbouring
//! pages already in the page cache too (fault-around, `fault_around_bytes`: 64 KiB by
//! default, `mm/memory.c` `do_fault_around`), and a fault in an anonymous range a
//! transparent huge page can back maps 2 MiB at once (`do_huge_pmd_anonymous_page`). The
//! fault tracepoint fires once for all of them; a later pass reads the faulting range's
//! page table entries (`/proc/PID/pagemap`, and `/proc/kpageflags` to tell a huge page)
//! and counts each page it finds resident, and not counted yet, for the fault's stack.
//! Only mappings made while tracing are looked at: every page resident in them is the
//! recording's. Nothing of the target is written.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    os::unix::fs::FileExt,
};

use pyleak_common::Layer;

use super::vm::{BulkFault, Origin, Page, VmModel, PAGE};

/// Pages of a transparent huge page on x86_64 (a PMD: 2 MiB): the most one fault maps,
/// in anonymous memory or in a file whose page cache holds a PMD-sized folio (fault-around
/// maps `fault_around_bytes`, 64 KiB, of smaller ones).
pub const HUGE_PAGES: u64 = 512;
/// The fault tracepoint fires as the fault begins: a fault younger than this (ns) may still
/// be zeroing or reading its pages in, and waits for the next pass.
pub const SETTLE_NS: u64 = 20_000_000;
/// pagemap: the page is present (`Documentation/admin-guide/mm/pagemap.rst`).
const PM_PRESENT: u64 = 1 << 63;
/// pagemap: bits 0-54 are the page frame number (zero without CAP_SYS_ADMIN).
const PM_PFN_MASK: u64 = (1 << 55) - 1;
/// kpageflags: `KPF_THP` (`include/uapi/linux/kernel-page-flags.h`).
const KPF_THP: u64 = 1 << 22;
/// kpageflags: `KPF_ZERO_PAGE` (the shared zero page, or the huge zero page).
const KPF_ZERO_PAGE: u64 = 1 << 24;

/// Where page table entries and page flags are read from.
pub trait PageTable {
    /// The pagemap entries of `pages` pages of `pid` from `start`; `None` when unreadable.
    fn entries(&mut self, pid: u32, start: u64, pages: u64) -> Option<Vec<u64>>;
    /// The kpageflags of a page frame; `None` when unreadable.
    fn flags(&mut self, pfn: u64) -> Option<u64>;
}

/// The real page tables: `/proc/PID/pagemap` and `/proc/kpageflags` (root).
#[derive(Default)]
pub struct ProcPageTable {
    pagemaps: HashMap<u32, Option<File>>,
    kpageflags: Option<Option<File>>,
}

impl PageTable for ProcPageTable {
    fn entries(&mut self, pid: u32, start: u64, pages: u64) -> Option<Vec<u64>> {
        let f = self
            .pagemaps
            .entry(pid)
            .or_insert_with(|| File::open(format!("/proc/{pid}/pagemap")).ok())
            .as_ref()?;
        let mut buf = vec![0u8; (pages * 8) as usize];
        f.read_exact_at(&mut buf, start / PAGE * 8).ok()?;
        Some(
            buf.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8-byte chunks")))
                .collect(),
        )
    }

    fn flags(&mut self, pfn: u64) -> Option<u64> {
        let f = self
            .kpageflags
            .get_or_insert_with(|| File::open("/proc/kpageflags").ok())
            .as_ref()?;
        let mut buf = [0u8; 8];
        f.read_exact_at(&mut buf, pfn * 8).ok()?;
        Some(u64::from_le_bytes(buf))
    }
}

impl ProcPageTable {
    /// Forgets a process's pagemap (it exited, or exec'd a new program).
    pub fn forget(&mut self, pid: u32) {
        self.pagemaps.remove(&pid);
    }
}

/// Looks around each fault since the last pass and counts the pages the kernel mapped
/// with it; returns how many it found. With `now_ns` (`CLOCK_MONOTONIC`), faults younger
/// than [`SETTLE_NS`] wait for a later pass; without, every fault is looked at (the last
/// pass, once the targets are frozen).
pub fn pass(model: &mut VmModel, pt: &mut impl PageTable, now_ns: Option<u64>) -> u64 {
    let (pending, young): (Vec<BulkFault>, Vec<BulkFault>) =
        std::mem::take(&mut model.bulk_pending)
            .into_iter()
            .partition(|f| now_ns.is_none_or(|now| f.ts_ns + SETTLE_NS <= now));
    model.bulk_pending = young;
    let mut looked: HashSet<(u32, u64)> = HashSet::new();
    let mut found = 0;
    for f in pending {
        let Some((start, end)) = window(model, &f) else {
            continue;
        };
        if !looked.insert((f.pid, start)) {
            continue;
        }
        let Some(entries) = pt.entries(f.pid, start, (end - start) / PAGE) else {
            continue;
        };
        let file = model.procs[&f.pid]
            .region_at(f.addr)
            .is_some_and(|r| r.origin == Origin::File);
        let resident: Vec<u64> = if file {
            (0..entries.len() as u64)
                .filter(|&i| entries[i as usize] & PM_PRESENT != 0)
                .map(|i| start + i * PAGE)
                .collect()
        } else if is_huge_page(&entries, pt) {
            (0..entries.len() as u64)
                .map(|i| start + i * PAGE)
                .collect()
        } else {
            Vec::new()
        };
        for addr in resident {
            found += u64::from(model.add_bulk_page(f.pid, addr, &f));
        }
    }
    found
}

/// The range a fault's neighbours may have been mapped in: the huge page's range around
/// it, within the mapping for a file, wholly inside it for anonymous memory (a THP needs
/// the whole range); `None` when there is none.
fn window(model: &VmModel, f: &BulkFault) -> Option<(u64, u64)> {
    let p = model.procs.get(&f.pid)?;
    let (&rstart, r) = p.regions.range(..=f.addr).next_back()?;
    if f.addr >= r.end {
        return None;
    }
    let file = r.origin == Origin::File;
    let span = HUGE_PAGES * PAGE;
    let (start, end) = (f.addr & !(span - 1), (f.addr & !(span - 1)) + span);
    if file {
        Some((start.max(rstart), end.min(r.end)))
    } else {
        (start >= rstart && end <= r.end).then_some((start, end))
    }
}

/// Whether entries of one huge page's range are one transparent huge page: all present,
/// frame numbers in a row, the first a THP's and not the huge zero page.
fn is_huge_page(entries: &[u64], pt: &mut impl PageTable) -> bool {
    if entries.len() as u64 != HUGE_PAGES || entries.iter().any(|e| e & PM_PRESENT == 0) {
        return false;
    }
    let first = entries[0] & PM_PFN_MASK;
    if first == 0
        || !entries
            .iter()
            .enumerate()
            .all(|(i, e)| e & PM_PFN_MASK == first + i as u64)
    {
        return false;
    }
    pt.flags(first)
        .is_some_and(|fl| fl & KPF_THP != 0 && fl & KPF_ZERO_PAGE == 0)
}

impl VmModel {
    /// Counts a page the kernel mapped along with fault `f`'s, unless already counted.
    fn add_bulk_page(&mut self, pid: u32, addr: u64, f: &BulkFault) -> bool {
        let Some(p) = self.procs.get_mut(&pid) else {
            return false;
        };
        // Faults after the freeze were never counted, nor are their neighbours.
        if p.frozen_ns.is_some_and(|t| f.ts_ns > t) || p.pages.contains_key(&addr) {
            return false;
        }
        p.pages.insert(
            addr,
            Page {
                stack_id: f.stack_id,
                ts_ns: f.ts_ns,
                bulk: true,
            },
        );
        self.pages.allocs += 1;
        self.pages.alloc_bytes += PAGE;
        let a = self
            .stacks
            .entry((pid, Layer::Pages, f.stack_id))
            .or_default();
        a.allocs += 1;
        a.alloc_bytes += PAGE;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pyleak_common::{VmEvent, VmKind};

    /// A fake page table: every page of `present` resident, frames from `pfn0` in a row.
    struct Fake {
        present: Vec<(u64, u64)>,
        pfn0: u64,
        flags: u64,
    }

    impl PageTable for Fake {
        fn entries(&mut self, _pid: u32, start: u64, pages: u64) -> Option<Vec<u64>> {
            Some(
                (0..pages)
                    .map(|i| {
                        let a = start + i * PAGE;
                        if self.present.iter().any(|&(s, e)| (s..e).contains(&a)) {
                            PM_PRESENT | (self.pfn0 + (a - self.present[0].0) / PAGE)
                        } else {
                            0
                        }
                    })
                    .collect(),
            )
        }
        fn flags(&mut self, _pfn: u64) -> Option<u64> {
            Some(self.flags)
        }
    }

    fn ev(kind: VmKind, addr: u64, len: u64, arg: u64, stack: u64) -> VmEvent {
        VmEvent {
            kind: kind as u32,
            tgid: 1,
            addr,
            len,
            arg,
            arg2: 0,
            stack_id: stack,
            ts_ns: 0,
            flags: 0,
            tid: 1,
        }
    }

    #[test]
    fn fault_around_on_a_file_mapping_counts_the_pages_it_mapped() {
        let mut m = VmModel::default();
        let base = 0x7000_0000_0000;
        // A 256 KiB shared file mapping; one read fault in its second 64 KiB.
        m.apply(&ev(VmKind::Mmap, base, 64 * PAGE, 0x1 << 32 | 0x1, 9));
        m.apply(&ev(VmKind::Fault, base + 20 * PAGE, PAGE, 0, 5));
        assert_eq!(m.pages.allocs, 1);
        let mut pt = Fake {
            present: vec![],
            pfn0: 1000,
            flags: 0,
        };
        // Fault-around mapped its 64 KiB window; the rest of the file is not resident.
        pt.present = vec![(base + 16 * PAGE, base + 32 * PAGE)];
        // Too young to look at yet, then looked at.
        assert_eq!(pass(&mut m, &mut pt, Some(SETTLE_NS - 1)), 0);
        assert_eq!(m.bulk_pending.len(), 1);
        assert_eq!(pass(&mut m, &mut pt, Some(SETTLE_NS)), 15);
        assert_eq!(m.pages.allocs, 16);
        assert_eq!(m.stacks[&(1, Layer::Pages, 5)].alloc_bytes, 16 * PAGE);
        assert!(m.bulk_pending.is_empty());
        // Nothing counted twice: a real fault on a page already counted adds nothing.
        m.apply(&ev(VmKind::Fault, base + 21 * PAGE, PAGE, 0, 6));
        assert_eq!(m.pages.allocs, 16);
    }

    #[test]
    fn a_fault_in_a_mapping_unmapped_before_the_pass_counts_nothing_of_the_next_one() {
        // A 64 MiB buffer is faulted, freed, and a file mapped at the same address before
        // the pass: the file's pages are not the buffer's faults' neighbours.
        let mut m = VmModel::default();
        let base = 0x7000_0000_0000;
        m.apply(&ev(VmKind::Mmap, base, 64 * PAGE, 0x3 << 32 | 0x22, 9));
        m.apply(&ev(VmKind::Fault, base + 20 * PAGE, PAGE, 2, 5));
        m.apply(&ev(VmKind::Munmap, base, 64 * PAGE, 0, 9));
        m.apply(&ev(VmKind::Mmap, base, 64 * PAGE, 0x1 << 32 | 0x1, 7));
        let mut pt = Fake {
            present: vec![(base, base + 64 * PAGE)],
            pfn0: 1000,
            flags: 0,
        };
        assert_eq!(pass(&mut m, &mut pt, None), 0);
        assert_eq!(m.stacks[&(1, Layer::Pages, 5)].alloc_bytes, PAGE);
        assert_eq!(m.stacks[&(1, Layer::Pages, 5)].freed_bytes, PAGE);
    }

    #[test]
    fn a_transparent_huge_page_counts_512_pages_and_base_pages_count_one() {
        let mut m = VmModel::default();
        let base = 0x7000_0000_0000;
        let anon = 0x3 << 32 | 0x22;
        m.apply(&ev(VmKind::Mmap, base, 4 * HUGE_PAGES * PAGE, anon, 9));
        m.apply(&ev(VmKind::Fault, base + 3 * PAGE, PAGE, 2, 5));
        let huge = (base, base + HUGE_PAGES * PAGE);
        let mut thp = Fake {
            present: vec![huge],
            pfn0: 1 << 20,
            flags: KPF_THP,
        };
        assert_eq!(pass(&mut m, &mut thp, None), HUGE_PAGES - 1);
        assert_eq!(m.pages.allocs, HUGE_PAGES);
        // Base pages (not a THP, or the huge zero page): only the faulting page counts.
        for flags in [0, KPF_THP | KPF_ZERO_PAGE] {
            let mut m2 = VmModel::default();
            m2.apply(&ev(VmKind::Mmap, base, 4 * HUGE_PAGES * PAGE, anon, 9));
            m2.apply(&ev(VmKind::Fault, base + 3 * PAGE, PAGE, 2, 5));
            let mut pt = Fake {
                present: vec![huge],
                pfn0: 1 << 20,
                flags,
            };
            assert_eq!(pass(&mut m2, &mut pt, None), 0);
            assert_eq!(m2.pages.allocs, 1);
        }
    }
}
