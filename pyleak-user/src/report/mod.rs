//! The report: what is live at the end of a recording, per layer and per stack, and the
//! formats it is written in (one module each).

pub mod folded;
pub mod text;

use std::collections::{BTreeMap, HashMap};

use hdrhistogram::Histogram;
use pyleak_common::{
    bucket_low, Layer, StackTrace, HIST_BUCKETS, STACK_LEAF_IS_IP, STACK_PY_TRUNCATED,
};
use serde::{Deserialize, Serialize};

use crate::{
    analysis::{
        self,
        growth::{self, Growth, Timeline, Trend},
    },
    cli::ReportArgs,
    collect::{
        vm::{MappingKind, PAGE},
        Ages, Recorder, Snapshot,
    },
    errors::UserError,
    python::Resolver,
    symbolize::Symbolizer,
};

/// A whole report; its JSON form is pyleak's output contract.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// pyleak's version.
    pub pyleak_version: String,
    /// Seconds recorded.
    pub duration_s: f64,
    /// Traced processes.
    pub processes: Vec<ProcessInfo>,
    /// Totals per layer, by layer name.
    pub layers: BTreeMap<String, LayerReport>,
    /// Per (process, layer, stack), most live bytes first.
    pub stacks: Vec<StackReport>,
    /// Events lost in all (the sum of `lost`).
    pub lost_events: u64,
    /// Events lost, by reason.
    pub lost: BTreeMap<String, u64>,
    /// Where the probes sit.
    pub probes: Vec<ProbeInfo>,
    /// Live memory younger than this (seconds) at the end is not a suspect.
    #[serde(default)]
    pub min_age_s: f64,
    /// Seconds between growth samples (0: none taken).
    #[serde(default)]
    pub interval_s: f64,
    /// Growth samples taken.
    #[serde(default)]
    pub samples: usize,
    /// Leak suspects, most likely leak first.
    #[serde(default)]
    pub suspects: Vec<Suspect>,
    /// The layers linked: what Python asked for, what pymalloc, malloc and the kernel hold.
    #[serde(default)]
    pub linkage: Linkage,
    /// How the uprobes were placed: `multi-uprobe` (one link per program and file) or
    /// `perf-event` (one per probe, on kernels without multi-uprobe links).
    #[serde(default)]
    pub probe_links: String,
    /// Seconds pyleak spent attaching its uprobes, measured by itself.
    #[serde(default)]
    pub probes_attach_s: f64,
    /// Seconds pyleak spent detaching its uprobes at the end, measured by itself.
    #[serde(default)]
    pub probes_detach_s: f64,
    /// Sampled pymalloc tracing, when on: the pymalloc figures are then estimates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_pymalloc: Option<SampledReport>,
}

/// A (process, layer, stack) whose live memory outlived `min_age_s` or keeps growing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Suspect {
    /// Layer name.
    pub layer: String,
    /// Process id.
    pub pid: u32,
    /// Frames, root first.
    pub frames: Vec<String>,
    /// How many of `frames`, at the leaf end, are native (as in [`StackReport`]).
    #[serde(default)]
    pub native_frames: usize,
    /// Bytes live at the end.
    pub live_bytes: u64,
    /// Blocks live at the end.
    pub live_count: u64,
    /// Of those, bytes at least `min_age_s` old.
    pub aged_live_bytes: u64,
    /// Blocks at least `min_age_s` old.
    pub aged_live_count: u64,
    /// Growth of live bytes in the recent half of the recording, bytes per second.
    pub growth_bytes_per_s: f64,
    /// Growth over the whole recording, bytes per second.
    pub overall_growth_bytes_per_s: f64,
    /// Share of recent sampling intervals in which live bytes rose.
    pub steadiness: f64,
    /// `growing`, `plateau`, `flat`, `shrinking` or `unknown` (too few samples).
    pub trend: Trend,
    /// Age of the oldest live block, seconds.
    pub oldest_age_s: f64,
    /// The same Python stack at every layer.
    pub linkage: SuspectLinkage,
    /// Sampled pymalloc tracing: the estimate behind `live_bytes` (absent when exact).
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
}

/// One stack's memory at every layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SuspectLinkage {
    /// Live pymalloc requests.
    pub pymalloc_live_bytes: u64,
    /// Live PyMem_Raw requests.
    pub pymem_raw_live_bytes: u64,
    /// Live malloc blocks.
    pub libc_live_bytes: u64,
    /// pymalloc arenas this stack caused to be mapped, still mapped.
    pub arena_bytes: u64,
    /// Mappings still mapped.
    pub vm_live_bytes: u64,
    /// Pages this stack faulted in, still resident.
    pub resident_bytes: u64,
}

/// The layers linked, for all traced processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Linkage {
    /// Live pymalloc requests (what Python code asked for).
    pub pymalloc_live_bytes: u64,
    /// Of those, requests of at most 512 bytes (served from arenas).
    pub pymalloc_small_live_bytes: u64,
    /// Live PyMem_Raw requests.
    pub pymem_raw_live_bytes: u64,
    /// pymalloc arenas mapped while tracing and still mapped.
    pub arena_count: u64,
    /// Their bytes.
    pub arena_bytes: u64,
    /// Their resident bytes.
    pub arena_resident_bytes: u64,
    /// `arena_bytes / pymalloc_small_live_bytes`: 1.0 is perfectly packed; far above 1,
    /// arenas kept alive by a few objects each.
    pub fragmentation_ratio: Option<f64>,
    /// Live malloc blocks.
    pub libc_live_bytes: u64,
    /// Of those, allocated on behalf of pymalloc or PyMem_Raw.
    pub libc_for_python_live_bytes: u64,
    /// Mappings made while tracing and still mapped.
    pub vm_live_bytes: u64,
    /// Those mappings by kind.
    pub vm_by_kind: BTreeMap<String, u64>,
    /// Pages faulted in while tracing and still resident.
    pub resident_bytes: u64,
    /// Those pages by the kind of mapping they are in.
    pub resident_by_kind: BTreeMap<String, u64>,
}

/// A traced process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Its cgroup v2 path (`/system.slice/app.service`), when it could be read.
    pub cgroup: Option<String>,
    /// The CPython version it runs (`3.12`), if any was found.
    pub python: Option<String>,
}

/// Totals of one layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerReport {
    /// Allocations (mappings made, pages faulted in).
    pub allocs: u64,
    /// Frees of blocks allocated while tracing.
    pub frees: u64,
    /// Bytes allocated.
    pub alloc_bytes: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Blocks (mappings, pages) live at the end.
    pub live_count: u64,
    /// Their bytes.
    pub live_bytes: u64,
    /// Frees of blocks not allocated while tracing.
    pub unmatched_frees: u64,
    /// Allocation calls that failed.
    pub failed_allocs: u64,
    /// Allocation size percentiles (p50, p90, p99, max), in bytes.
    pub size_percentiles: BTreeMap<String, u64>,
    /// Lifetime percentiles of freed blocks (p50, p90, p99, max), in microseconds.
    #[serde(default)]
    pub lifetime_percentiles_us: BTreeMap<String, u64>,
}

/// One (process, layer, stack).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StackReport {
    /// Layer name.
    pub layer: String,
    /// Process id.
    pub pid: u32,
    /// Frames, root first: Python `qualname (path:line)`, native `symbol (module)`; under
    /// Python frames (`--native`), native frames end in ` [native]`.
    pub frames: Vec<String>,
    /// How many of `frames`, at the leaf end, are native: all of them in a stack without
    /// Python frames, those under the Python frames with `--native`, else 0.
    #[serde(default)]
    pub native_frames: usize,
    /// Bytes live at the end.
    pub live_bytes: u64,
    /// Blocks live at the end.
    pub live_count: u64,
    /// Bytes allocated.
    pub alloc_bytes: u64,
    /// Allocations.
    pub allocs: u64,
    /// Frees.
    pub frees: u64,
    /// Bytes freed.
    pub freed_bytes: u64,
    /// Whether frames were cut off.
    pub truncated: bool,
    /// Live bytes at least `min_age_s` old.
    #[serde(default)]
    pub aged_live_bytes: u64,
    /// Growth of live bytes in the recent half of the recording, bytes per second.
    #[serde(default)]
    pub growth_bytes_per_s: f64,
    /// Sampled pymalloc tracing: the estimate behind `live_bytes`, its standard error and
    /// the live samples it rests on (absent for exact figures).
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
}

/// A live-bytes estimate of sampled pymalloc tracing (JSON fields of a stack or suspect).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
pub struct Estimate {
    /// Estimated live bytes (Horvitz–Thompson: each live sample's size over its chance of
    /// being sampled).
    pub live_bytes_estimate: f64,
    /// Its standard error, in bytes.
    pub live_bytes_stderr: f64,
    /// Live samples it rests on.
    pub samples: u64,
}

impl Estimate {
    /// Two rows' estimates together (errors add in quadrature).
    fn add(self, o: Estimate) -> Estimate {
        Estimate {
            live_bytes_estimate: self.live_bytes_estimate + o.live_bytes_estimate,
            live_bytes_stderr: self.live_bytes_stderr.hypot(o.live_bytes_stderr),
            samples: self.samples + o.samples,
        }
    }
}

/// What sampled pymalloc tracing did (JSON `sampled_pymalloc`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SampledReport {
    /// `sampled`.
    pub mode: String,
    /// Windows opened.
    pub windows: u64,
    /// Seconds they were open, in all.
    pub window_open_s: f64,
    /// Per pid: the share of its heap growth (arena pages faulted in) the windows saw, the
    /// chance of an allocation being sampled.
    pub inclusion: BTreeMap<u32, f64>,
    /// Live samples at the end.
    pub samples: u64,
    /// Samples found freed later by reading the target (reused ones included).
    pub freed: u64,
    /// Of those, found reused by another object.
    pub reused: u64,
    /// Samples unreadable when their window closed (dropped).
    pub unreadable: u64,
    /// Whether windows stopped because the cap of kept samples was reached.
    pub capped: bool,
}

/// Where a probe sits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProbeInfo {
    /// The file probed.
    pub file: String,
    /// The function.
    pub symbol: String,
    /// Attach point minus function start.
    pub offset: u64,
    /// Whether the kernel emulates the instruction there (cheap) or single-steps it.
    pub emulated: bool,
}

/// Settings of [`build`].
#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    /// Native frames under the Python ones.
    pub native: bool,
    /// Seconds recorded.
    pub duration_s: f64,
    /// Live memory younger than this at the end is not a suspect.
    pub min_age_s: f64,
    /// Seconds between growth samples.
    pub interval_s: f64,
}

/// Suspects listed at most.
pub const MAX_SUSPECTS: usize = 50;

/// Builds the report from what the kernel and the vm model hold, and the growth samples.
pub fn build(
    rec: &Recorder,
    snap: &Snapshot,
    syms: &Symbolizer,
    py: &Resolver,
    timeline: &Timeline<(u32, Layer, u64)>,
    opts: BuildOptions,
) -> Report {
    let mut layers = BTreeMap::new();
    for layer in Layer::ALL {
        let r = match layer {
            Layer::Vm | Layer::Pages => {
                let t = if layer == Layer::Vm {
                    rec.model.vm
                } else {
                    rec.model.pages
                };
                let live = if layer == Layer::Vm {
                    rec.model.live_regions()
                } else {
                    rec.model.live_pages()
                };
                let (live_bytes, live_count) = live
                    .values()
                    .fold((0, 0), |(b, c), (lb, lc)| (b + lb, c + lc));
                let sizes = if layer == Layer::Vm {
                    percentiles(&rec.model.vm_sizes)
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
                    size_percentiles: sizes,
                    lifetime_percentiles_us: percentiles(if layer == Layer::Vm {
                        &rec.model.vm_lifetimes
                    } else {
                        &rec.model.page_lifetimes
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
    let live_regions = rec.model.live_regions();
    let live_pages = rec.model.live_pages();
    let mut frames_cache: HashMap<(u32, u64), StackFrames> = HashMap::new();
    let mut frames = |pid: u32, stack_id: u64| {
        frames_cache
            .entry((pid, stack_id))
            .or_insert_with(|| frames_of(rec, syms, py, opts.native, pid, stack_id))
            .clone()
    };
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
            let row = &mut ages[i];
            row.aged_bytes += a.aged_bytes;
            row.aged_count += a.aged_count;
            row.oldest_ns = row.oldest_ns.max(a.oldest_ns);
            row.bytes += a.bytes;
            row.count += a.count;
        }
    }
    let series = timeline.grouped(|k| row_of_key.get(k).copied());
    let noise = analysis::growth_noise(opts.interval_s);
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
    let mut linkage = Linkage {
        pymalloc_live_bytes: layers["pymalloc"].live_bytes,
        pymalloc_small_live_bytes: snap.pymalloc_small_live,
        pymem_raw_live_bytes: layers["pymem_raw"].live_bytes,
        libc_live_bytes: layers["libc"].live_bytes,
        libc_for_python_live_bytes: snap.libc_for_python_live,
        vm_live_bytes: layers["vm"].live_bytes,
        resident_bytes: layers["pages"].live_bytes,
        ..Linkage::default()
    };
    let mut arenas_by_stack: HashMap<(u32, Vec<String>), u64> = HashMap::new();
    for (&pid, p) in &rec.model.procs {
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
        for &addr in p.pages.keys() {
            let kind = match p.region_at(addr) {
                Some(r) => r.kind(),
                None => match syms.mapping_name(pid, addr) {
                    Some("[heap]") => MappingKind::MallocHeap,
                    Some(n) if n.starts_with("[stack") => MappingKind::Stack,
                    Some(n) if n.starts_with('/') => MappingKind::File,
                    _ => MappingKind::Anonymous,
                },
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

    let mut by_frames: HashMap<(u32, &[String]), SuspectLinkage> = HashMap::new();
    for r in &rows {
        let l = by_frames.entry((r.pid, &r.frames)).or_default();
        match analysis::layer_named(&r.layer) {
            Some(Layer::Pymalloc) => l.pymalloc_live_bytes += r.live_bytes,
            Some(Layer::PymemRaw) => l.pymem_raw_live_bytes += r.live_bytes,
            Some(Layer::Libc) => l.libc_live_bytes += r.live_bytes,
            Some(Layer::Vm) => l.vm_live_bytes += r.live_bytes,
            Some(Layer::Pages) => l.resident_bytes += r.live_bytes,
            None => {}
        }
    }
    let mut suspects: Vec<Suspect> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let (a, g) = (ages[i], growth[i]);
        // vm and pages rows qualify by aged memory only: their growth is mostly malloc's
        // and pymalloc's, whose own layers say whether blocks are leaking.
        let uprobe_layer = !matches!(
            analysis::layer_named(&r.layer),
            Some(Layer::Vm | Layer::Pages)
        );
        if a.aged_bytes == 0 && !(g.trend == Trend::Growing && uprobe_layer) {
            continue;
        }
        let mut link = by_frames
            .get(&(r.pid, r.frames.as_slice()))
            .cloned()
            .unwrap_or_default();
        link.arena_bytes = arenas_by_stack
            .get(&(r.pid, r.frames.clone()))
            .copied()
            .unwrap_or(0);
        suspects.push(Suspect {
            layer: r.layer.clone(),
            pid: r.pid,
            frames: r.frames.clone(),
            native_frames: r.native_frames,
            // Of vm and pages, the memory that can be a suspect (see `Snapshot::ages`).
            live_bytes: if uprobe_layer { r.live_bytes } else { a.bytes },
            live_count: if uprobe_layer { r.live_count } else { a.count },
            aged_live_bytes: a.aged_bytes,
            aged_live_count: a.aged_count,
            growth_bytes_per_s: g.bytes_per_s,
            overall_growth_bytes_per_s: g.overall_bytes_per_s,
            steadiness: g.steadiness,
            trend: g.trend,
            oldest_age_s: a.oldest_ns as f64 / 1e9,
            linkage: link,
            estimate: r.estimate,
        });
    }
    analysis::rank(&mut suspects);
    suspects.truncate(MAX_SUSPECTS);

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
    Report {
        pyleak_version: env!("CARGO_PKG_VERSION").to_owned(),
        duration_s: opts.duration_s,
        processes: {
            // Targets, then any process the kernel counted that userspace never saw (a
            // short-lived fork in a traced cgroup).
            let mut pids = rec.targets.clone();
            let mut extra: Vec<u32> = rows
                .iter()
                .map(|s| s.pid)
                .filter(|p| !pids.contains(p))
                .collect();
            extra.sort_unstable();
            extra.dedup();
            pids.extend(extra);
            pids.into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    comm: rec.comm(pid),
                    cgroup: rec.cgroups.get(&pid).cloned(),
                    python: rec.pythons.get(&pid).cloned(),
                })
                .collect()
        },
        layers,
        stacks: rows,
        lost_events: lost.values().sum(),
        lost,
        probes: rec
            .probes
            .iter()
            .map(|p| ProbeInfo {
                file: p.path.display().to_string(),
                symbol: p.symbol.to_owned(),
                offset: p.delta_from_entry,
                emulated: p.emulated,
            })
            .collect(),
        min_age_s: opts.min_age_s,
        interval_s: opts.interval_s,
        samples: timeline.len(),
        suspects,
        linkage,
        probe_links: if rec.multi_links() {
            "multi-uprobe"
        } else {
            "perf-event"
        }
        .to_owned(),
        probes_attach_s: rec.attach_s,
        // Set once the probes are detached, after the report is built.
        probes_detach_s: 0.0,
        sampled_pymalloc: snap.sampled.as_ref().map(|sp| SampledReport {
            mode: "sampled".to_owned(),
            windows: sp.windows,
            window_open_s: sp.open_s,
            inclusion: sp.duty.iter().map(|(&p, &d)| (p, d)).collect(),
            samples: sp.samples,
            freed: sp.freed,
            reused: sp.reused,
            unreadable: sp.unreadable,
            capped: sp.full,
        }),
    }
}

/// Writes the flamegraph `-o` asks for: an SVG when the path ends in `.svg`, else folded.
pub fn write_flamegraph(
    report: &Report,
    metric: folded::Metric,
    per_process: bool,
    path: &std::path::Path,
    f: &mut std::fs::File,
) -> Result<(), UserError> {
    use std::io::Write as _;
    let svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    let mut out = std::io::BufWriter::new(f);
    if svg {
        folded::write_svg(report, metric, per_process, &mut out)
    } else {
        folded::write(report, metric, per_process, &mut out)
    }
    .and_then(|()| out.flush())
    .map_err(|e| UserError::Output {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// `pyleak report FILE.json`: the text summary again, and a flamegraph with `-o`.
pub fn rerender(args: &ReportArgs) -> anyhow::Result<i32> {
    let bad = |reason: String| UserError::BadReport {
        path: args.input.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&args.input).map_err(|e| bad(e.to_string()))?;
    let report: Report = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut out = args
        .output
        .as_deref()
        .map(|p| {
            std::fs::File::create(p).map_err(|e| UserError::Output {
                path: p.to_owned(),
                reason: e.to_string(),
            })
        })
        .transpose()?;
    text::write(&report, &mut std::io::stdout().lock())?;
    if let (Some(f), Some(path)) = (out.as_mut(), args.output.as_deref()) {
        write_flamegraph(&report, args.metric, args.per_process, path, f)?;
    }
    Ok(0)
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

/// The frames of an interned stack, as reports show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackFrames {
    /// Root first.
    pub names: Vec<String>,
    /// Whether Python frames were cut off (the first name is then `[truncated]`).
    pub truncated: bool,
    /// How many names, at the leaf end, are native frames.
    pub native: usize,
}

/// Marks a native frame under Python frames.
pub const NATIVE_MARK: &str = " [native]";

/// Frames of an interned stack, root first: the Python frames when there are any (then,
/// with `native`, the native frames below the leaf Python frame, marked [`NATIVE_MARK`]),
/// else the native frames.
pub fn frames_of(
    rec: &Recorder,
    syms: &Symbolizer,
    py: &Resolver,
    native: bool,
    pid: u32,
    stack_id: u64,
) -> StackFrames {
    let lost = || StackFrames {
        names: vec!["[stack lost]".to_owned()],
        truncated: false,
        native: 0,
    };
    if stack_id == 0 {
        return lost();
    }
    let Some(st) = rec.stack(stack_id) else {
        return lost();
    };
    let n = (st.py_len as usize).min(st.py.len());
    let truncated = st.flags & STACK_PY_TRUNCATED != 0;
    if n == 0 {
        let names = native_frames(syms, pid, &st);
        let native = names.len();
        return StackFrames {
            names,
            truncated,
            native,
        };
    }
    let mut names: Vec<String> = Vec::with_capacity(n + 1);
    if truncated {
        names.push("[truncated]".to_owned());
    }
    names.extend(
        st.py[..n]
            .iter()
            .enumerate()
            .rev()
            .map(|(i, f)| py.frame(pid, stack_id, i, f)),
    );
    let mut below = Vec::new();
    if native {
        below = under_python(native_frames(syms, pid, &st));
        names.extend(below.iter().map(|f| format!("{f}{NATIVE_MARK}")));
    }
    StackFrames {
        names,
        truncated,
        native: below.len(),
    }
}

/// Of a thread's native frames (root first), those under its leaf Python frame: the ones
/// below the leaf-most frame of CPython's eval loop. The eval loop and everything above it
/// (the interpreter's own calls between Python frames, `main`) are what the Python frames
/// stand for, so they are trimmed; the leaf, the allocator's caller, always stays (the
/// eval loop itself when it allocated). A frame-pointer walk seldom gets that far (CPython
/// and libffi are built without frame pointers here), and then every frame is kept.
pub fn under_python(frames: Vec<String>) -> Vec<String> {
    let is_eval_loop = |f: &String| {
        let name = f.split_once(" (").map_or(f.as_str(), |(n, _)| n);
        name.starts_with("_PyEval_EvalFrame") || name.starts_with("PyEval_EvalFrame")
    };
    let above_leaf = &frames[..frames.len().saturating_sub(1)];
    match above_leaf.iter().rposition(is_eval_loop) {
        Some(i) => frames[i + 1..].to_vec(),
        None => frames,
    }
}

/// Native frames of a stack, root first.
pub fn native_frames(syms: &Symbolizer, pid: u32, st: &StackTrace) -> Vec<String> {
    let n = (st.native_len as usize).min(st.native.len());
    let leaf_is_ip = st.flags & STACK_LEAF_IS_IP != 0;
    let mut out = Vec::with_capacity(n);
    for (i, &ip) in st.native[..n].iter().enumerate() {
        // Past the first frame, an address outside every mapping of code means the
        // frame-pointer walk went astray (code without frame pointers): the rest is noise.
        if i > 0 && !syms.is_code(pid, ip) {
            break;
        }
        out.push(syms.frame(pid, ip, !(i == 0 && leaf_is_ip)));
    }
    out.reverse();
    out
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

/// `12.3 MiB` and friends.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small report with Python, mixed and native stacks, as `record` builds them.
    fn sample() -> Report {
        let stack = |layer: &str, frames: &[&str], live: u64, alloc: u64, n: u64| StackReport {
            estimate: None,
            layer: layer.to_owned(),
            pid: 42,
            frames: frames.iter().map(|f| (*f).to_owned()).collect(),
            native_frames: frames.iter().filter(|f| f.ends_with(NATIVE_MARK)).count(),
            live_bytes: live,
            live_count: n,
            alloc_bytes: alloc,
            allocs: n + 1,
            frees: 1,
            freed_bytes: alloc - live,
            truncated: frames.first() == Some(&"[truncated]"),
            aged_live_bytes: live / 2,
            growth_bytes_per_s: 0.0,
        };
        let mut layers = BTreeMap::new();
        for layer in Layer::ALL {
            layers.insert(
                layer.name().to_owned(),
                LayerReport {
                    allocs: 3,
                    alloc_bytes: 4096,
                    live_bytes: 1024,
                    live_count: 1,
                    lifetime_percentiles_us: BTreeMap::from([
                        ("p50".to_owned(), 850),
                        ("p99".to_owned(), 3_400_000),
                    ]),
                    ..Default::default()
                },
            );
        }
        Report {
            pyleak_version: "0.1.0".to_owned(),
            duration_s: 1.5,
            processes: vec![
                ProcessInfo {
                    pid: 42,
                    comm: "python3".to_owned(),
                    cgroup: Some("/system.slice/app.service".to_owned()),
                    python: Some("3.12".to_owned()),
                },
                ProcessInfo {
                    pid: 43,
                    comm: "a.out".to_owned(),
                    cgroup: None,
                    python: None,
                },
            ],
            layers,
            stacks: vec![
                stack(
                    "pymalloc",
                    &[
                        "<module> (/srv/app.py:73)",
                        "main (/srv/app.py:56)",
                        "leak (/srv/app.py:26)",
                    ],
                    4000400,
                    4000500,
                    400,
                ),
                stack(
                    "libc",
                    &[
                        "<module> (/srv/app.py:73)",
                        "main (/srv/app.py:56)",
                        "leak (/srv/app.py:26)",
                        "PyObject_Malloc (libpython3.12.so) [native]",
                    ],
                    4000400,
                    4000400,
                    400,
                ),
                stack(
                    "pages",
                    &[
                        "[truncated]",
                        "recurse (/srv/app.py:48)",
                        "recurse (/srv/app.py:46)",
                    ],
                    8192,
                    12288,
                    2,
                ),
                StackReport {
                    native_frames: 2,
                    ..stack(
                        "vm",
                        &["main (alloc_workload)", "__mmap (libc.so.6)"],
                        0,
                        40960,
                        0,
                    )
                },
                StackReport {
                    pid: 43,
                    native_frames: 1,
                    ..stack("libc", &["weird;name (a.out)"], 7, 7, 1)
                },
            ],
            lost_events: 0,
            lost: BTreeMap::from([("ring_full".to_owned(), 0)]),
            probes: vec![ProbeInfo {
                file: "/lib/libc.so.6".to_owned(),
                symbol: "free".to_owned(),
                offset: 3,
                emulated: true,
            }],
            min_age_s: 1.0,
            interval_s: 2.0,
            samples: 12,
            probe_links: "multi-uprobe".to_owned(),
            probes_attach_s: 0.25,
            probes_detach_s: 0.5,
            sampled_pymalloc: None,
            suspects: vec![
                Suspect {
                    estimate: None,
                    layer: "pymalloc".to_owned(),
                    pid: 42,
                    frames: vec![
                        "<module> (/srv/app.py:73)".to_owned(),
                        "main (/srv/app.py:56)".to_owned(),
                        "leak (/srv/app.py:26)".to_owned(),
                    ],
                    native_frames: 0,
                    live_bytes: 4000400,
                    live_count: 400,
                    aged_live_bytes: 3000300,
                    aged_live_count: 300,
                    growth_bytes_per_s: 100010.0,
                    overall_growth_bytes_per_s: 100000.0,
                    steadiness: 1.0,
                    trend: Trend::Growing,
                    oldest_age_s: 23.5,
                    linkage: SuspectLinkage {
                        pymalloc_live_bytes: 4000400,
                        libc_live_bytes: 4000400,
                        resident_bytes: 4001792,
                        ..Default::default()
                    },
                },
                Suspect {
                    estimate: None,
                    layer: "pages".to_owned(),
                    pid: 42,
                    frames: vec!["recurse (/srv/app.py:48)".to_owned()],
                    native_frames: 0,
                    live_bytes: 8192,
                    live_count: 2,
                    aged_live_bytes: 8192,
                    aged_live_count: 2,
                    growth_bytes_per_s: 0.0,
                    overall_growth_bytes_per_s: 300.0,
                    steadiness: 0.0,
                    trend: Trend::Plateau,
                    oldest_age_s: 20.0,
                    linkage: SuspectLinkage {
                        resident_bytes: 8192,
                        ..Default::default()
                    },
                },
            ],
            linkage: Linkage {
                pymalloc_live_bytes: 4100000,
                pymalloc_small_live_bytes: 99600,
                pymem_raw_live_bytes: 5000,
                arena_count: 3,
                arena_bytes: 3 << 20,
                arena_resident_bytes: 2 << 20,
                fragmentation_ratio: Some((3 << 20) as f64 / 99600.0),
                libc_live_bytes: 4100000,
                libc_for_python_live_bytes: 4000400,
                vm_live_bytes: 8 << 20,
                vm_by_kind: BTreeMap::from([
                    ("pymalloc_arena".to_owned(), 3 << 20),
                    ("malloc_heap".to_owned(), 5 << 20),
                ]),
                resident_bytes: 7 << 20,
                resident_by_kind: BTreeMap::from([
                    ("pymalloc_arena".to_owned(), 2 << 20),
                    ("malloc_heap".to_owned(), 5 << 20),
                ]),
            },
        }
    }

    fn golden(name: &str, got: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/report/golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).expect("writing golden file");
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", path.display()));
        assert_eq!(got, want, "output differs from {}", path.display());
    }

    #[test]
    fn folded_matches_golden_files() {
        for (metric, file) in [
            (folded::Metric::LiveBytes, "live-bytes.folded"),
            (folded::Metric::AllocBytes, "alloc-bytes.folded"),
            (folded::Metric::Allocs, "allocs.folded"),
            (folded::Metric::Resident, "resident.folded"),
        ] {
            let mut out = Vec::new();
            folded::write(&sample(), metric, false, &mut out).unwrap();
            golden(file, &String::from_utf8(out).unwrap());
        }
        let mut out = Vec::new();
        folded::write(&sample(), folded::Metric::LiveBytes, true, &mut out).unwrap();
        golden("per-process.folded", &String::from_utf8(out).unwrap());
    }

    #[test]
    fn native_frames_under_python_stop_at_the_leaf_eval_loop() {
        let v = |f: &[&str]| f.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // A walk through a CPython built with frame pointers: the eval loop of the leaf
        // Python frame and all above it are the Python frames; below it stays.
        let walked = v(&[
            "_start (python3.12)",
            "Py_RunMain (libpython3.12.so.1.0)",
            "_PyEval_EvalFrameDefault (libpython3.12.so.1.0)",
            "_PyFunction_Vectorcall (libpython3.12.so.1.0)",
            "_PyEval_EvalFrameDefault.cold (libpython3.12.so.1.0)",
            "PyCFuncPtr_call (_ctypes.cpython-312-x86_64-linux-gnu.so)",
            "ffi_call_unix64 (libffi.so.8)",
            "leak_outer (libleak.so)",
            "leak_inner (libleak.so)",
        ]);
        assert_eq!(
            under_python(walked),
            v(&[
                "PyCFuncPtr_call (_ctypes.cpython-312-x86_64-linux-gnu.so)",
                "ffi_call_unix64 (libffi.so.8)",
                "leak_outer (libleak.so)",
                "leak_inner (libleak.so)",
            ])
        );
        // 3.8-3.10 and a walk that never reaches the eval loop (no frame pointers there).
        assert_eq!(
            under_python(v(&["PyEval_EvalFrameEx (libpython2.7.so)", "f (x.so)"])),
            v(&["f (x.so)"])
        );
        let short = v(&["0x6f79 (libffi.so.8.1.2)", "leak_inner (libleak.so)"]);
        assert_eq!(under_python(short.clone()), short);
        // An allocation the eval loop made itself: the leaf stays.
        assert_eq!(
            under_python(v(&[
                "_PyEval_EvalFrameDefault (python3.11)",
                "_PyEval_EvalFrameDefault (python3.11)"
            ])),
            v(&["_PyEval_EvalFrameDefault (python3.11)"])
        );
        assert!(under_python(Vec::new()).is_empty());
    }

    #[test]
    fn text_matches_golden_file() {
        let mut out = Vec::new();
        text::write(&sample(), &mut out).unwrap();
        golden("summary.txt", &String::from_utf8(out).unwrap());
    }

    #[test]
    fn json_matches_golden_file_and_round_trips() {
        let text = serde_json::to_string_pretty(&sample()).unwrap() + "\n";
        golden("report.json", &text);
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn svg_is_titled_with_metric_and_layers() {
        let mut svg = Vec::new();
        folded::write_svg(&sample(), folded::Metric::Resident, false, &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.starts_with("<?xml"), "an SVG document");
        assert!(
            svg.contains("pyleak: resident by stack (pages)"),
            "title names the metric and the one layer with resident pages"
        );
        assert!(svg.contains("recurse (/srv/app.py:48)"));
        assert!(
            !svg.contains("[libc]"),
            "resident counts the pages layer only"
        );
    }

    #[test]
    fn folded_renders_with_inferno() {
        let mut out = Vec::new();
        folded::write(&sample(), folded::Metric::AllocBytes, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut svg = Vec::new();
        let mut opts = inferno::flamegraph::Options::default();
        inferno::flamegraph::from_lines(&mut opts, text.lines(), &mut svg)
            .expect("inferno renders the folded stacks");
        let svg = String::from_utf8(svg).unwrap();
        assert!(
            svg.contains("leak (/srv/app.py:26)") && svg.contains("[pymalloc]"),
            "frames drawn"
        );
    }
}
