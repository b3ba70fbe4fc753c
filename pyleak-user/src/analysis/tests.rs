//! The analysis from a recording made in code: no root, no kernel. One Python process
//! that leaks from one line, frees what another allocates, and maps an anonymous region
//! by hand; a second process the kernel counted that userspace never saw.

use std::collections::{BTreeMap, HashMap};

use pyleak_common::{
    Layer, LayerStats, StackAgg, VmEvent, VmKind, FLAG_FOR_PYMALLOC, HIST_BUCKETS, NUM_LAYERS,
};

use super::*;
use crate::collect::{frames::StackFrames, vm::PAGE, Ages, Snapshot};

const PID: u32 = 42;
/// The leak: `leak (/srv/app.py:26)`, at two stack ids (two native callers under it).
const LEAK: u64 = 1;
const LEAK_TOO: u64 = 2;
/// A line whose memory is freed.
const CHURN: u64 = 3;
/// A hand-made anonymous mapping.
const MAPPER: u64 = 4;
/// pymalloc's arena under the leak.
const ARENA: u64 = 5;
/// An import at start-up.
const IMPORT: u64 = 6;
/// The interpreter's own start-up (no Python frame).
const INIT: u64 = 7;
const MIB: u64 = 1 << 20;

fn py(frames: &[&str]) -> StackFrames {
    StackFrames {
        names: frames.iter().map(|f| (*f).to_owned()).collect(),
        truncated: false,
        native: 0,
    }
}

fn agg(alloc_bytes: u64, allocs: u64, freed_bytes: u64, frees: u64) -> StackAgg {
    StackAgg {
        allocs,
        alloc_bytes,
        frees,
        freed_bytes,
    }
}

fn aged(bytes: u64, count: u64, aged_bytes: u64, aged_count: u64, oldest_s: u64) -> Ages {
    Ages {
        aged_bytes,
        aged_count,
        oldest_ns: oldest_s * 1_000_000_000,
        youngest_ns: 0,
        bytes,
        count,
    }
}

fn vm_event(kind: VmKind, addr: u64, len: u64, arg: u64, stack_id: u64, flags: u32) -> VmEvent {
    VmEvent {
        kind: kind as u32,
        tgid: PID,
        addr,
        len,
        arg,
        arg2: 0,
        stack_id,
        ts_ns: 1_000_000_000,
        flags,
        tid: PID,
    }
}

/// What `record` would have gathered.
fn recording() -> (Snapshot, VmModel, Facts, Timeline<StackSlot>) {
    let mut stacks = HashMap::new();
    stacks.insert((PID, Layer::Pymalloc, LEAK), agg(3 * MIB, 3000, 0, 0));
    stacks.insert((PID, Layer::Pymalloc, LEAK_TOO), agg(MIB, 1000, 0, 0));
    stacks.insert(
        (PID, Layer::Pymalloc, CHURN),
        agg(8 * MIB, 8000, 8 * MIB, 8000),
    );
    stacks.insert((PID, Layer::Libc, LEAK), agg(2 * MIB, 2, 0, 0));
    stacks.insert((PID, Layer::Pymalloc, IMPORT), agg(300_000, 900, 0, 0));
    stacks.insert((PID, Layer::Pymalloc, INIT), agg(200_000, 500, 0, 0));
    // A process the kernel counted (a short-lived fork) that userspace never saw.
    stacks.insert((PID + 1, Layer::Libc, 9), agg(4096, 1, 0, 0));
    let mut layer_stats = [LayerStats::default(); NUM_LAYERS];
    layer_stats[Layer::Pymalloc as usize] = LayerStats {
        allocs: 12000,
        alloc_bytes: 12 * MIB,
        frees: 8000,
        freed_bytes: 8 * MIB,
        unmatched_frees: 7,
        failed_allocs: 0,
        reused: 0,
    };
    layer_stats[Layer::Libc as usize] = LayerStats {
        allocs: 3,
        alloc_bytes: 2 * MIB + 4096,
        ..LayerStats::default()
    };
    let mut ages = HashMap::new();
    ages.insert(
        (PID, Layer::Pymalloc, LEAK),
        aged(3 * MIB, 3000, 2 * MIB, 2000, 9),
    );
    ages.insert(
        (PID, Layer::Pymalloc, LEAK_TOO),
        aged(MIB, 1000, MIB, 1000, 8),
    );
    ages.insert((PID, Layer::Libc, LEAK), aged(2 * MIB, 2, 2 * MIB, 2, 9));
    ages.insert((PID, Layer::Vm, MAPPER), aged(4 * PAGE, 1, 4 * PAGE, 1, 5));
    // Made between 0.2 and 0.6 s into a 10 s run.
    let startup = Ages {
        youngest_ns: 9_400_000_000,
        ..aged(300_000, 900, 300_000, 900, 9)
    };
    ages.insert((PID, Layer::Pymalloc, IMPORT), startup);
    ages.insert(
        (PID, Layer::Pymalloc, INIT),
        Ages {
            bytes: 200_000,
            count: 500,
            aged_bytes: 200_000,
            aged_count: 500,
            ..startup
        },
    );
    let mut size_hist = vec![vec![0u64; HIST_BUCKETS]; NUM_LAYERS];
    size_hist[Layer::Pymalloc as usize][pyleak_common::size_bucket(1024)] = 12000;
    let mut snap = Snapshot {
        traced: crate::layers::LayerSet::parse("all").unwrap(),
        sampled: None,
        retired: Default::default(),
        layer_stats,
        size_hist,
        stacks,
        drops: BTreeMap::from([("live_allocs_full", 0), ("ring_full", 3)]),
        lifetime_hist: vec![vec![0u64; HIST_BUCKETS]; NUM_LAYERS],
        ages,
        pymalloc_small_live: 512 * 1024,
        libc_for_python_live: 2 * MIB,
        // Live blocks cover half the arena's resident pages and 100 bytes of the heap's.
        used_on_pages: (0..64)
            .map(|i| ((PID, 0x100000 + i * PAGE), PAGE))
            .chain([((PID, 0x900000), 100)])
            .collect(),
    };

    // An arena pymalloc mapped for the leak, half resident; a mapping made by hand, with
    // one page resident; one page of the heap, outside both.
    const ANON: u64 = 0x20;
    let mut model = VmModel::default();
    for ev in [
        vm_event(VmKind::Mmap, 0x100000, MIB, ANON, ARENA, FLAG_FOR_PYMALLOC),
        vm_event(VmKind::Mmap, 0x400000, 4 * PAGE, ANON, MAPPER, 0),
        vm_event(VmKind::Fault, 0x400000, PAGE, 2, MAPPER, 0),
        vm_event(VmKind::Fault, 0x900000, PAGE, 2, CHURN, 0),
    ] {
        model.apply(&ev);
    }
    for i in 0..128 {
        model.apply(&vm_event(
            VmKind::Fault,
            0x100000 + i * PAGE,
            PAGE,
            2,
            ARENA,
            0,
        ));
    }
    // The snapshot holds the vm model's per-stack totals too, as `Recorder::snapshot`
    // reads them.
    snap.stacks
        .extend(model.stacks.iter().map(|(&k, &v)| (k, v)));

    let leak = [
        "<module> (/srv/app.py:73)",
        "main (/srv/app.py:56)",
        "leak (/srv/app.py:26)",
    ];
    let mut facts = Facts {
        targets: vec![PID],
        processes: HashMap::from([(
            PID,
            ProcessInfo {
                pid: PID,
                comm: "python3".to_owned(),
                cgroup: Some("/system.slice/app.service".to_owned()),
                python: Some("3.12".to_owned()),
                followed: None,
            },
        )]),
        probes: vec![ProbeInfo {
            file: "/lib/libc.so.6".to_owned(),
            symbol: "malloc".to_owned(),
            offset: 0,
            emulated: true,
        }],
        frames: HashMap::from([
            ((PID, LEAK), py(&leak)),
            ((PID, LEAK_TOO), py(&leak)),
            ((PID, ARENA), py(&leak)),
            (
                (PID, CHURN),
                py(&["<module> (/srv/app.py:73)", "churn (/srv/app.py:40)"]),
            ),
            (
                (PID, MAPPER),
                py(&["<module> (/srv/app.py:73)", "mapper (/srv/app.py:80)"]),
            ),
            (
                (PID, IMPORT),
                py(&[
                    "<module> (/srv/app.py:1)",
                    "_find_and_load (<frozen importlib._bootstrap>:1360)",
                    "<module> (/usr/lib/python3.12/json/decoder.py:30)",
                ]),
            ),
            (
                (PID, INIT),
                StackFrames {
                    native: 2,
                    ..py(&[
                        "Py_InitializeFromConfig (python3.12)",
                        "_PyObject_Malloc (python3.12)",
                    ])
                },
            ),
        ]),
        probe_links: "multi-uprobe".to_owned(),
        probes_attach_s: 0.25,
        started_s: HashMap::from([(PID, 0.0)]),
        page_kinds: HashMap::from([((PID, 0x900000), MappingKind::MallocHeap)]),
        peaks: Default::default(),
    };

    // The leak grows 100 KiB a second, steadily; the churn stays flat.
    let mut timeline = Timeline::default();
    for i in 0..10u64 {
        let sample = HashMap::from([
            ((PID, Layer::Pymalloc, LEAK), 2 * MIB + i * 100 * 1024),
            // The churn held 4 MiB at 3 s: the peak.
            (
                (PID, Layer::Pymalloc, CHURN),
                if i == 3 { 4 * MIB } else { 64 * 1024 },
            ),
        ]);
        facts.peaks.record(i as f64, &sample);
        timeline.record(i as f64, sample);
    }
    (snap, model, facts, timeline)
}

fn analysis() -> Analysis {
    let (snap, model, facts, timeline) = recording();
    analyze(
        &snap,
        &model,
        &facts,
        &timeline,
        Options {
            duration_s: 10.0,
            min_age_s: 1.0,
            interval_s: 1.0,
            group_libs: true,
        },
    )
}

#[test]
fn layer_totals_come_from_the_kernel_and_the_vm_model() {
    let a = analysis();
    let pymalloc = &a.layers["pymalloc"];
    assert_eq!((pymalloc.live_bytes, pymalloc.live_count), (4 * MIB, 4000));
    assert_eq!(pymalloc.unmatched_frees, 7);
    assert_eq!(pymalloc.size_percentiles["max"], 1024);
    assert_eq!(a.layers["vm"].live_bytes, MIB + 4 * PAGE);
    assert_eq!(a.layers["vm"].live_count, 2);
    assert_eq!(a.layers["pages"].live_bytes, 130 * PAGE);
    assert_eq!(a.lost_events, 3);
}

#[test]
fn stacks_with_the_same_frames_are_one_row() {
    let a = analysis();
    let leak: Vec<&StackReport> = a
        .stacks
        .iter()
        .filter(|s| s.layer == "pymalloc" && s.frames.last().unwrap() == "leak (/srv/app.py:26)")
        .collect();
    assert_eq!(leak.len(), 1, "stack ids 1 and 2 have the same frames");
    assert_eq!((leak[0].live_bytes, leak[0].live_count), (4 * MIB, 4000));
    assert_eq!(leak[0].aged_live_bytes, 3 * MIB);
    // Most live bytes first.
    assert_eq!(a.stacks[0].live_bytes, 4 * MIB);
}

#[test]
fn the_leak_ranks_first_and_its_layers_are_linked() {
    let a = analysis();
    let first = &a.suspects[0];
    assert_eq!(first.layer, "pymalloc");
    assert_eq!(first.trend, growth::Trend::Growing);
    assert!((first.growth_bytes_per_s - 100.0 * 1024.0).abs() < 1.0);
    assert_eq!(first.linkage.live[Layer::Pymalloc], 4 * MIB);
    assert_eq!(first.linkage.live[Layer::Libc], 2 * MIB);
    assert_eq!(first.linkage.arena_bytes, MIB);
    // Its libc row ranks with it, right below.
    assert_eq!(a.suspects[1].layer, "libc");
    assert_eq!(a.suspects[1].frames, first.frames);
    // The churn freed everything: not a suspect. The hand-made mapping is, by age.
    assert!(!a
        .suspects
        .iter()
        .any(|s| s.frames.iter().any(|f| f.contains("churn"))));
    let mapper = a
        .suspects
        .iter()
        .find(|s| s.layer == "vm")
        .expect("the anonymous mapping is a suspect");
    assert_eq!(mapper.live_bytes, 4 * PAGE);
    assert_eq!(mapper.oldest_age_s, 5.0);
}

#[test]
fn linkage_sorts_mappings_and_pages_by_kind() {
    let l = analysis().linkage;
    assert_eq!((l.arena_count, l.arena_bytes), (1, MIB));
    assert_eq!(l.arena_resident_bytes, 128 * PAGE);
    assert_eq!(l.vm_by_kind["pymalloc_arena"], MIB);
    assert_eq!(l.vm_by_kind["anonymous"], 4 * PAGE);
    assert_eq!(l.resident_by_kind["malloc_heap"], PAGE);
    assert_eq!(l.resident_by_kind["anonymous"], PAGE);
    assert_eq!(l.fragmentation_ratio, Some(2.0));
    assert_eq!(l.libc_for_python_live_bytes, 2 * MIB);
}

#[test]
fn processes_are_the_targets_then_those_only_the_kernel_saw() {
    let a = analysis();
    let pids: Vec<(u32, &str)> = a
        .processes
        .iter()
        .map(|p| (p.pid, p.comm.as_str()))
        .collect();
    assert_eq!(pids, [(PID, "python3"), (PID + 1, "?")]);
}

#[test]
fn analysis_matches_golden_file() {
    let text = serde_json::to_string_pretty(&analysis()).unwrap() + "\n";
    let text = text.replace(env!("CARGO_PKG_VERSION"), "VERSION");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/analysis/golden.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).expect("writing golden file");
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", path.display()));
    assert_eq!(text, want, "analysis differs from {}", path.display());
}

#[test]
fn start_up_memory_is_listed_apart_not_ranked() {
    let a = analysis();
    let startup: Vec<(&str, u64)> = a
        .startup
        .iter()
        .map(|s| (s.frames.last().unwrap().as_str(), s.live_bytes))
        .collect();
    assert_eq!(
        startup,
        [
            ("<module> (/usr/lib/python3.12/json/decoder.py:30)", 300_000),
            ("_PyObject_Malloc (python3.12)", 200_000),
        ]
    );
    assert!(
        !a.suspects.iter().any(|s| s
            .frames
            .iter()
            .any(|f| f.contains("importlib") || f.contains("Py_Initialize"))),
        "start-up memory is not a suspect"
    );
    // The same memory in a process pyleak attached to (not traced from its start), or
    // made later, is a suspect.
    let (snap, model, mut facts, timeline) = recording();
    facts.started_s.clear();
    let opts = Options {
        duration_s: 10.0,
        min_age_s: 1.0,
        interval_s: 1.0,
        group_libs: true,
    };
    let attached = analyze(&snap, &model, &facts, &timeline, opts);
    assert!(attached.startup.is_empty());
    assert!(attached.suspects.iter().any(|s| s.live_bytes == 300_000));
    facts.started_s.insert(PID, 0.0);
    let late = analyze(
        &snap,
        &model,
        &facts,
        &timeline,
        Options {
            duration_s: 20.0,
            ..opts
        },
    );
    assert!(late.startup.is_empty(), "made 10 s in: not start-up");
}

#[test]
fn allocator_retention_is_resident_minus_used_per_kind_with_its_stacks() {
    let r = analysis().retention;
    let kinds: Vec<(&str, u64, u64, u64)> = r
        .iter()
        .map(|r| {
            (
                r.kind.as_str(),
                r.resident_bytes,
                r.used_bytes,
                r.retained_bytes,
            )
        })
        .collect();
    // The hand-made anonymous mapping is no allocator's: not retention.
    assert_eq!(
        kinds,
        [
            ("pymalloc_arena", 128 * PAGE, 64 * PAGE, 64 * PAGE),
            ("malloc_heap", PAGE, 100, PAGE - 100),
        ]
    );
    assert_eq!(
        r[0].stacks[0].frames.last().unwrap(),
        "leak (/srv/app.py:26)"
    );
    assert_eq!(r[0].stacks[0].resident_bytes, 128 * PAGE);
    assert!(r[1].gives_back.contains("malloc_trim"));
    assert!(!r[0].used_estimated);
}

#[test]
fn the_peak_is_the_highest_sample_with_the_stacks_that_held_it() {
    let a = analysis();
    assert_eq!(a.peak.len(), 1);
    let p = &a.peak[0];
    // The churn's 4 MiB at 3 s beat the leak's last sample (2 MiB + 900 KiB).
    assert_eq!((p.layer.as_str(), p.t_s), ("pymalloc", 3.0));
    assert_eq!(p.live_bytes, 4 * MIB + 2 * MIB + 300 * 1024);
    assert_eq!(p.stacks[0].frames.last().unwrap(), "churn (/srv/app.py:40)");
    assert_eq!(p.stacks[0].live_bytes, 4 * MIB);
    assert_eq!(p.stacks[1].frames.last().unwrap(), "leak (/srv/app.py:26)");
    assert_eq!(p.layers_then["pymalloc"], p.live_bytes);
}

#[test]
fn memory_a_library_allocated_is_blamed_on_the_users_line_unless_asked_not_to() {
    let (mut snap, model, mut facts, timeline) = recording();
    // 3 MiB in tasks made inside asyncio.gather, called from the user's serve().
    const TASKS: u64 = 50;
    snap.stacks.insert(
        (PID, Layer::Pymalloc, TASKS),
        StackAgg {
            allocs: 3000,
            alloc_bytes: 3 * MIB,
            ..StackAgg::default()
        },
    );
    snap.ages.insert(
        (PID, Layer::Pymalloc, TASKS),
        aged(3 * MIB, 3000, 3 * MIB, 3000, 9),
    );
    let user = ["<module> (/srv/app.py:73)", "serve (/srv/app.py:26)"];
    let full = [
        user[0],
        user[1],
        "gather (/usr/lib/python3.12/asyncio/tasks.py:831)",
        "BaseEventLoop.create_task (/usr/lib/python3.12/asyncio/base_events.py:456)",
    ];
    facts.frames.insert((PID, TASKS), py(&full));
    let opts = Options {
        duration_s: 10.0,
        min_age_s: 1.0,
        interval_s: 1.0,
        group_libs: true,
    };
    let a = analyze(&snap, &model, &facts, &timeline, opts);
    let s = a
        .suspects
        .iter()
        .find(|s| s.frames.last().unwrap() == "serve (/srv/app.py:26)")
        .expect("blamed on serve");
    assert_eq!((s.live_bytes, s.live_count), (3 * MIB, 3000));
    assert_eq!(s.full_stacks.len(), 1);
    assert_eq!(s.full_stacks[0].frames, full);
    assert!(!a
        .suspects
        .iter()
        .any(|s| s.frames.last().unwrap().contains("asyncio")));
    // The stacks themselves stay whole.
    assert!(a.stacks.iter().any(|r| r.frames == full));
    let asis = analyze(
        &snap,
        &model,
        &facts,
        &timeline,
        Options {
            group_libs: false,
            ..opts
        },
    );
    let s = asis
        .suspects
        .iter()
        .find(|s| s.live_bytes == 3 * MIB && s.layer == "pymalloc")
        .expect("the tasks' suspect");
    assert_eq!(s.frames, full);
    assert!(s.full_stacks.is_empty());
}

#[test]
fn retired_processes_are_summed_and_counted_in_the_layer_totals() {
    let (mut snap, model, facts, timeline) = recording();
    snap.retired = crate::collect::RetiredSummary {
        processes: 3,
        kept: 64,
        live: BTreeMap::from([(Layer::Libc, (3000, 3)), (Layer::Pages, (5 * PAGE, 5))]),
    };
    let opts = Options {
        duration_s: 10.0,
        min_age_s: 1.0,
        interval_s: 1.0,
        group_libs: true,
    };
    let a = analyze(&snap, &model, &facts, &timeline, opts);
    let r = a.retired.expect("retired processes reported");
    assert_eq!((r.processes, r.kept), (3, 64));
    assert_eq!(r.live_bytes["libc"], 3000);
    assert_eq!(r.live_count["pages"], 5);
    // The pages layer's total counts them as the uprobe layers' counters do; no row does.
    assert_eq!(a.layers["pages"].live_bytes, 135 * PAGE);
    assert_eq!(a.layers["pages"].live_count, 135);
    // Without any, no `retired` in the JSON.
    assert!(analysis().retired.is_none());
    assert!(!serde_json::to_string(&analysis())
        .unwrap()
        .contains("retired"));
}

/// A child forked by the process, whose collection writes 300 pages of the arena it
/// inherited and whose other line writes 2: copies, per child and line, never pages of
/// its own or suspects. A page it writes that was not present is its own.
#[test]
fn copy_on_write_is_per_child_and_line_and_never_a_suspect() {
    // Above the kernel's PID_MAX_LIMIT: no /proc entry to read at its fork.
    const CHILD: u32 = 5_000_000;
    const GC: u64 = 20;
    const OTHER: u64 = 21;
    let (mut snap, mut model, mut facts, timeline) = recording();
    model.fork(PID, CHILD, 0);
    let child = |addr: u64, code: u64, stack_id: u64| VmEvent {
        tgid: CHILD,
        tid: CHILD,
        ..vm_event(VmKind::Fault, addr, PAGE, code, stack_id, 0)
    };
    for i in 0..300 {
        model.apply(&child(0x100000 + i * PAGE, 3, GC));
    }
    model.apply(&child(0x900000, 3, OTHER));
    model.apply(&child(0x400000, 3, OTHER));
    model.apply(&child(0x100000 + 400 * PAGE, 2, GC));
    snap.stacks
        .extend(model.stacks.iter().map(|(&k, &v)| (k, v)));
    let followed = Followed {
        parent: PID,
        gap_ms: 10.0,
        exec: false,
        traced: true,
    };
    facts.processes.insert(
        CHILD,
        ProcessInfo {
            pid: CHILD,
            comm: "python3".to_owned(),
            cgroup: None,
            python: Some("3.12".to_owned()),
            followed: Some(followed),
        },
    );
    let gc = ["<module> (/srv/app.py:73)", "worker (/srv/app.py:90)"];
    facts.frames.insert((CHILD, GC), py(&gc));
    facts.frames.insert(
        (CHILD, OTHER),
        py(&["<module> (/srv/app.py:73)", "other (/srv/app.py:95)"]),
    );
    let a = analyze(
        &snap,
        &model,
        &facts,
        &timeline,
        Options {
            duration_s: 10.0,
            min_age_s: 0.0,
            interval_s: 1.0,
            group_libs: true,
        },
    );
    assert_eq!(a.copy_on_write.len(), 1, "{:?}", a.copy_on_write);
    let c = &a.copy_on_write[0];
    assert_eq!((c.pid, c.parent), (CHILD, Some(PID)));
    assert_eq!(
        (c.pages, c.bytes, c.live_bytes),
        (302, 302 * PAGE, 302 * PAGE)
    );
    assert_eq!(c.stacks[0].frames, gc);
    assert_eq!((c.stacks[0].pages, c.stacks[1].pages), (300, 2));
    // The one page it faulted in itself is its only page.
    let pages: u64 = a
        .stacks
        .iter()
        .filter(|s| s.pid == CHILD && s.layer == "pages")
        .map(|s| s.live_bytes)
        .sum();
    assert_eq!(pages, PAGE);
    assert!(a
        .suspects
        .iter()
        .all(|s| s.pid != CHILD || s.live_bytes <= PAGE));
}
