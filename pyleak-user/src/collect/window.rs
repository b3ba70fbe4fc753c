//! Sampled pymalloc tracing (`--pymalloc sampled`): the pymalloc layer's uprobes are put in
//! for a short window now and then, as multi-uprobe links, and taken out again; between
//! windows nothing traps. What a window allocates and does not free stays in the live-block
//! table as a sample, and whether it is freed later is judged by reading the target's
//! memory ([`crate::python::heap`]), never trapped.
//!
//! Each window bumps a generation (`PYMALLOC_WINDOW[0]`) before its links go in and opens
//! (`[1] = 1`) once they are in; it closes (`[1] = 0`) before they are taken out, so only
//! the open interval counts. A call whose return probe left with its window's links is
//! recognised as stale by its generation. How much of the target's heap growth a window
//! saw is measured by the pages of arena-shaped mappings faulted in while it was open
//! ([`Recorder::progress`]): an allocation's chance of being sampled.

use std::{collections::HashMap, time::Instant};

use anyhow::Context as _;
use aya::{
    maps::{Array, HashMap as BpfHashMap},
    programs::uprobe::UProbeScope,
};
use pyleak_common::{names, AllocKey, Layer, LiveAlloc, ProbeCookie, WINDOW_CLOSING, WINDOW_OPEN};

use super::{table, Recorder};
use crate::{
    attach::{ProbeRole, ProbeSpec},
    multi_uprobe::MultiLink,
    python::heap::{
        estimate::{estimate, Design, LiveSample, StackEstimate},
        size_class, Fingerprint, Heap, Sample, Verdict, VmReader, NUM_CLASSES,
    },
};

/// Sampled blocks kept at most: past this, no window opens (the report says so).
pub const MAX_SAMPLES: usize = 200_000;

/// The windows' state, kept by the [`Recorder`] when pymalloc is sampled.
#[derive(Default)]
pub struct Windows {
    /// The pymalloc probes, with the process each is for (`None`: file-wide).
    probes: Vec<(ProbeSpec, Option<u32>)>,
    /// The links of the open window.
    pub(super) links: Vec<MultiLink>,
    /// The current generation (0 before the first window).
    generation: u32,
    /// When the open window opened.
    pub(super) opened: Option<Instant>,
    /// Seconds windows were open, in all.
    pub open_s: f64,
    /// Windows opened.
    pub count: u64,
    /// When the first window opened.
    first_opened: Option<Instant>,
    /// Whether the last window is closing (hand-overs still on, links still in).
    closing: bool,
    /// Seconds spent putting links in and taking them out (pyleak's time, not the
    /// target's).
    pub switch_s: f64,
}

/// One block of the pymalloc layer in the live-block table.
#[derive(Debug, Clone, Copy)]
pub struct TableBlock {
    /// Process id.
    pub pid: u32,
    /// Block address.
    pub addr: u64,
    /// What the kernel recorded.
    pub block: LiveAlloc,
    /// Where it is: `Some((slot, key))` in the table, `None` in the overflow map.
    at: Option<(usize, u64)>,
}

impl Windows {
    /// Keeps the pymalloc-layer probes of `probes` for windows (with the process they are
    /// for) and returns the others.
    pub fn keep<'a>(&mut self, probes: &'a [ProbeSpec], scope: UProbeScope) -> Vec<&'a ProbeSpec> {
        let pid = match scope {
            UProbeScope::OneProcess(pid) => Some(pid.get()),
            _ => None,
        };
        let mut rest = Vec::new();
        for p in probes {
            // Only allocator probes carry a layer in their cookie (a finalize, init or code probe's
            // cookie is something else: it must stay in all the time).
            if is_pymalloc_allocator(p) {
                self.probes.push((p.clone(), pid));
            } else {
                rest.push(p);
            }
        }
        rest
    }

    /// Whether a window is open.
    pub fn is_open(&self) -> bool {
        self.opened.is_some()
    }
}

impl Recorder {
    /// The share of time windows were open since the first one opened (0 < share ≤ 1):
    /// an upper bound on any allocation's chance of being sampled, as the traps only slow
    /// what a window sees. None before the first window.
    pub fn time_share(&self) -> Option<f64> {
        let w = self.windows.as_ref()?;
        let since = w.first_opened?.elapsed().as_secs_f64();
        let open = w.open_s + w.opened.map_or(0.0, |t| t.elapsed().as_secs_f64());
        (since > 0.0 && open > 0.0).then(|| (open / since).min(1.0))
    }

    /// Whether the pymalloc layer is sampled in windows.
    pub fn samples_pymalloc(&self) -> bool {
        self.windows.is_some()
    }

    /// The windows' state, when pymalloc is sampled.
    pub fn windows(&self) -> Option<&Windows> {
        self.windows.as_ref()
    }

    /// Sets `PYMALLOC_WINDOW[index]`.
    fn set_window_word(&mut self, index: u32, value: u32) -> anyhow::Result<()> {
        let mut w: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut(names::PYMALLOC_WINDOW).context(concat!(
                "map ",
                "PYMALLOC_WINDOW",
                " missing"
            ))?)?;
        w.set(index, value, 0)?;
        Ok(())
    }

    /// Opens a window: a new generation, the pymalloc probes in, then counting on.
    pub fn open_window(&mut self) -> anyhow::Result<()> {
        let Some(w) = self.windows.as_mut() else {
            return Ok(());
        };
        if w.opened.is_some() || w.probes.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let w = self.windows.as_mut().expect("checked above");
        w.generation = w.generation.wrapping_add(1).max(1);
        let generation = w.generation;
        self.set_window_word(0, generation)?;
        let w = self.windows.as_mut().expect("checked above");
        let probes = std::mem::take(&mut w.probes);
        let mut links = Vec::new();
        // One scope at a time (a link filters one process, or none).
        let mut scopes: Vec<Option<u32>> = probes.iter().map(|(_, pid)| *pid).collect();
        scopes.sort_unstable();
        scopes.dedup();
        let mut result = Ok(());
        for pid in scopes {
            let specs: Vec<ProbeSpec> = probes
                .iter()
                .filter(|(_, p)| *p == pid)
                .map(|(s, _)| s.clone())
                .collect();
            // A process that exited since: its probes go, the others stay.
            match self.link_probes(&specs, pid) {
                Ok(l) => links.extend(l),
                Err(e) if pid.is_some_and(|p| !alive(p)) => {
                    log::debug!("window: process {pid:?} gone: {e}")
                }
                Err(e) => result = Err(e),
            }
        }
        let w = self.windows.as_mut().expect("checked above");
        w.probes = probes
            .into_iter()
            .filter(|(_, pid)| pid.is_none_or(alive))
            .collect();
        w.links = links;
        w.switch_s += started.elapsed().as_secs_f64();
        result?;
        self.set_window_word(1, WINDOW_OPEN)?;
        let w = self.windows.as_mut().expect("checked above");
        let now = Instant::now();
        w.opened = Some(now);
        w.first_opened.get_or_insert(now);
        w.count += 1;
        Ok(())
    }

    /// Closes the open window, first step: allocations and frees stop counting, free-list
    /// hand-overs go on (`PYMALLOC_WINDOW[1] = 2`) until [`Recorder::end_closing`], called
    /// once [`Recorder::sweep`] has fingerprinted the window's samples: a block its code
    /// left on a type's free list as the window closed, taken by another stack before the
    /// sweep read it, goes to that stack instead of passing for the dropper's live object.
    pub fn close_window(&mut self) -> anyhow::Result<()> {
        if !self.windows.as_ref().is_some_and(Windows::is_open) {
            return Ok(());
        }
        self.set_window_word(1, WINDOW_CLOSING)?;
        let w = self.windows.as_mut().expect("checked above");
        if let Some(t) = w.opened.take() {
            w.open_s += t.elapsed().as_secs_f64();
        }
        w.closing = true;
        Ok(())
    }

    /// Closes the window, second step: hand-overs off, then its links taken out on another
    /// thread (each waits for a grace period; the probes do nothing meanwhile).
    pub fn end_closing(&mut self) -> anyhow::Result<()> {
        if !self.windows.as_ref().is_some_and(|w| w.closing) {
            return Ok(());
        }
        self.set_window_word(1, 0)?;
        let w = self.windows.as_mut().expect("checked above");
        w.closing = false;
        // Each link's release waits for grace periods, and the target runs slower until
        // they end: one after another, a window's three links took ~200 ms (~0.12 s of the
        // target's time per window, whatever its length); closed together, 30-90 ms (a
        // JSON loop: 1.27x -> 1.07x with the defaults). Dropping entry links first made no
        // difference.
        let links = std::mem::take(&mut w.links);
        std::thread::spawn(move || {
            let t = Instant::now();
            super::close_in_parallel(links);
            log::debug!(
                "window links taken out in {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        });
        Ok(())
    }

    /// Per traced process: (new resident pages in arena-shaped mappings, those faulted in
    /// while a window was open). A page of an arena is first written right after the
    /// allocation that carves it, on the allocating thread, so these pages are slowed with
    /// the allocations while a window is open and their share inside windows is the share
    /// of the heap's growth the windows saw; wall or CPU time would overstate it (CPU time
    /// by 4x in `bytes.py`, pyenv 3.12: a tick that falls in a trap is delivered as the
    /// trap returns to user mode), and libc events or page faults at large by 1.5x (a dict
    /// resize's faults come in bursts the traps do not slow).
    pub fn progress(&self) -> HashMap<u32, (u64, u64)> {
        self.model
            .procs
            .iter()
            .map(|(&pid, p)| (pid, (p.arena_pages[0], p.arena_pages[1])))
            .collect()
    }

    /// Every pymalloc-layer block in the live-block table and its overflow map.
    pub fn pymalloc_blocks(&self) -> anyhow::Result<Vec<TableBlock>> {
        let mut out = Vec::new();
        table::for_each_live_slot(
            self.ebpf
                .map(names::LIVE_KEYS)
                .context(concat!("map ", "LIVE_KEYS", " missing"))?,
            self.ebpf
                .map(names::LIVE_VALS)
                .context(concat!("map ", "LIVE_VALS", " missing"))?,
            |key, block, slot, raw| {
                if key.layer == Layer::Pymalloc as u32 {
                    out.push(TableBlock {
                        pid: key.tgid,
                        addr: key.addr,
                        block,
                        at: Some((slot, raw)),
                    });
                }
            },
        )?;
        let overflow: BpfHashMap<_, AllocKey, LiveAlloc> =
            BpfHashMap::try_from(self.ebpf.map(names::LIVE_ALLOCS).context(concat!(
                "map ",
                "LIVE_ALLOCS",
                " missing"
            ))?)?;
        for entry in overflow.iter() {
            let Ok((key, block)) = entry else { break };
            if key.layer == Layer::Pymalloc as u32 {
                out.push(TableBlock {
                    pid: key.tgid,
                    addr: key.addr,
                    block,
                    at: None,
                });
            }
        }
        Ok(out)
    }

    /// Removes blocks found freed from the live-block table (a compare-and-swap on the
    /// slot's key, so a slot a probe has claimed since stays). Returns how many went.
    pub fn forget_blocks(&mut self, blocks: &[TableBlock]) -> anyhow::Result<usize> {
        let slots: Vec<(usize, u64)> = blocks.iter().filter_map(|b| b.at).collect();
        let mut n = table::clear_slots(
            self.ebpf
                .map(names::LIVE_KEYS)
                .context(concat!("map ", "LIVE_KEYS", " missing"))?,
            &slots,
        )?;
        let mut overflow: BpfHashMap<_, AllocKey, LiveAlloc> =
            BpfHashMap::try_from(self.ebpf.map_mut(names::LIVE_ALLOCS).context(concat!(
                "map ",
                "LIVE_ALLOCS",
                " missing"
            ))?)?;
        for b in blocks.iter().filter(|b| b.at.is_none()) {
            let key = AllocKey {
                tgid: b.pid,
                layer: Layer::Pymalloc as u32,
                addr: b.addr,
            };
            if overflow.remove(&key).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Whether process `pid` still exists.
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// What pyleak knows of the blocks sampled so far, and their estimates.
#[derive(Default)]
pub struct SampleBook {
    /// (pid, address) → (allocation time the kernel recorded, the window it was sampled
    /// in, its fingerprint): a block at the same address with another time is a new one.
    known: HashMap<(u32, u64), Known>,
    /// A reader of each process's heap.
    heaps: HashMap<u32, Heap<VmReader>>,
    /// Samples found freed, reused by another object, or unreadable since they were taken.
    pub freed: u64,
    /// Samples found reused by another object.
    pub reused: u64,
    /// Samples that could not be read when their window closed (dropped).
    pub unreadable: u64,
    /// Live-sample estimates per (pid, stack id), as of the last sweep.
    pub estimates: HashMap<(u32, u64), StackEstimate>,
    /// Per pid: an allocation's chance of being sampled, as of the last sweep: the share
    /// of its arena page faults inside windows, at most the windows' share of time.
    pub duty: HashMap<u32, f64>,
    /// Pids whose `duty` is the windows' share of time: too few arena pages faulted in
    /// inside windows ([`MIN_FUNCTION_PAGES`]) to measure the heap's growth by.
    pub duty_from_time: std::collections::BTreeSet<u32>,
    /// Per pid: blocks in use per size class in its pools, as of its last sweep (see
    /// [`Heap::in_use_by_class`]): no estimate of a class may exceed it.
    in_use: HashMap<u32, [u64; NUM_CLASSES]>,
    /// Estimated live blocks the last estimate took off to stay within `in_use`.
    pub cut_to_pools: u64,
    /// Whether windows stopped because [`MAX_SAMPLES`] samples were kept.
    pub full: bool,
    /// The leaf Python function of each interned stack seen (see
    /// [`Recorder::function_of`]).
    functions: HashMap<u64, Option<u64>>,
}

/// A process and the leaf Python function (its code object's address) of a stack, if any.
type FunctionKey = (u32, Option<u64>);

/// Pages a Python function must have faulted in inside windows for its own share to weigh
/// its samples (fewer: its process's share).
pub const MIN_FUNCTION_PAGES: u64 = 20;

impl SampleBook {
    /// Samples known, heap readers, leaf functions cached (for the footprint line).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.known.len(), self.heaps.len(), self.functions.len())
    }

    /// Drops what is known of `pid`'s samples (a retired process).
    pub fn forget(&mut self, pid: u32) {
        self.known.retain(|&(p, _), _| p != pid);
        self.heaps.remove(&pid);
        self.in_use.remove(&pid);
        self.estimates.retain(|&(p, _), _| p != pid);
        self.duty.remove(&pid);
    }
}

struct Known {
    ts_ns: u64,
    window: u64,
    stack_id: u64,
    size: u64,
    fingerprint: Fingerprint,
    /// Found live by a judgement after the sweep that fingerprinted it. Only confirmed
    /// samples are estimated: that first sweep follows its window at once, while the code
    /// that made the sample is still at work, slowed by the traps (a block it frees and
    /// takes again for an equal object passes for the sample then), and when the
    /// recording ends before another judgement the sample says nothing about the end.
    confirmed: bool,
}

impl Recorder {
    /// Judges every sampled pymalloc block by reading its process's memory: blocks new
    /// since the last sweep are fingerprinted (call right after a window closes), known
    /// ones are judged, and those freed or reused leave the table. Then re-estimates live
    /// bytes per stack. Processes that are frozen (finalizing) or gone are left as they
    /// are.
    pub fn sweep(&mut self) -> anyhow::Result<()> {
        self.sweep_holding(None)
    }

    /// [`Recorder::sweep`], with `held` judged though the kernel froze it: a launched
    /// command stopped at its interpreter's shutdown by its tracer, its heap as it was
    /// before the interpreter's teardown (its frees since the freeze are not counted, and
    /// none is made while it is held).
    pub fn sweep_holding(&mut self, held: Option<u32>) -> anyhow::Result<()> {
        let Some(w) = self.windows.as_ref() else {
            return Ok(());
        };
        let sweep_started = Instant::now();
        let generation = u64::from(w.generation);
        let blocks = self.pymalloc_blocks()?;
        let pids: Vec<u32> = {
            let mut p: Vec<u32> = blocks.iter().map(|b| b.pid).collect();
            p.sort_unstable();
            p.dedup();
            p
        };
        let mut book = std::mem::take(&mut self.book);
        let mut dead: Vec<TableBlock> = Vec::new();
        let frozen = |rec: &Self, pid: u32| {
            held != Some(pid) && (rec.is_frozen(pid) || rec.frozen_in_kernel(pid))
        };
        for pid in pids {
            if frozen(self, pid) || !alive(pid) {
                continue;
            }
            let Some(cpython) = self
                .pythons
                .get(&pid)
                .and_then(|v| parse_version(v))
                .and_then(crate::python::versions::for_version)
            else {
                continue;
            };
            let heap = book
                .heaps
                .entry(pid)
                .or_insert_with(|| Heap::for_process(pid, cpython));
            // Requests above pymalloc's threshold are malloc's blocks, which the libc
            // layer counts exactly (with their Python stacks): a rare big block weighted by
            // a window's odds would only add noise, so they leave the sample.
            let (large, mine): (Vec<&TableBlock>, Vec<&TableBlock>) = blocks
                .iter()
                .filter(|b| b.pid == pid)
                .partition(|b| size_class(b.block.size).is_none());
            for b in large {
                book.known.remove(&(pid, b.addr));
                dead.push(*b);
            }
            let (old, new): (Vec<&TableBlock>, Vec<&TableBlock>) =
                mine.into_iter().partition(|b| {
                    book.known
                        .get(&(pid, b.addr))
                        .is_some_and(|k| k.ts_ns == b.block.ts_ns)
                });
            // New samples: what each holds now.
            let req: Vec<(u64, u64)> = new.iter().map(|b| (b.addr, b.block.size)).collect();
            for (b, fp) in new.iter().zip(heap.fingerprint(&req)) {
                match fp {
                    // Dropped already, on its type's free list: whoever takes it next
                    // is not this line (a window open then hands it over in the kernel).
                    Some(fingerprint) if fingerprint.dead => {
                        book.freed += 1;
                        dead.push(**b);
                    }
                    Some(fingerprint) => {
                        book.known.insert(
                            (pid, b.addr),
                            Known {
                                ts_ns: b.block.ts_ns,
                                window: generation,
                                stack_id: b.block.stack_id,
                                size: b.block.size,
                                fingerprint,
                                confirmed: false,
                            },
                        );
                    }
                    None => {
                        book.unreadable += 1;
                        dead.push(**b);
                    }
                }
            }
            // Known samples: still the block that was sampled?
            let samples: Vec<Sample> = old
                .iter()
                .map(|b| Sample {
                    addr: b.addr,
                    size: b.block.size,
                    fingerprint: book.known[&(pid, b.addr)].fingerprint.clone(),
                })
                .collect();
            let verdicts = heap.judge(&samples);
            let in_use = heap.in_use_by_class(&arena_regions(pid, heap.layout().arena_size));
            // Shutting down since (interpreter teardown frees everything): these
            // verdicts are not about the heap the report describes.
            if frozen(self, pid) {
                continue;
            }
            book.in_use.insert(pid, in_use);
            for (b, verdict) in old.iter().zip(verdicts) {
                match verdict {
                    Verdict::Live => {
                        if let Some(k) = book.known.get_mut(&(pid, b.addr)) {
                            k.confirmed = true;
                        }
                    }
                    Verdict::Unknown(_) => {}
                    Verdict::Freed(_) | Verdict::Reused => {
                        if verdict == Verdict::Reused {
                            book.reused += 1;
                        }
                        book.freed += 1;
                        book.known.remove(&(pid, b.addr));
                        dead.push(**b);
                    }
                }
            }
        }
        if !dead.is_empty() {
            self.forget_blocks(&dead)?;
        }
        // What is left in the book for blocks the table no longer holds (freed inside a
        // window, or forgotten) goes too.
        let present: std::collections::HashSet<(u32, u64)> =
            blocks.iter().map(|b| (b.pid, b.addr)).collect();
        let frozen: Vec<u32> = book
            .known
            .keys()
            .map(|&(p, _)| p)
            .filter(|&p| self.is_frozen(p))
            .collect();
        book.known
            .retain(|k, _| present.contains(k) || frozen.contains(&k.0));
        for d in &dead {
            book.known.remove(&(d.pid, d.addr));
        }
        book.full = book.known.len() >= MAX_SAMPLES;
        self.estimate(&mut book);
        log::debug!(
            "sweep after window {generation} ({:.1} ms; switching so far {:.1} ms): {} blocks in the table, {} samples kept, {} gone ({} freed so far, {} reused, {} unreadable), duty {:?}",
            sweep_started.elapsed().as_secs_f64() * 1e3,
            self.windows.as_ref().map_or(0.0, |w| w.switch_s * 1e3),
            blocks.len(),
            book.known.len(),
            dead.len(),
            book.freed,
            book.reused,
            book.unreadable,
            book.duty
        );
        self.book = book;
        Ok(())
    }

    /// Live bytes per (pid, stack) from the book's samples, each weighted by one over its
    /// chance of being sampled: the share of the arena pages faulted in by its leaf Python
    /// function (an object's first write follows its allocation) that windows saw. Not per
    /// line: the line carving new pages is often not the one whose objects stay
    /// (docs/sampled-pymalloc.md). Under [`MIN_FUNCTION_PAGES`]: the process's share.
    fn estimate(&mut self, book: &mut SampleBook) {
        let windows = self.windows.as_ref().map_or(0, |w| w.count);
        let share = self.time_share();
        book.duty.clear();
        book.duty_from_time.clear();
        for (pid, (all, inside)) in self.progress() {
            // Fewer faults than that inside windows say little (5 of 37 186 once put the
            // chance 250x under the truth, for a leak made between bursts of churn): the
            // share of time is the chance of what the traps do not slow.
            match share {
                Some(share) if inside < MIN_FUNCTION_PAGES => {
                    book.duty.insert(pid, share);
                    book.duty_from_time.insert(pid);
                }
                Some(share) if all > 0 => {
                    book.duty
                        .insert(pid, (inside as f64 / all as f64).min(share));
                }
                _ => {}
            }
        }
        // Pages faulted in per (pid, Python function), since each process's first window.
        let mut pages: HashMap<FunctionKey, [u64; 2]> = HashMap::new();
        let per_stack: Vec<(u32, u64, [u64; 2])> = self
            .model
            .procs
            .iter()
            .flat_map(|(&pid, p)| {
                p.arena_pages_by_stack
                    .iter()
                    .map(move |(&s, &n)| (pid, s, n))
            })
            .collect();
        for (pid, stack, n) in per_stack {
            let function = self.function_of(book, stack);
            let e = pages.entry((pid, function)).or_default();
            e[0] += n[0];
            e[1] += n[1];
        }
        book.estimates.clear();
        let mut groups: HashMap<FunctionKey, Vec<LiveSample<u64>>> = HashMap::new();
        let known: Vec<(u32, u64, u64, u64)> = book
            .known
            .iter()
            .filter(|(_, k)| k.confirmed)
            .map(|(&(pid, _), k)| (pid, k.stack_id, k.size, k.window))
            .collect();
        for (pid, stack, size, window) in known {
            let function = self.function_of(book, stack);
            groups.entry((pid, function)).or_default().push(LiveSample {
                stack,
                size,
                window,
            });
        }
        // Per (pid, size class): each live sample's (stack, size, weight).
        let mut by_class: ClassSamples = HashMap::new();
        for ((pid, function), live) in groups {
            let Some(&process_duty) = book.duty.get(&pid) else {
                continue;
            };
            let duty = match pages.get(&(pid, function)) {
                Some(&[all, inside]) if function.is_some() && inside >= MIN_FUNCTION_PAGES => {
                    (inside as f64 / all as f64).min(share.unwrap_or(1.0))
                }
                _ => process_duty,
            };
            let design = Design::Windows {
                opened: windows,
                duty,
            };
            for s in &live {
                let e = by_class.entry((pid, class_of(s.size))).or_default();
                e.push((s.stack, s.size, 1.0 / duty));
            }
            for (stack, e) in estimate(live, design) {
                book.estimates.insert((pid, stack), e);
            }
        }
        book.cut_to_pools = cut_to_pools(&mut book.estimates, &by_class, &book.in_use);
    }

    /// The leaf Python function (code object address) of interned stack `id`, cached.
    fn function_of(&self, book: &mut SampleBook, id: u64) -> Option<u64> {
        *book.functions.entry(id).or_insert_with(|| {
            let s = self.stack(id)?;
            (s.py_len > 0).then(|| s.py[0].code)
        })
    }

    /// The estimates of the last sweep, per (pid, stack id).
    pub fn book(&self) -> &SampleBook {
        &self.book
    }
}

/// Per (pid, size class): each live sample's (stack id, requested size, weight).
type ClassSamples = HashMap<(u32, usize), Vec<(u64, u64, f64)>>;

/// The size class of a sampled request (larger ones leave the sample before this).
fn class_of(size: u64) -> usize {
    size_class(size).map_or(NUM_CLASSES - 1, |c| c as usize)
}

/// Scales down the stacks' estimates of each (pid, size class) whose estimated live blocks
/// exceed the blocks its pools hold in use: an estimate is never more than the heap holds
/// (a sample whose block was freed and taken again by an equal object of the same code, a
/// dict or a list a fingerprint cannot tell apart, or a chance measured too low, would
/// otherwise weigh hundreds of blocks that are not there). `by_class`: each live sample's
/// (stack, size, weight) per (pid, class). Returns the estimated blocks taken off.
fn cut_to_pools(
    estimates: &mut HashMap<(u32, u64), StackEstimate>,
    by_class: &ClassSamples,
    in_use: &HashMap<u32, [u64; NUM_CLASSES]>,
) -> u64 {
    // Per (pid, stack): [weighted bytes, kept weighted bytes, weight, kept weight].
    let mut sums: HashMap<(u32, u64), [f64; 4]> = HashMap::new();
    let mut cut = 0.0;
    for (&(pid, class), samples) in by_class {
        let total: f64 = samples.iter().map(|&(_, _, w)| w).sum();
        let held = in_use.get(&pid).map(|c| c[class] as f64);
        let keep = match held {
            Some(held) if total > held => held / total,
            _ => 1.0,
        };
        cut += total * (1.0 - keep);
        if keep < 1.0 {
            log::debug!(
                "pid {pid} class {class}: {total:.0} blocks estimated, {held:?} in use: kept {keep:.3}"
            );
        }
        for &(stack, size, w) in samples {
            let s = sums.entry((pid, stack)).or_default();
            let bytes = size as f64 * w;
            s[0] += bytes;
            s[1] += bytes * keep;
            s[2] += w;
            s[3] += w * keep;
        }
    }
    for (key, [bytes, kept_bytes, weight, kept_weight]) in sums {
        if kept_weight >= weight {
            continue;
        }
        if let Some(e) = estimates.get_mut(&key) {
            let b = if bytes > 0.0 { kept_bytes / bytes } else { 1.0 };
            e.live_bytes_estimate *= b;
            e.live_bytes_stderr *= b;
            e.live_count_estimate *= kept_weight / weight;
        }
    }
    cut.round() as u64
}

/// Anonymous read-write private mappings of `pid` at least an arena long: where its pools
/// may be (the kernel merges an arena with the anonymous mappings next to it, malloc's
/// large blocks among them, so a mapping's length says little).
fn arena_regions(pid: u32, arena_size: u64) -> Vec<(u64, u64)> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    crate::proctext::maps(&text)
        .filter(|m| {
            m.path.is_empty()
                && m.perms.starts_with("rw")
                && m.perms.ends_with('p')
                && m.end - m.start >= arena_size
        })
        .map(|m| (m.start, m.end))
        .collect()
}

/// Whether `p` is one of the pymalloc layer's allocator probes (a finalize, init or code
/// probe's cookie carries no layer: those stay in all the time).
pub fn is_pymalloc_allocator(p: &ProbeSpec) -> bool {
    let allocator = !matches!(
        p.role,
        ProbeRole::Finalize | ProbeRole::PyInit | ProbeRole::CodeDealloc
    );
    allocator && ProbeCookie::decode(p.cookie).layer == Layer::Pymalloc as u32
}

/// Whether the samples of a process running CPython `version` (`"3.12"`) can be judged:
/// pyleak knows its heap's layout.
pub fn judges(version: &str) -> bool {
    parse_version(version)
        .and_then(crate::python::versions::for_version)
        .is_some()
}

/// `"3.12"` (or `"3.12.1"`) as a version tuple.
fn parse_version(v: &str) -> Option<crate::python::versions::PyVersion> {
    let mut parts = v.split('.');
    let major = parts.next()?.trim().parse().ok()?;
    let minor = parts.next()?.trim().parse().ok()?;
    Some((major, minor))
}

/// What sampled pymalloc tracing tells the report.
#[derive(Debug, Clone, Default)]
pub struct SampledPymalloc {
    /// Windows opened.
    pub windows: u64,
    /// Seconds they were open in all.
    pub open_s: f64,
    /// Per pid: the share of its arena page faults inside windows (an allocation's chance
    /// of being sampled).
    pub duty: HashMap<u32, f64>,
    /// Live samples, confirmed by a judgement after their window's (the estimated ones).
    pub samples: u64,
    /// Samples not judged again since their window (left out of the estimates).
    pub unconfirmed: u64,
    /// Samples found freed or reused after their window (reused is a part of freed).
    pub freed: u64,
    /// Samples found reused by another object.
    pub reused: u64,
    /// Samples unreadable when their window closed (dropped).
    pub unreadable: u64,
    /// Whether windows stopped at the cap of samples kept.
    pub full: bool,
    /// Pids whose `duty` is the windows' share of time (too few arena pages faulted in
    /// inside windows).
    pub duty_from_time: Vec<u32>,
    /// Estimated live blocks taken off to stay within what the pools hold in use.
    pub cut_to_pools: u64,
    /// Per (pid, stack id): the estimate.
    pub estimates: HashMap<(u32, u64), StackEstimate>,
}

impl Recorder {
    /// Turns the pymalloc layer's kernel counts (made inside windows only) into estimates
    /// for the whole recording: every count weighted by one over its process's duty, live
    /// bytes per stack from the judged samples. No-op unless pymalloc is sampled.
    pub(super) fn apply_estimates(&self, snap: &mut super::Snapshot) {
        let Some(w) = self.windows.as_ref() else {
            return;
        };
        let book = &self.book;
        let weight = |pid: u32| book.duty.get(&pid).map_or(0.0, |d| 1.0 / d);
        let scale = |n: u64, w: f64| (n as f64 * w).round() as u64;
        let mut layer = pyleak_common::LayerStats::default();
        for (&(pid, l, stack), agg) in snap.stacks.iter_mut() {
            if l != Layer::Pymalloc {
                continue;
            }
            let est = book
                .estimates
                .get(&(pid, stack))
                .copied()
                .unwrap_or_default();
            // A stack with live samples is weighted as its line's samples are (threads
            // slowed unequally by the traps see different odds); others as their process.
            let wt = if est.samples > 0 {
                est.live_count_estimate / est.samples as f64
            } else {
                weight(pid)
            };
            let live_count = est.live_count_estimate.round() as u64;
            agg.allocs = scale(agg.allocs, wt).max(live_count);
            agg.alloc_bytes =
                scale(agg.alloc_bytes, wt).max(est.live_bytes_estimate.round() as u64);
            agg.frees = agg.allocs - live_count;
            agg.freed_bytes = agg.alloc_bytes - est.live_bytes_estimate.round() as u64;
            layer.allocs += agg.allocs;
            layer.alloc_bytes += agg.alloc_bytes;
            layer.frees += agg.frees;
            layer.freed_bytes += agg.freed_bytes;
        }
        let s = &mut snap.layer_stats[Layer::Pymalloc as usize];
        log::debug!(
            "pymalloc in windows: {} allocs, {} frees; arena pages {:?}",
            s.allocs,
            s.frees,
            self.progress(),
        );
        s.allocs = layer.allocs;
        s.alloc_bytes = layer.alloc_bytes;
        s.frees = layer.frees;
        s.freed_bytes = layer.freed_bytes;
        // Frees of blocks from outside windows are most frees here: not a sign of loss.
        s.unmatched_frees = 0;
        for (&(pid, l, stack), a) in snap.ages.iter_mut() {
            if l != Layer::Pymalloc {
                continue;
            }
            // The ages' shares of the stack's live samples, applied to its estimate (which
            // may have been cut to what the pools hold), so the aged part is never more
            // than the whole. A stack with no confirmed sample (its blocks all from the
            // last window, left out of the estimate) is estimated at nothing, and so is
            // its aged part: it once read "0 B live, 96.9 MiB older than 0 s".
            let est = book
                .estimates
                .get(&(pid, stack))
                .copied()
                .unwrap_or_default();
            let (wb, wc) = if est.samples > 0 && a.bytes > 0 && a.count > 0 {
                (
                    est.live_bytes_estimate / a.bytes as f64,
                    est.live_count_estimate / a.count as f64,
                )
            } else {
                (0.0, 0.0)
            };
            a.aged_bytes = scale(a.aged_bytes, wb);
            a.aged_count = scale(a.aged_count, wc);
            a.bytes = scale(a.bytes, wb);
            a.count = scale(a.count, wc);
        }
        // Every sampled block is a small one (larger requests leave the sample).
        snap.pymalloc_small_live = layer.alloc_bytes.saturating_sub(layer.freed_bytes);
        snap.sampled = Some(SampledPymalloc {
            windows: w.count,
            open_s: w.open_s,
            duty: book.duty.clone(),
            samples: book.known.values().filter(|k| k.confirmed).count() as u64,
            unconfirmed: book.known.values().filter(|k| !k.confirmed).count() as u64,
            freed: book.freed,
            reused: book.reused,
            unreadable: book.unreadable,
            full: book.full,
            duty_from_time: book.duty_from_time.iter().copied().collect(),
            cut_to_pools: book.cut_to_pools,
            estimates: book.estimates.clone(),
        });
    }

    /// For a growth sample: the pymalloc layer's live bytes per stack are the estimates of
    /// the last sweep, not the kernel's window-only counts.
    pub(super) fn sampled_live(&self, live: &mut HashMap<super::StackSlot, u64>) {
        if self.windows.is_none() {
            return;
        }
        live.retain(|&(_, l, _), _| l != Layer::Pymalloc);
        for (&(pid, stack), e) in &self.book.estimates {
            let bytes = e.live_bytes_estimate.round() as u64;
            if bytes > 0 {
                live.insert((pid, Layer::Pymalloc, stack), bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(bytes: f64, count: f64, samples: u64) -> StackEstimate {
        StackEstimate {
            live_bytes_estimate: bytes,
            live_bytes_stderr: bytes / 2.0,
            live_count_estimate: count,
            samples,
        }
    }

    /// Two stacks share size class 2 (48-byte blocks) and estimate 300 blocks there while
    /// the pools hold 150 in use: each keeps half of its class-2 blocks; stack 1's class-0
    /// sample stays whole; a process with no census is left alone.
    #[test]
    fn estimates_are_cut_to_the_blocks_in_use() {
        let mut estimates = HashMap::from([
            ((7, 1), est(100.0 * 48.0 + 10.0 * 16.0, 110.0, 3)),
            ((7, 2), est(200.0 * 48.0, 200.0, 2)),
            ((8, 1), est(1000.0 * 48.0, 1000.0, 1)),
        ]);
        let by_class = HashMap::from([
            (
                (7, 2),
                vec![(1, 48, 50.0), (1, 48, 50.0), (2, 48, 100.0), (2, 48, 100.0)],
            ),
            ((7, 0), vec![(1, 16, 10.0)]),
            ((8, 2), vec![(1, 48, 1000.0)]),
        ]);
        let mut pools = [0u64; NUM_CLASSES];
        pools[2] = 150;
        pools[0] = 20;
        let in_use = HashMap::from([(7, pools)]);
        let cut = cut_to_pools(&mut estimates, &by_class, &in_use);
        assert_eq!(cut, 150);
        let one = estimates[&(7, 1)];
        assert!((one.live_count_estimate - 60.0).abs() < 1e-9);
        assert!((one.live_bytes_estimate - (50.0 * 48.0 + 160.0)).abs() < 1e-9);
        let two = estimates[&(7, 2)];
        assert!((two.live_count_estimate - 100.0).abs() < 1e-9);
        assert!((two.live_bytes_stderr - 100.0 * 48.0 / 2.0).abs() < 1e-9);
        assert_eq!(estimates[&(8, 1)], est(48_000.0, 1000.0, 1));
    }
}
