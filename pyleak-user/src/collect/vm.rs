//! The vm and pages layers in userspace: an exact model of each traced process's mappings
//! and resident pages, fed by the kernel's events in order. Partial unmaps split mappings,
//! `mremap` moves them with their pages, the break grows and shrinks the heap, and a page
//! counts once from its first fault until it is unmapped (or dropped by `madvise`).

use std::collections::{BTreeMap, HashMap, HashSet};

use hdrhistogram::Histogram;
use pyleak_common::{
    Layer, StackAgg, VmEvent, VmKind, FLAG_FOR_LIBC, FLAG_FOR_PYMALLOC, FLAG_FOR_PYMEM_RAW,
};

use super::cow::CowFault;

/// Page size.
pub const PAGE: u64 = 4096;
/// x86 page fault error code: the page was present (a protection fault).
pub(super) const PF_PRESENT: u64 = 1;
/// x86 page fault error code: a write.
pub(super) const PF_WRITE: u64 = 2;
/// `MAP_ANONYMOUS`.
const MAP_ANONYMOUS: u64 = 0x20;
/// End of user space on x86_64 (47-bit addresses).
const USER_END: u64 = 1 << 47;

/// One mapping (or a piece of one) made while tracing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// End address (exclusive).
    pub end: u64,
    /// Stack of the call that made it.
    pub stack_id: u64,
    /// `FLAG_*` bits: made on behalf of an upper layer.
    pub flags: u32,
    /// When it was made.
    pub ts_ns: u64,
    /// How it was made.
    pub origin: Origin,
    /// Its length when it was made (an arena is mapped whole).
    pub made_len: u64,
    /// What `mmap` was asked for: `prot << 32 | flags` (0 for the break).
    pub map_arg: u64,
}

/// How a mapping came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An anonymous `mmap` (or the growth of one by `mremap`).
    Anonymous,
    /// A file `mmap`.
    File,
    /// The program break moved up.
    Brk,
}

/// What a mapping holds, as far as pyleak can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MappingKind {
    /// A pymalloc arena: an anonymous mapping of one arena's size made by pymalloc itself.
    PymallocArena,
    /// malloc's main heap (the break).
    MallocHeap,
    /// The heaps of malloc's other arenas (threads' arenas): reserved by glibc's
    /// `new_heap` as `HEAP_MAX_SIZE`-aligned, `PROT_NONE`, `MAP_NORESERVE` mappings and
    /// made accessible as they grow.
    MallocArena,
    /// Mappings malloc made for big blocks (its `mmap` threshold and above).
    MallocMmap,
    /// A file mapping.
    File,
    /// A thread's stack.
    Stack,
    /// Any other anonymous memory.
    Anonymous,
}

impl MappingKind {
    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            MappingKind::PymallocArena => "pymalloc_arena",
            MappingKind::MallocHeap => "malloc_heap",
            MappingKind::MallocArena => "malloc_arena",
            MappingKind::MallocMmap => "malloc_mmap",
            MappingKind::File => "file",
            MappingKind::Stack => "stack",
            MappingKind::Anonymous => "anonymous",
        }
    }
}

/// pymalloc's arena sizes: 256 KiB before CPython 3.10, 1 MiB from 3.10 (64-bit).
pub const ARENA_SIZES: [u64; 2] = [256 << 10, 1 << 20];

/// glibc's `HEAP_MAX_SIZE` on 64-bit: `2 * DEFAULT_MMAP_THRESHOLD_MAX` = 64 MiB
/// (`malloc/arena.c`, `malloc/malloc.c`). `new_heap` maps twice that and unmaps the
/// unaligned ends, or maps one heap at the last heap's end.
pub const MALLOC_HEAP_MAX: u64 = 64 << 20;
/// `PROT_NONE` is 0; prot sits in the high half of [`Region::map_arg`].
const PROT_MASK: u64 = 0xffff_ffff << 32;
/// `MAP_FIXED`.
const MAP_FIXED: u64 = 0x10;
/// `MAP_NORESERVE`.
const MAP_NORESERVE: u64 = 0x4000;
/// `MAP_STACK`: glibc's `allocate_stack` maps each thread's stack with it (and keeps
/// exited threads' stacks in a cache for the next thread).
const MAP_STACK: u64 = 0x20000;

impl Region {
    /// Whether this is a heap of one of malloc's thread arenas: an anonymous
    /// `PROT_NONE | MAP_NORESERVE` reservation of one or two `HEAP_MAX_SIZE` (glibc's
    /// `alloc_new_heap`), or a `MAP_FIXED` `PROT_NONE` piece laid over one when it shrinks
    /// (`shrink_heap`). glibc makes the first heap of a thread's arena inside the thread's
    /// first `free` or `malloc` call, so the mapping's shape is what tells, not the call.
    fn is_malloc_heap_reservation(&self) -> bool {
        let noreserve_none = self.map_arg & PROT_MASK == 0 && self.map_arg & MAP_NORESERVE != 0;
        noreserve_none
            && (self.made_len == MALLOC_HEAP_MAX
                || self.made_len == 2 * MALLOC_HEAP_MAX
                || self.map_arg & MAP_FIXED != 0)
    }

    /// What the mapping holds, when pyleak saw it made.
    pub fn kind(&self) -> MappingKind {
        let for_python = self.flags & (FLAG_FOR_PYMALLOC | FLAG_FOR_PYMEM_RAW) != 0;
        match self.origin {
            Origin::Brk => MappingKind::MallocHeap,
            Origin::File => MappingKind::File,
            Origin::Anonymous if self.is_malloc_heap_reservation() => MappingKind::MallocArena,
            Origin::Anonymous if self.map_arg & MAP_STACK != 0 => MappingKind::Stack,
            Origin::Anonymous
                if self.flags == FLAG_FOR_PYMALLOC && ARENA_SIZES.contains(&self.made_len) =>
            {
                MappingKind::PymallocArena
            }
            // Where pymalloc is not probed (or inlined by LTO), an anonymous mapping of
            // exactly an arena's size made outside malloc is taken for one.
            Origin::Anonymous if self.flags == 0 && ARENA_SIZES.contains(&self.made_len) => {
                MappingKind::PymallocArena
            }
            Origin::Anonymous if self.flags & FLAG_FOR_LIBC != 0 => MappingKind::MallocMmap,
            // pymalloc's big requests go through malloc; without the libc layer probed
            // the mmap under them is pymalloc's on-behalf mapping of another size.
            Origin::Anonymous if for_python => MappingKind::MallocMmap,
            Origin::Anonymous => MappingKind::Anonymous,
        }
    }
}

/// A page faulted in while tracing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// Stack of the faulting thread.
    pub stack_id: u64,
    /// When it was faulted in.
    pub ts_ns: u64,
    /// Mapped by the kernel along with another page's fault (fault-around on a file
    /// mapping, a transparent huge page), found by a later pass (`collect::bulk`).
    pub bulk: bool,
}

/// One process's mappings and pages.
#[derive(Debug, Default)]
pub struct ProcVm {
    /// Mappings by start address.
    pub regions: BTreeMap<u64, Region>,
    /// Resident pages by address.
    pub pages: BTreeMap<u64, Page>,
    /// The program break, when known.
    pub brk: Option<u64>,
    /// No more events count (interpreter shutting down, or exited).
    pub frozen: bool,
    /// When it froze (`bpf_ktime_get_ns`).
    pub frozen_ns: Option<u64>,
    /// Pages that became resident in mappings shaped like pymalloc arenas (anonymous,
    /// exactly an arena long) since the first sampling window opened: `[all, those
    /// faulted in while a window was open]`.
    /// The heap growth sampled pymalloc tracing measures its windows against.
    pub arena_pages: [u64; 2],
    /// Arena-shaped mappings the process had before tracing began (`[start, end)`): their
    /// pages not yet touched are heap growth too.
    pub earlier_arenas: Vec<(u64, u64)>,
    /// `arena_pages` by the stack of the faulting thread.
    pub arena_pages_by_stack: HashMap<u64, [u64; 2]>,
    /// A forked child's memory shared with its parent, and the pages it copied.
    pub inherited: super::cow::Inherited,
}

/// The arena-shaped mappings of a `/proc/PID/maps` text: anonymous (no path), private,
/// writable, exactly an `ARENA_SIZES` long.
fn earlier_arenas(maps: &str) -> Vec<(u64, u64)> {
    crate::proctext::maps(maps)
        .filter(|m| {
            m.path.is_empty()
                && m.perms.starts_with("rw")
                && m.perms.ends_with('p')
                && ARENA_SIZES.contains(&(m.end - m.start))
        })
        .map(|m| (m.start, m.end))
        .collect()
}

impl ProcVm {
    /// The mapping made while tracing that holds `addr`.
    pub fn region_at(&self, addr: u64) -> Option<&Region> {
        self.regions
            .range(..=addr)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| addr < r.end)
    }
}

/// Counters of one layer kept in userspace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Mappings made / pages faulted in.
    pub allocs: u64,
    /// Their bytes.
    pub alloc_bytes: u64,
    /// Unmap calls that released tracked bytes / pages released.
    pub frees: u64,
    /// Bytes released.
    pub freed_bytes: u64,
    /// Unmaps that released nothing tracked (mappings older than the recording).
    pub unmatched_frees: u64,
}

/// The vm and pages layers of every traced process.
pub struct VmModel {
    /// Per process.
    pub procs: HashMap<u32, ProcVm>,
    /// vm layer counters.
    pub vm: Totals,
    /// pages layer counters.
    pub pages: Totals,
    /// Per (pid, layer, stack) totals.
    pub stacks: HashMap<(u32, Layer, u64), StackAgg>,
    /// Sizes of mappings made.
    pub vm_sizes: Histogram<u64>,
    /// Events seen (for the status line).
    pub events: u64,
    /// Lifetimes of unmapped mappings, µs.
    pub vm_lifetimes: Histogram<u64>,
    /// Lifetimes of released pages, µs.
    pub page_lifetimes: Histogram<u64>,
    /// Faults whose neighbourhood the next bulk pass (`collect::bulk`) looks at.
    pub bulk_pending: Vec<BulkFault>,
    /// Pages made private by copy-on-write faults per (pid, stack of the faulting thread).
    /// Not in the pages layer: they are a one-off copy of the parent's memory.
    pub cow_stacks: HashMap<(u32, u64), u64>,
    /// Time of the event being applied.
    now_ns: u64,
}

/// A page fault that made a new page resident, in a mapping made while tracing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkFault {
    /// Process.
    pub pid: u32,
    /// The page's address.
    pub addr: u64,
    /// Stack of the faulting thread.
    pub stack_id: u64,
    /// When.
    pub ts_ns: u64,
}

impl Default for VmModel {
    fn default() -> Self {
        VmModel {
            procs: HashMap::new(),
            vm: Totals::default(),
            pages: Totals::default(),
            stacks: HashMap::new(),
            vm_sizes: Histogram::new(3).expect("3 significant figures is a valid precision"),
            events: 0,
            vm_lifetimes: Histogram::new(3).expect("3 significant figures is a valid precision"),
            page_lifetimes: Histogram::new(3).expect("3 significant figures is a valid precision"),
            bulk_pending: Vec::new(),
            cow_stacks: HashMap::new(),
            now_ns: 0,
        }
    }
}

impl VmModel {
    /// Drops everything kept per process for `pids` (retired processes): mappings and
    /// pages, per-stack totals, copy-on-write copies, faults awaiting their bulk pass.
    /// Nothing of a retired process may stay: with a worker pool's churn, copy-on-write
    /// counts alone grew ~1 800 entries a second (a 13 MB table at 250 s of the soak, 100
    /// MB by 1 940 s) while they were kept.
    pub fn forget(&mut self, pids: &HashSet<u32>) {
        self.procs.retain(|pid, _| !pids.contains(pid));
        self.stacks.retain(|(pid, _, _), _| !pids.contains(pid));
        self.cow_stacks.retain(|(pid, _), _| !pids.contains(pid));
        self.bulk_pending.retain(|f| !pids.contains(&f.pid));
    }

    /// Starts tracking a process whose break is `brk` (if known).
    pub fn add_process(&mut self, pid: u32, brk: Option<u64>) {
        let p = self.procs.entry(pid).or_default();
        if p.brk.is_none() {
            p.brk = brk;
        }
    }

    /// `child` was forked by `parent`: its program break (and the arenas it inherited) are
    /// its parent's until it changes them, and its memory is its parent's, shared
    /// copy-on-write (`collect::cow`), unless `clone_flags` (`clone(2)`'s) share it
    /// (`CLONE_VM`: a vfork, `posix_spawn`).
    pub fn fork(&mut self, parent: u32, child: u32, clone_flags: u64) {
        let (brk, arenas) = self
            .procs
            .get(&parent)
            .map(|p| (p.brk, p.earlier_arenas.clone()))
            .unwrap_or_default();
        let c = self.procs.entry(child).or_default();
        c.brk = brk;
        c.earlier_arenas = arenas;
        c.inherited = super::cow::Inherited::at_fork(child, clone_flags);
        if c.inherited.forked {
            self.procs.entry(parent).or_default().inherited.has_forked = true;
        }
    }

    /// Notes the arena-shaped mappings `pid` has now (anonymous, private, writable,
    /// exactly an arena long, from `/proc/PID/maps`), made before tracing began.
    pub fn note_earlier_arenas(&mut self, pid: u32) {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            return;
        };
        let p = self.procs.entry(pid).or_default();
        p.earlier_arenas = earlier_arenas(&maps);
    }

    /// Applies one event from the kernel.
    pub fn apply(&mut self, ev: &VmEvent) {
        self.events += 1;
        self.now_ns = ev.ts_ns;
        let proc = self.procs.entry(ev.tgid).or_default();
        if proc.frozen {
            return;
        }
        let kind = match ev.kind {
            0 => VmKind::Mmap,
            1 => VmKind::Munmap,
            2 => VmKind::Mremap,
            3 => VmKind::Brk,
            4 => VmKind::Fault,
            5 => VmKind::Madvise,
            6 => VmKind::Freeze,
            8 => VmKind::Exec,
            // New stacks are the Python resolver's business, forks the recorder's.
            _ => return,
        };
        match kind {
            VmKind::Mmap => {
                let len = round_up(ev.len);
                // MAP_FIXED over an existing mapping replaces it.
                self.unmap(ev.tgid, ev.addr, len, false);
                // arg: prot << 32 | flags.
                let origin = if ev.arg & MAP_ANONYMOUS != 0 {
                    Origin::Anonymous
                } else {
                    Origin::File
                };
                self.map(
                    ev.tgid,
                    ev.addr,
                    len,
                    ev.stack_id,
                    ev.flags,
                    ev.ts_ns,
                    origin,
                    ev.arg,
                );
            }
            VmKind::Munmap => {
                let released = self.unmap(ev.tgid, ev.addr, round_up(ev.len), true);
                if released == 0 {
                    self.vm.unmatched_frees += 1;
                }
            }
            VmKind::Mremap => self.mremap(ev),
            VmKind::Brk if ev.addr == 0 => {
                // brk(0) asks for the break (a fresh program's first call, after exec):
                // it says where the heap starts, and maps nothing.
                proc.brk = Some(ev.arg);
            }
            VmKind::Brk => {
                let new = ev.arg;
                let old = proc.brk;
                proc.brk = Some(new);
                match old {
                    Some(old) if new > old => self.map(
                        ev.tgid,
                        old,
                        round_up(new - old),
                        ev.stack_id,
                        ev.flags,
                        ev.ts_ns,
                        Origin::Brk,
                        0,
                    ),
                    Some(old) if new < old => {
                        self.unmap(ev.tgid, round_up(new), round_up(old) - round_up(new), true);
                    }
                    _ => {}
                }
            }
            VmKind::Fault => {
                let own = proc.pages.contains_key(&ev.addr) || proc.region_at(ev.addr).is_some();
                match proc.inherited.fault(ev.addr, ev.arg, own) {
                    CowFault::Copy => {
                        *self.cow_stacks.entry((ev.tgid, ev.stack_id)).or_default() += 1;
                        return;
                    }
                    CowFault::Again | CowFault::Had => return,
                    CowFault::No => {}
                }
                // A read of a never-written page of anonymous memory maps the shared zero
                // page: nothing becomes resident until the write that follows.
                let read_of_absent = ev.arg & (PF_PRESENT | PF_WRITE) == 0;
                if read_of_absent
                    && proc
                        .region_at(ev.addr)
                        .is_some_and(|r| r.origin != Origin::File)
                {
                    return;
                }
                let arena = match proc.region_at(ev.addr) {
                    Some(r) => r.origin == Origin::Anonymous && ARENA_SIZES.contains(&r.made_len),
                    None => proc
                        .earlier_arenas
                        .iter()
                        .any(|&(s, e)| (s..e).contains(&ev.addr)),
                };
                if let std::collections::btree_map::Entry::Vacant(v) = proc.pages.entry(ev.addr) {
                    if arena && ev.flags & pyleak_common::FLAG_SAMPLING != 0 {
                        let inside = u64::from(ev.flags & pyleak_common::FLAG_IN_WINDOW != 0);
                        proc.arena_pages[0] += 1;
                        proc.arena_pages[1] += inside;
                        let by = proc.arena_pages_by_stack.entry(ev.stack_id).or_default();
                        by[0] += 1;
                        by[1] += inside;
                    }
                    v.insert(Page {
                        stack_id: ev.stack_id,
                        ts_ns: ev.ts_ns,
                        bulk: false,
                    });
                    // The kernel may have mapped its neighbours with it: a later pass
                    // looks (only in mappings made while tracing, whose every resident
                    // page is the recording's).
                    if proc.region_at(ev.addr).is_some() {
                        self.bulk_pending.push(BulkFault {
                            pid: ev.tgid,
                            addr: ev.addr,
                            stack_id: ev.stack_id,
                            ts_ns: ev.ts_ns,
                        });
                    }
                    self.pages.allocs += 1;
                    self.pages.alloc_bytes += PAGE;
                    let a = self
                        .stacks
                        .entry((ev.tgid, Layer::Pages, ev.stack_id))
                        .or_default();
                    a.allocs += 1;
                    a.alloc_bytes += PAGE;
                }
            }
            VmKind::Madvise => self.drop_pages(ev.tgid, ev.addr, round_up(ev.len)),
            VmKind::Freeze => {
                proc.frozen = true;
                proc.frozen_ns = Some(ev.ts_ns);
            }
            VmKind::Exec => {
                // The old program's address space is gone with it: its mappings and pages
                // were released, not leaked; the new program's break is learnt afresh, and
                // its memory is its own.
                proc.brk = None;
                proc.inherited.exec();
                self.unmap(ev.tgid, 0, USER_END, false);
            }
            VmKind::NewStack | VmKind::Fork => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn map(
        &mut self,
        pid: u32,
        start: u64,
        len: u64,
        stack_id: u64,
        flags: u32,
        ts_ns: u64,
        origin: Origin,
        map_arg: u64,
    ) {
        if len == 0 {
            return;
        }
        let proc = self.procs.entry(pid).or_default();
        proc.regions.insert(
            start,
            Region {
                end: start + len,
                stack_id,
                flags,
                ts_ns,
                origin,
                made_len: len,
                map_arg,
            },
        );
        self.vm.allocs += 1;
        self.vm.alloc_bytes += len;
        let _ = self.vm_sizes.record(len);
        let a = self.stacks.entry((pid, Layer::Vm, stack_id)).or_default();
        a.allocs += 1;
        a.alloc_bytes += len;
    }

    /// Removes `[start, start+len)` from the mappings (splitting partly covered ones) and
    /// from the pages; returns the mapped bytes released.
    fn unmap(&mut self, pid: u32, start: u64, len: u64, count_call: bool) -> u64 {
        let end = start.saturating_add(len);
        let proc = self.procs.entry(pid).or_default();
        proc.earlier_arenas.retain(|&(s, e)| e <= start || s >= end);
        let cut = cut_range(&mut proc.regions, start, end);
        let mut released = 0;
        for (piece_start, r) in &cut {
            let bytes = r.end - piece_start;
            released += bytes;
            let a = self.stacks.entry((pid, Layer::Vm, r.stack_id)).or_default();
            a.freed_bytes += bytes;
            a.frees += 1;
            let _ = self
                .vm_lifetimes
                .record(self.now_ns.saturating_sub(r.ts_ns) / 1000);
        }
        if released > 0 && count_call {
            self.vm.frees += 1;
        }
        self.vm.freed_bytes += released;
        self.drop_pages(pid, start, len);
        released
    }

    fn drop_pages(&mut self, pid: u32, start: u64, len: u64) {
        let end = start.saturating_add(len);
        // A fault whose pages are gone has no neighbours left to count: whatever is
        // mapped there by the next pass (a new mapping at the same address) is not its.
        self.bulk_pending
            .retain(|f| f.pid != pid || f.addr < start || f.addr >= end);
        let proc = self.procs.entry(pid).or_default();
        proc.inherited.drop_range(start, end);
        let gone: Vec<(u64, Page)> = proc
            .pages
            .range(start..end)
            .map(|(&a, &p)| (a, p))
            .collect();
        for (addr, page) in gone {
            proc.pages.remove(&addr);
            let _ = self
                .page_lifetimes
                .record(self.now_ns.saturating_sub(page.ts_ns) / 1000);
            self.pages.frees += 1;
            self.pages.freed_bytes += PAGE;
            let a = self
                .stacks
                .entry((pid, Layer::Pages, page.stack_id))
                .or_default();
            a.frees += 1;
            a.freed_bytes += PAGE;
        }
    }

    fn mremap(&mut self, ev: &VmEvent) {
        let (old, old_len, new_len, new) = (ev.addr, round_up(ev.len), round_up(ev.arg), ev.arg2);
        // Growth is of the same kind as the mapping grown.
        let (origin, map_arg) = self
            .procs
            .get(&ev.tgid)
            .and_then(|p| p.region_at(old))
            .map_or((Origin::Anonymous, 0), |r| (r.origin, r.map_arg));
        if new == old {
            if new_len < old_len {
                self.unmap(ev.tgid, old + new_len, old_len - new_len, true);
            } else if new_len > old_len {
                self.map(
                    ev.tgid,
                    old + old_len,
                    new_len - old_len,
                    ev.stack_id,
                    ev.flags,
                    ev.ts_ns,
                    origin,
                    map_arg,
                );
            }
            return;
        }
        // Moved: the mapping and its resident pages go along, keeping their stacks.
        let proc = self.procs.entry(ev.tgid).or_default();
        let keep = old_len.min(new_len);
        let moved = cut_range(&mut proc.regions, old, old + keep);
        for (piece_start, r) in moved {
            let shifted = Region {
                end: r.end - old + new,
                ..r
            };
            proc.regions.insert(piece_start - old + new, shifted);
        }
        let pages: Vec<(u64, Page)> = proc
            .pages
            .range(old..old + keep)
            .map(|(&a, &p)| (a, p))
            .collect();
        for (addr, page) in pages {
            proc.pages.remove(&addr);
            proc.pages.insert(addr - old + new, page);
        }
        proc.inherited.moved(old, keep, new);
        if old_len > new_len {
            self.unmap(ev.tgid, old + keep, old_len - keep, true);
        } else {
            // What was left behind of a shrinking move is unmapped by the kernel too.
            self.unmap(ev.tgid, old, old_len, false);
        }
        if new_len > old_len {
            self.map(
                ev.tgid,
                new + old_len,
                new_len - old_len,
                ev.stack_id,
                ev.flags,
                ev.ts_ns,
                origin,
                map_arg,
            );
        }
    }

    /// Live mapped bytes and mapping count of a process, per stack.
    pub fn live_regions(&self) -> HashMap<(u32, u64), (u64, u64)> {
        let mut out: HashMap<(u32, u64), (u64, u64)> = HashMap::new();
        for (&pid, p) in &self.procs {
            for (&start, r) in &p.regions {
                let e = out.entry((pid, r.stack_id)).or_default();
                e.0 += r.end - start;
                e.1 += 1;
            }
        }
        out
    }

    /// Live (resident) page bytes and page count of a process, per stack.
    pub fn live_pages(&self) -> HashMap<(u32, u64), (u64, u64)> {
        let mut out: HashMap<(u32, u64), (u64, u64)> = HashMap::new();
        for (&pid, p) in &self.procs {
            for page in p.pages.values() {
                let e = out.entry((pid, page.stack_id)).or_default();
                e.0 += PAGE;
                e.1 += 1;
            }
        }
        out
    }
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

/// Removes `[start, end)` from `regions`, splitting the ones that straddle its edges, and
/// returns the removed pieces (start, region-with-its-new-end).
fn cut_range(regions: &mut BTreeMap<u64, Region>, start: u64, end: u64) -> Vec<(u64, Region)> {
    let mut removed = Vec::new();
    // The region starting before `start` may overlap it.
    let first = regions.range(..start).next_back().map(|(&s, &r)| (s, r));
    if let Some((s, r)) = first {
        if r.end > start {
            regions.insert(s, Region { end: start, ..r });
            if r.end > end {
                regions.insert(end, r);
                removed.push((start, Region { end, ..r }));
                return removed;
            }
            removed.push((start, r));
        }
    }
    let inside: Vec<(u64, Region)> = regions.range(start..end).map(|(&s, &r)| (s, r)).collect();
    for (s, r) in inside {
        regions.remove(&s);
        if r.end > end {
            regions.insert(end, r);
            removed.push((s, Region { end, ..r }));
        } else {
            removed.push((s, r));
        }
    }
    removed
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
