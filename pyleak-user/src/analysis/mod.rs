//! Turning what was traced into answers, as a pure function: [`analyze`] takes what the
//! kernel gathered (a [`Snapshot`]), the vm model and what is known of the processes
//! ([`Facts`]) and returns an [`Analysis`] (layer totals, stacks, the layers linked, leak
//! suspects), which `report` and `live` only render. Growth maths in `growth`, the
//! suspects' order in `rank`.

mod blame;
pub mod cow;
pub mod growing;
pub mod growth;
pub mod layer_bytes;
pub mod model;
pub mod peak;
mod rank;
pub mod retention;
mod suspects;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use hdrhistogram::Histogram;
use pyleak_common::{bucket_low, Layer, HIST_BUCKETS};

use self::growth::{Growth, Timeline};
pub use self::model::*;
pub use self::rank::{growth_noise, layer_named, rank};
use crate::collect::{
    frames::StackFrames,
    vm::{MappingKind, VmModel, PAGE},
    Ages, Snapshot, StackSlot,
};

/// What is known of the traced processes besides the kernel's counts: gathered while
/// recording (or made up by a test), read by [`analyze`].
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Traced processes, in the order they were added.
    pub targets: Vec<u32>,
    /// Command name, cgroup and CPython version, by pid.
    pub processes: HashMap<u32, ProcessInfo>,
    /// Where the probes sit.
    pub probes: Vec<ProbeInfo>,
    /// How the uprobes were placed: `multi-uprobe` or `perf-event`.
    pub probe_links: String,
    /// Seconds spent attaching the uprobes.
    pub probes_attach_s: f64,
    /// The frames of each (pid, stack id) that the snapshot and the vm model name.
    pub frames: HashMap<(u32, u64), StackFrames>,
    /// Seconds into the recording at which each process traced from its start (a
    /// launched command) started; processes running before are absent.
    pub started_s: HashMap<u32, f64>,
    /// The kind of mapping of each resident page (pid, address) outside every mapping the
    /// vm layer saw made (the heap, a stack, a file); anonymous if absent.
    pub page_kinds: HashMap<(u32, u64), MappingKind>,
    /// The highest growth sample of each layer.
    pub peaks: peak::Peaks,
}

/// Memory made this soon (seconds) after its process started can be start-up memory.
pub const STARTUP_S: f64 = 1.0;

impl Facts {
    /// The frames of one stack; `[stack lost]` when they are not known.
    pub fn frames_of(&self, pid: u32, stack_id: u64) -> StackFrames {
        self.frames
            .get(&(pid, stack_id))
            .cloned()
            .unwrap_or_else(|| StackFrames {
                names: vec!["[stack lost]".to_owned()],
                truncated: false,
                native: 0,
            })
    }
}

/// Settings of [`analyze`].
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Seconds recorded.
    pub duration_s: f64,
    /// Live memory younger than this at the end is not a suspect.
    pub min_age_s: f64,
    /// Seconds between growth samples.
    pub interval_s: f64,
    /// Blame memory library code allocated on the innermost frame of the user's own code
    /// (off with `--no-group-libs`).
    pub group_libs: bool,
}

/// Suspects listed at most.
pub const MAX_SUSPECTS: usize = 50;

/// The analysis of a recording: a pure function of what the kernel gathered (`snap`), the
/// vm and pages layers (`model`), what is known of the processes (`facts`) and the growth
/// samples (`timeline`).
pub fn analyze(
    snap: &Snapshot,
    model: &VmModel,
    facts: &Facts,
    timeline: &Timeline<StackSlot>,
    opts: Options,
) -> Analysis {
    let mut layers = BTreeMap::new();
    for layer in Layer::ALL {
        let r = match layer {
            Layer::Vm | Layer::Pages => {
                let t = if layer == Layer::Vm {
                    model.vm
                } else {
                    model.pages
                };
                let live = if layer == Layer::Vm {
                    model.live_regions()
                } else {
                    model.live_pages()
                };
                // Retired processes' memory is out of the model; the totals still count it,
                // as the uprobe layers' counters do.
                let retired = snap.retired.live.get(&layer).copied().unwrap_or_default();
                let (live_bytes, live_count) = live
                    .values()
                    .fold(retired, |(b, c), (lb, lc)| (b + lb, c + lc));
                let sizes = if layer == Layer::Vm {
                    percentiles(&model.vm_sizes)
                } else {
                    let mut h = new_histogram();
                    let _ = h.record_n(4096, t.allocs);
                    percentiles(&h)
                };
                LayerReport {
                    allocs: t.allocs,
                    frees: t.frees,
                    alloc_bytes: t.alloc_bytes,
                    freed_bytes: t.freed_bytes,
                    live_count,
                    live_bytes,
                    unmatched_frees: t.unmatched_frees,
                    failed_allocs: 0,
                    reused: 0,
                    size_percentiles: sizes,
                    lifetime_percentiles_us: percentiles(if layer == Layer::Vm {
                        &model.vm_lifetimes
                    } else {
                        &model.page_lifetimes
                    }),
                }
            }
            _ => {
                let s = snap.layer_stats[layer as usize];
                LayerReport {
                    allocs: s.allocs,
                    frees: s.frees,
                    alloc_bytes: s.alloc_bytes,
                    freed_bytes: s.freed_bytes,
                    live_count: s.allocs.saturating_sub(s.frees),
                    live_bytes: s.alloc_bytes.saturating_sub(s.freed_bytes),
                    unmatched_frees: s.unmatched_frees,
                    failed_allocs: s.failed_allocs,
                    reused: s.reused,
                    size_percentiles: percentiles(&bucket_histogram(
                        &snap.size_hist[layer as usize],
                    )),
                    lifetime_percentiles_us: percentiles(&bucket_histogram(
                        &snap.lifetime_hist[layer as usize],
                    )),
                }
            }
        };
        layers.insert(layer.name().to_owned(), r);
    }

    // Rows: one per (process, layer, frames); stacks that differ only in frames not shown
    // (native callers under the same Python line) are one row.
    let live_regions = model.live_regions();
    let live_pages = model.live_pages();
    let frames = |pid: u32, stack_id: u64| facts.frames_of(pid, stack_id);
    let mut rows: Vec<StackReport> = Vec::new();
    let mut row_of: HashMap<(u32, Layer, Vec<String>), usize> = HashMap::new();
    let mut row_of_key: HashMap<(u32, Layer, u64), usize> = HashMap::new();
    let mut ages: Vec<Ages> = Vec::new();
    for (&(pid, layer, stack_id), agg) in &snap.stacks {
        let (live_bytes, live_count) = match layer {
            Layer::Vm => live_regions
                .get(&(pid, stack_id))
                .copied()
                .unwrap_or_default(),
            Layer::Pages => live_pages
                .get(&(pid, stack_id))
                .copied()
                .unwrap_or_default(),
            _ => (
                agg.alloc_bytes.saturating_sub(agg.freed_bytes),
                agg.allocs.saturating_sub(agg.frees),
            ),
        };
        let StackFrames {
            names: fr,
            truncated,
            native,
        } = frames(pid, stack_id);
        let i = *row_of.entry((pid, layer, fr.clone())).or_insert_with(|| {
            rows.push(StackReport {
                layer: layer.name().to_owned(),
                pid,
                frames: fr,
                native_frames: native,
                live_bytes: 0,
                live_count: 0,
                alloc_bytes: 0,
                allocs: 0,
                frees: 0,
                freed_bytes: 0,
                truncated,
                aged_live_bytes: 0,
                growth_bytes_per_s: 0.0,
                estimate: None,
            });
            ages.push(Ages::default());
            rows.len() - 1
        });
        row_of_key.insert((pid, layer, stack_id), i);
        let r = &mut rows[i];
        if layer == Layer::Pymalloc {
            if let Some(e) = snap
                .sampled
                .as_ref()
                .and_then(|sp| sp.estimates.get(&(pid, stack_id)))
            {
                let e = Estimate {
                    live_bytes_estimate: e.live_bytes_estimate,
                    live_bytes_stderr: e.live_bytes_stderr,
                    samples: e.samples,
                };
                r.estimate = Some(r.estimate.unwrap_or_default().add(e));
            }
        }
        r.live_bytes += live_bytes;
        r.live_count += live_count;
        r.alloc_bytes += agg.alloc_bytes;
        r.allocs += agg.allocs;
        r.frees += agg.frees;
        r.freed_bytes += agg.freed_bytes;
        if let Some(a) = snap.ages.get(&(pid, layer, stack_id)) {
            suspects::merge_ages(&mut ages[i], a);
        }
    }
    let series = timeline.grouped(|k| row_of_key.get(k).copied());
    let noise = growth_noise(opts.interval_s);
    let growth: Vec<Growth> = (0..rows.len())
        .map(|i| match series.get(&i) {
            Some(v) => growth::assess(timeline.times(), v, noise),
            None => growth::assess(timeline.times(), &vec![0; timeline.len()], noise),
        })
        .collect();
    for (i, r) in rows.iter_mut().enumerate() {
        r.aged_live_bytes = ages[i].aged_bytes;
        r.growth_bytes_per_s = growth[i].bytes_per_s;
    }

    // Mappings and resident pages by kind, per (pid, frames) for the suspects.
    let mut live = LayerBytes::default();
    for layer in Layer::ALL {
        live[layer] = layers[layer.name()].live_bytes;
    }
    let mut linkage = Linkage {
        live,
        pymalloc_small_live_bytes: snap.pymalloc_small_live,
        libc_for_python_live_bytes: snap.libc_for_python_live,
        ..Linkage::default()
    };
    let mut arenas_by_stack: HashMap<(u32, Vec<String>), u64> = HashMap::new();
    for (&pid, p) in &model.procs {
        for (&start, r) in &p.regions {
            let kind = r.kind();
            *linkage
                .vm_by_kind
                .entry(kind.name().to_owned())
                .or_default() += r.end - start;
            if kind == MappingKind::PymallocArena {
                linkage.arena_count += 1;
                linkage.arena_bytes += r.end - start;
                *arenas_by_stack
                    .entry((pid, frames(pid, r.stack_id).names))
                    .or_default() += r.end - start;
            }
        }
        for (&addr, page) in &p.pages {
            if page.bulk {
                linkage.resident_bulk_bytes += PAGE;
            }
            let kind = match p.region_at(addr) {
                Some(r) => r.kind(),
                None => facts
                    .page_kinds
                    .get(&(pid, addr))
                    .copied()
                    .unwrap_or(MappingKind::Anonymous),
            };
            if kind == MappingKind::PymallocArena {
                linkage.arena_resident_bytes += PAGE;
            }
            *linkage
                .resident_by_kind
                .entry(kind.name().to_owned())
                .or_default() += PAGE;
        }
    }
    if linkage.arena_bytes > 0 && linkage.pymalloc_small_live_bytes > 0 {
        linkage.fragmentation_ratio =
            Some(linkage.arena_bytes as f64 / linkage.pymalloc_small_live_bytes as f64);
    }

    let (mut suspects, mut startup) = suspects::suspects(
        &rows,
        &suspects::Inputs {
            ages: &ages,
            row_of_key: &row_of_key,
            timeline,
            noise,
            arenas_by_stack: &arenas_by_stack,
            traced: snap.traced,
            started_s: &facts.started_s,
        },
        opts,
    );
    rank(&mut suspects);
    suspects.truncate(MAX_SUSPECTS);
    startup.sort_by(|a, b| {
        b.live_bytes
            .cmp(&a.live_bytes)
            .then(a.frames.cmp(&b.frames))
    });
    startup.truncate(MAX_SUSPECTS);

    rows.sort_by(|a, b| {
        b.live_bytes
            .cmp(&a.live_bytes)
            .then(b.alloc_bytes.cmp(&a.alloc_bytes))
            .then(a.layer.cmp(&b.layer))
            .then(a.frames.cmp(&b.frames))
    });

    let lost: BTreeMap<String, u64> = snap
        .drops
        .iter()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect();
    Analysis {
        pyleak_version: env!("CARGO_PKG_VERSION").to_owned(),
        duration_s: opts.duration_s,
        command_exit: None,
        processes: {
            // Targets, then any process the kernel counted that userspace never saw (a
            // short-lived fork in a traced cgroup) or a target's child that exited before
            // its probes went in.
            let mut pids = facts.targets.clone();
            let followed = facts
                .processes
                .values()
                .filter(|p| p.followed.is_some())
                .map(|p| p.pid);
            let mut extra: Vec<u32> = rows
                .iter()
                .map(|s| s.pid)
                .chain(followed)
                .filter(|p| !pids.contains(p))
                .collect();
            extra.sort_unstable();
            extra.dedup();
            pids.extend(extra);
            pids.into_iter()
                .map(|pid| {
                    facts.processes.get(&pid).cloned().unwrap_or(ProcessInfo {
                        pid,
                        comm: "?".to_owned(),
                        cgroup: None,
                        python: None,
                        followed: None,
                    })
                })
                .collect()
        },
        layers,
        stacks: rows,
        lost_events: lost.values().sum(),
        lost,
        probes: facts.probes.clone(),
        min_age_s: opts.min_age_s,
        interval_s: opts.interval_s,
        samples: timeline.len(),
        suspects,
        startup,
        probe_links: facts.probe_links.clone(),
        probes_attach_s: facts.probes_attach_s,
        // Set once the probes are detached, after the analysis.
        probes_detach_s: 0.0,
        census: None,
        retention: retention::retention(snap, model, facts),
        peak: peak::peaks(facts),
        copy_on_write: cow::copy_on_write(model, facts),
        linkage,
        sampled_pymalloc: snap.sampled.as_ref().map(|sp| SampledReport {
            mode: "sampled".to_owned(),
            windows: sp.windows,
            window_open_s: sp.open_s,
            inclusion: sp.duty.iter().map(|(&p, &d)| (p, d)).collect(),
            samples: sp.samples,
            unconfirmed: sp.unconfirmed,
            freed: sp.freed,
            reused: sp.reused,
            unreadable: sp.unreadable,
            capped: sp.full,
            inclusion_from_time: sp.duty_from_time.clone(),
            cut_to_pools: sp.cut_to_pools,
        }),
        retired: (snap.retired.processes > 0).then(|| RetiredReport {
            processes: snap.retired.processes,
            kept: snap.retired.kept,
            live_bytes: snap
                .retired
                .live
                .iter()
                .map(|(l, v)| (l.name().to_owned(), v.0))
                .collect(),
            live_count: snap
                .retired
                .live
                .iter()
                .map(|(l, v)| (l.name().to_owned(), v.1))
                .collect(),
        }),
    }
}

/// A histogram from the kernel's log-linear bucket counts.
fn bucket_histogram(counts: &[u64]) -> Histogram<u64> {
    let mut h = new_histogram();
    for (b, &n) in counts.iter().enumerate().take(HIST_BUCKETS) {
        if n > 0 {
            let _ = h.record_n(bucket_low(b).max(1), n);
        }
    }
    h
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant figures is a valid precision")
}

fn percentiles(h: &Histogram<u64>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    if h.is_empty() {
        return m;
    }
    m.insert("p50".to_owned(), h.value_at_quantile(0.5));
    m.insert("p90".to_owned(), h.value_at_quantile(0.9));
    m.insert("p99".to_owned(), h.value_at_quantile(0.99));
    m.insert("max".to_owned(), h.max());
    m
}
