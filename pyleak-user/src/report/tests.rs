//! Golden files for every output format, from one small analysis.

use std::collections::BTreeMap;

use pyleak_common::Layer;

use super::{drawn::LayerChoice, folded, pprof, speedscope, svg, text, Metric, Render};
use crate::{
    analysis::{growth::Trend, *},
    collect::frames::NATIVE_MARK,
};

/// A small report with Python, mixed and native stacks, as `record` builds them.
fn sample() -> Analysis {
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
    Analysis {
        pyleak_version: "0.1.0".to_owned(),
        duration_s: 1.5,
        command_exit: None,
        processes: vec![
            ProcessInfo {
                pid: 42,
                comm: "python3".to_owned(),
                cgroup: Some("/system.slice/app.service".to_owned()),
                python: Some("3.12".to_owned()),
                followed: None,
            },
            ProcessInfo {
                pid: 43,
                comm: "a.out".to_owned(),
                cgroup: None,
                python: None,
                followed: None,
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
        census: None,
        sampled_pymalloc: None,
        retired: None,
        suspects: vec![
            Suspect {
                estimate: None,
                held_by: Vec::new(),
                note: None,
                full_stacks: vec![FullStack {
                    frames: vec![
                        "<module> (/srv/app.py:73)".to_owned(),
                        "main (/srv/app.py:56)".to_owned(),
                        "leak (/srv/app.py:26)".to_owned(),
                        "copy (/usr/lib/python3.12/copy.py:71)".to_owned(),
                    ],
                    native_frames: 0,
                    live_bytes: 4000400,
                }],
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
                    live: LayerBytes([4000400, 0, 4000400, 0, 4001792]),
                    ..Default::default()
                },
            },
            Suspect {
                estimate: None,
                held_by: Vec::new(),
                note: None,
                full_stacks: Vec::new(),
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
                    live: LayerBytes([0, 0, 0, 0, 8192]),
                    ..Default::default()
                },
            },
        ],
        startup: vec![Suspect {
            estimate: None,
            held_by: Vec::new(),
            note: None,
            full_stacks: Vec::new(),
            layer: "pymalloc".to_owned(),
            pid: 42,
            frames: vec![
                "<module> (/srv/app.py:1)".to_owned(),
                "_find_and_load (<frozen importlib._bootstrap>:1360)".to_owned(),
                "<module> (/usr/lib/python3.12/json/decoder.py:30)".to_owned(),
            ],
            native_frames: 0,
            live_bytes: 300000,
            live_count: 900,
            aged_live_bytes: 300000,
            aged_live_count: 900,
            growth_bytes_per_s: 0.0,
            overall_growth_bytes_per_s: 0.0,
            steadiness: 0.0,
            trend: Trend::Flat,
            oldest_age_s: 1.4,
            linkage: SuspectLinkage::default(),
        }],
        peak: vec![Peak {
            layer: "libc".to_owned(),
            t_s: 3.5,
            live_bytes: 104 << 20,
            layers_then: BTreeMap::from([
                ("libc".to_owned(), 104 << 20),
                ("pages".to_owned(), 105 << 20),
            ]),
            stacks: vec![PeakStack {
                pid: 42,
                frames: vec![
                    "<module> (/srv/pool.py:40)".to_owned(),
                    "work (/srv/pool.py:18)".to_owned(),
                ],
                native_frames: 0,
                live_bytes: 100 << 20,
            }],
        }],
        copy_on_write: vec![CopyOnWrite {
            pid: 4343,
            parent: Some(42),
            bytes: 14 << 20,
            pages: 3584,
            live_bytes: 14 << 20,
            stacks: vec![CowStack {
                frames: vec![
                    "child (/srv/prefork.py:30)".to_owned(),
                    "make_private (/srv/prefork.py:22)".to_owned(),
                ],
                native_frames: 0,
                bytes: 14 << 20,
                pages: 3584,
            }],
        }],
        retention: vec![Retention {
            pid: 4242,
            kind: "malloc_arena".to_owned(),
            resident_bytes: 160 << 20,
            used_bytes: 393224,
            used_estimated: false,
            retained_bytes: (160 << 20) - 393224,
            stacks: vec![RetentionStack {
                frames: vec![
                    "Thread.run (/usr/lib/python3.12/threading.py:1010)".to_owned(),
                    "churn (/srv/worker.py:24)".to_owned(),
                ],
                native_frames: 0,
                resident_bytes: 160 << 20,
            }],
            gives_back: "malloc_trim(0) (every arena), MALLOC_ARENA_MAX=2".to_owned(),
        }],
        linkage: Linkage {
            // pymalloc, pymem_raw, libc, vm, pages
            live: LayerBytes([4100000, 5000, 4100000, 8 << 20, 7 << 20]),
            pymalloc_small_live_bytes: 99600,
            arena_count: 3,
            arena_bytes: 3 << 20,
            arena_resident_bytes: 2 << 20,
            fragmentation_ratio: Some((3 << 20) as f64 / 99600.0),
            libc_for_python_live_bytes: 4000400,
            vm_by_kind: BTreeMap::from([
                ("pymalloc_arena".to_owned(), 3 << 20),
                ("malloc_heap".to_owned(), 5 << 20),
            ]),
            resident_by_kind: BTreeMap::from([
                ("pymalloc_arena".to_owned(), 2 << 20),
                ("malloc_heap".to_owned(), 5 << 20),
            ]),
            resident_bulk_bytes: 1 << 20,
        },
    }
}

/// Every layer side by side (`--layer all`), as folded output was before one layer
/// became the default.
fn all_layers(metric: Metric, per_process: bool) -> Render {
    Render {
        metric,
        layer: LayerChoice::All,
        per_process,
    }
}

/// One layer, the default.
fn default_layer(metric: Metric) -> Render {
    Render {
        metric,
        layer: LayerChoice::Default,
        per_process: false,
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
        (Metric::LiveBytes, "live-bytes.folded"),
        (Metric::AllocBytes, "alloc-bytes.folded"),
        (Metric::Allocs, "allocs.folded"),
        (Metric::Resident, "resident.folded"),
    ] {
        let mut out = Vec::new();
        folded::write(&sample(), &all_layers(metric, false), &mut out).unwrap();
        golden(file, &String::from_utf8(out).unwrap());
    }
    let mut out = Vec::new();
    folded::write(&sample(), &all_layers(Metric::LiveBytes, true), &mut out).unwrap();
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
    let back: Analysis = serde_json::from_str(&text).unwrap();
    assert_eq!(back, sample());
}

#[test]
fn svg_is_titled_with_metric_and_layers() {
    let mut svg = Vec::new();
    svg::write(&sample(), &default_layer(Metric::Resident), &mut svg).unwrap();
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
    folded::write(&sample(), &all_layers(Metric::AllocBytes, false), &mut out).unwrap();
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

#[test]
fn by_default_one_layer_is_drawn_and_the_title_says_what_counts() {
    let mut out = Vec::new();
    folded::write(&sample(), &default_layer(Metric::LiveBytes), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    golden("default.folded", &text);
    assert!(
        text.lines().all(|l| l.starts_with("[pymalloc];")),
        "the Python-requested layer alone: {text}"
    );
    let mut svg = Vec::new();
    svg::write(&sample(), &default_layer(Metric::LiveBytes), &mut svg).unwrap();
    let svg = String::from_utf8(svg).unwrap();
    assert!(svg.contains("pyleak: live-bytes by stack (pymalloc)"));
    assert!(svg.contains("each byte once"));
    assert!(!svg.contains("[libc]"));
    // A program without Python: its malloc blocks.
    let mut c = sample();
    c.stacks.retain(|s| s.layer != "pymalloc");
    let mut out = Vec::new();
    folded::write(&c, &default_layer(Metric::LiveBytes), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        !text.is_empty() && text.lines().all(|l| l.starts_with("[libc];")),
        "{text}"
    );
    // --layer names one.
    let vm = Render {
        layer: LayerChoice::parse(Some("vm")).unwrap(),
        ..default_layer(Metric::AllocBytes)
    };
    let mut out = Vec::new();
    folded::write(&sample(), &vm, &mut out).unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "[vm];main (alloc_workload);__mmap (libc.so.6) 40960\n"
    );
    assert!(LayerChoice::parse(Some("heap")).is_err());
}

#[test]
fn svg_matches_golden_file() {
    let mut svg = Vec::new();
    svg::write(&sample(), &default_layer(Metric::LiveBytes), &mut svg).unwrap();
    golden("default.svg", &String::from_utf8(svg).unwrap());
}

#[test]
fn pprof_reads_back_with_every_sample_type_and_python_lines() {
    use prost::Message as _;
    let mut gz = Vec::new();
    pprof::write(&sample(), &default_layer(Metric::LiveBytes), &mut gz).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzipped");
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
    let p = pprof::Profile::decode(&raw[..]).expect("a profile.proto message");
    golden("pprof.txt", &format!("{p:#?}\n"));
    let s = |i: i64| p.string_table[i as usize].as_str();
    assert_eq!(s(0), "");
    let types: Vec<(&str, &str)> = p
        .sample_type
        .iter()
        .map(|t| (s(t.r#type), s(t.unit)))
        .collect();
    assert_eq!(
        types,
        [
            ("inuse_space", "bytes"),
            ("inuse_objects", "count"),
            ("alloc_space", "bytes"),
            ("alloc_objects", "count")
        ]
    );
    assert_eq!(s(p.default_sample_type), "inuse_space");
    // One layer: the pymalloc stack, leaf first, with file and line.
    assert_eq!(p.sample.len(), 1);
    assert_eq!(p.sample[0].value, [4000400, 400, 4000500, 401]);
    let leaf = &p.location[p.sample[0].location_id[0] as usize - 1];
    let f = &p.function[leaf.line[0].function_id as usize - 1];
    assert_eq!(
        (s(f.name), s(f.filename), leaf.line[0].line),
        ("leak", "/srv/app.py", 26)
    );
}

#[test]
fn speedscope_has_the_schemas_required_fields() {
    let mut out = Vec::new();
    speedscope::write(&sample(), &all_layers(Metric::LiveBytes, false), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    golden("speedscope.json", &text);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    // Required by the schema: the file's $schema, shared.frames, profiles; each frame's
    // name; each sampled profile's type, name, unit, startValue, endValue, samples,
    // weights.
    assert_eq!(v["$schema"], speedscope::SCHEMA);
    let frames = v["shared"]["frames"].as_array().expect("shared.frames");
    assert!(frames.iter().all(|f| f["name"].is_string()));
    let profiles = v["profiles"].as_array().expect("profiles");
    assert_eq!(profiles.len(), 1);
    let p = &profiles[0];
    for field in [
        "type",
        "name",
        "unit",
        "startValue",
        "endValue",
        "samples",
        "weights",
    ] {
        assert!(!p[field].is_null(), "profile lacks {field}");
    }
    assert_eq!(p["type"], "sampled");
    assert!([
        "none",
        "nanoseconds",
        "microseconds",
        "milliseconds",
        "seconds",
        "bytes"
    ]
    .contains(&p["unit"].as_str().unwrap()));
    let samples = p["samples"].as_array().unwrap();
    let weights = p["weights"].as_array().unwrap();
    assert_eq!(samples.len(), weights.len());
    for s in samples {
        for i in s.as_array().unwrap() {
            assert!(
                (i.as_u64().unwrap() as usize) < frames.len(),
                "frame index in range"
            );
        }
    }
    let total: u64 = weights.iter().map(|w| w.as_u64().unwrap()).sum();
    assert_eq!(p["endValue"].as_u64(), Some(total));
    // Python frames carry file and line.
    assert!(frames
        .iter()
        .any(|f| f["name"] == "leak" && f["file"] == "/srv/app.py" && f["line"] == 26));
}
