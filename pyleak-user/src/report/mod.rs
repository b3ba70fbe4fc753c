//! The report: what is live at the end of a recording, per layer and per stack, and the
//! formats it is written in (one module each).

pub mod folded;
pub mod text;

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use pyleak_common::{
    bucket_low, Layer, StackTrace, HIST_BUCKETS, STACK_LEAF_IS_IP, STACK_PY_TRUNCATED,
};
use serde::{Deserialize, Serialize};

use crate::{
    collect::{Recorder, Snapshot},
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
}

/// One (process, layer, stack).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StackReport {
    /// Layer name.
    pub layer: String,
    /// Process id.
    pub pid: u32,
    /// Frames, root first: Python `qualname (path:line)`, native `symbol (module)`.
    pub frames: Vec<String>,
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

/// Builds the report from what the kernel and the vm model hold.
pub fn build(
    rec: &Recorder,
    snap: &Snapshot,
    syms: &Symbolizer,
    py: &Resolver,
    native: bool,
    duration_s: f64,
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
                }
            }
            _ => {
                let s = snap.layer_stats[layer as usize];
                let mut h = new_histogram();
                for (b, &n) in snap.size_hist[layer as usize]
                    .iter()
                    .enumerate()
                    .take(HIST_BUCKETS)
                {
                    if n > 0 {
                        let _ = h.record_n(bucket_low(b).max(1), n);
                    }
                }
                LayerReport {
                    allocs: s.allocs,
                    frees: s.frees,
                    alloc_bytes: s.alloc_bytes,
                    freed_bytes: s.freed_bytes,
                    live_count: s.allocs.saturating_sub(s.frees),
                    live_bytes: s.alloc_bytes.saturating_sub(s.freed_bytes),
                    unmatched_frees: s.unmatched_frees,
                    failed_allocs: s.failed_allocs,
                    size_percentiles: percentiles(&h),
                }
            }
        };
        layers.insert(layer.name().to_owned(), r);
    }

    let live_regions = rec.model.live_regions();
    let live_pages = rec.model.live_pages();
    let mut frames_cache: BTreeMap<(u32, u64), (Vec<String>, bool)> = BTreeMap::new();
    let mut stacks = Vec::new();
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
        let (frames, truncated) = frames_cache
            .entry((pid, stack_id))
            .or_insert_with(|| frames_of(rec, syms, py, native, pid, stack_id))
            .clone();
        stacks.push(StackReport {
            layer: layer.name().to_owned(),
            pid,
            frames,
            live_bytes,
            live_count,
            alloc_bytes: agg.alloc_bytes,
            allocs: agg.allocs,
            frees: agg.frees,
            freed_bytes: agg.freed_bytes,
            truncated,
        });
    }
    stacks.sort_by(|a, b| {
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
        duration_s,
        processes: {
            // Targets, then any process the kernel counted that userspace never saw (a
            // short-lived fork in a traced cgroup).
            let mut pids = rec.targets.clone();
            let mut extra: Vec<u32> = stacks
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
        stacks,
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
    }
}

/// Frames of an interned stack, root first: the Python frames when there are any (then,
/// with `native`, the native frames below them), else the native frames.
fn frames_of(
    rec: &Recorder,
    syms: &Symbolizer,
    py: &Resolver,
    native: bool,
    pid: u32,
    stack_id: u64,
) -> (Vec<String>, bool) {
    if stack_id == 0 {
        return (vec!["[stack lost]".to_owned()], false);
    }
    let Some(st) = rec.stack(stack_id) else {
        return (vec!["[stack lost]".to_owned()], false);
    };
    let n = (st.py_len as usize).min(st.py.len());
    let truncated = st.flags & STACK_PY_TRUNCATED != 0;
    if n == 0 {
        return (native_frames(syms, pid, &st), truncated);
    }
    let mut frames: Vec<String> = Vec::with_capacity(n + 1);
    if truncated {
        frames.push("[truncated]".to_owned());
    }
    frames.extend(st.py[..n].iter().rev().map(|f| py.frame(pid, f)));
    if native {
        frames.extend(
            native_frames(syms, pid, &st)
                .into_iter()
                .map(|f| format!("{f} [native]")),
        );
    }
    (frames, truncated)
}

/// Native frames of a stack, root first.
pub fn native_frames(syms: &Symbolizer, pid: u32, st: &StackTrace) -> Vec<String> {
    let n = (st.native_len as usize).min(st.native.len());
    let leaf_is_ip = st.flags & STACK_LEAF_IS_IP != 0;
    let mut out = Vec::with_capacity(n);
    for (i, &ip) in st.native[..n].iter().enumerate() {
        // Past the first frame, an address outside every mapping means the frame-pointer
        // walk went astray (code without frame pointers): the rest is noise.
        if i > 0 && !syms.is_mapped(pid, ip) {
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
            layer: layer.to_owned(),
            pid: 42,
            frames: frames.iter().map(|f| (*f).to_owned()).collect(),
            live_bytes: live,
            live_count: n,
            alloc_bytes: alloc,
            allocs: n + 1,
            frees: 1,
            freed_bytes: alloc - live,
            truncated: frames.first() == Some(&"[truncated]"),
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
                stack(
                    "vm",
                    &["main (alloc_workload)", "__mmap (libc.so.6)"],
                    0,
                    40960,
                    0,
                ),
                StackReport {
                    pid: 43,
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
