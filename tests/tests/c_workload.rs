//! The C workload (tests/workloads/alloc_workload.c) calls every libc allocator, mmap,
//! partial munmap, mremap and touches pages with counts known to the byte; pyleak must
//! report each exactly, in launch mode and attached with --pid.

use std::process::Command;

use pyleak_tests::*;
use serde_json::Value;

const PAGE: u64 = 4096;

fn has(frames: &[String], func: &str) -> bool {
    frames
        .iter()
        .any(|f| f == &format!("{func} (alloc_workload)"))
}

/// Checks every number the workload fixes.
fn check(report: &Value) {
    let libc = layer(report, "libc");
    // leak_malloc 10×100 + 5×200; leak_calloc 3×100; leak_realloc 64, 128, 100000, 50, 70,
    // 300; leak_aligned 1000, 512, 96, 5000, 8192.
    assert_eq!(libc["allocs"], 29, "libc allocs: {libc}");
    assert_eq!(
        libc["alloc_bytes"],
        1000 + 1000 + 300 + 64 + 128 + 100_000 + 50 + 70 + 300 + 1000 + 512 + 96 + 5000 + 8192
    );
    // 5×200 freed; realloc frees 64 and 128; realloc(q, 0) frees 70.
    assert_eq!(libc["frees"], 8);
    assert_eq!(libc["freed_bytes"], 1000 + 64 + 128 + 70);
    assert_eq!(libc["live_count"], 21);
    assert_eq!(
        libc["live_bytes"],
        1000 + 300 + 100_000 + 50 + 300 + 1000 + 512 + 96 + 5000 + 8192
    );
    assert_eq!(libc["failed_allocs"], 0);
    check_functions(report);
    check_pages_and_vm(report);
}

/// The libc layer per workload function (frame pointers give the caller of each
/// allocator).
fn check_functions(report: &Value) {
    let live = |f: &str| stack_sum(report, "libc", "live_bytes", |fr| has(fr, f));
    let count = |f: &str| stack_sum(report, "libc", "live_count", |fr| has(fr, f));
    assert_eq!((live("leak_malloc"), count("leak_malloc")), (1000, 10));
    assert_eq!(
        stack_sum(report, "libc", "allocs", |fr| has(fr, "leak_malloc")),
        15
    );
    assert_eq!((live("leak_calloc"), count("leak_calloc")), (300, 3));
    assert_eq!(
        (live("leak_realloc"), count("leak_realloc")),
        (100_000 + 50 + 300, 3)
    );
    assert_eq!(
        (live("leak_aligned"), count("leak_aligned")),
        (1000 + 512 + 96 + 5000 + 8192, 5)
    );
}

/// The pages and vm layers of the workload's own mappings.
fn check_pages_and_vm(report: &Value) {
    // Pages: faults land in touch(), called from each vm_* function.
    let pages = |f: &str, field: &str| {
        stack_sum(report, "pages", field, |fr| has(fr, "touch") && has(fr, f))
    };
    assert_eq!(pages("vm_partial", "allocs"), 10);
    assert_eq!(pages("vm_partial", "live_bytes"), 7 * PAGE);
    assert_eq!(pages("vm_remap", "allocs"), 8);
    assert_eq!(pages("vm_remap", "live_bytes"), 8 * PAGE);
    assert_eq!(pages("vm_unmapped", "allocs"), 2);
    assert_eq!(pages("vm_unmapped", "live_bytes"), 0);

    // vm: the three mmaps and the mremap growth, made from main's callees (libc's syscall
    // wrappers keep no frame pointer, so main is the first workload frame).
    let ours = |fr: &[String]| {
        has(fr, "main")
            && fr
                .last()
                .is_some_and(|l| l.starts_with("__mmap (") || l.starts_with("mremap ("))
    };
    assert_eq!(
        stack_sum(report, "vm", "alloc_bytes", ours),
        (10 + 4 + 2 + 4) * PAGE
    );
    assert_eq!(stack_sum(report, "vm", "live_bytes", ours), (7 + 8) * PAGE);
    assert_eq!(stack_sum(report, "vm", "freed_bytes", ours), (3 + 2) * PAGE);
    assert_eq!(report["lost_events"], 0, "lost: {}", report["lost"]);
}

#[test]
fn launch_mode_counts_every_allocator_exactly() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("c-launch");
    let bin = c_workload();
    let (report, out) = record_json(&dir, &["--", bin.to_str().unwrap()]);
    check(&report);
    assert_eq!(report["probe_links"], "multi-uprobe");
    assert!(report["probes_attach_s"].as_f64().unwrap() > 0.0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("libc") && text.contains("top stacks by live bytes"),
        "{text}"
    );
    assert_eq!(report["processes"][0]["comm"], "alloc_workload");
}

/// A replacement malloc loaded with `LD_PRELOAD` (Debian's jemalloc, installed by
/// `cargo xtask test`) is the libc layer: its malloc family is probed like libc's, and
/// what it lacks (`reallocarray`, `pvalloc`) still reaches glibc's, so every number of the
/// workload's own calls holds. (jemalloc brings libstdc++, whose start-up mallocs its
/// exception pool: counted too, outside the workload's functions.)
#[test]
fn jemalloc_through_ld_preload_is_the_libc_layer() {
    if !root_or_skip() {
        return;
    }
    let jemalloc = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    assert!(
        std::path::Path::new(jemalloc).exists(),
        "{jemalloc} is missing: `cargo xtask test` installs libjemalloc2"
    );
    let dir = scratch("c-jemalloc");
    let json = dir.join("report.json");
    let bin = c_workload();
    // The command inherits pyleak's environment, so pyleak runs preloaded too.
    let out = Command::new(pyleak_bin())
        .args(["record", "-q", "--json", json.to_str().unwrap(), "--"])
        .arg(&bin)
        .env("LD_PRELOAD", jemalloc)
        .output()
        .expect("running pyleak");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let probed = |file: &str, symbol: &str| {
        report["probes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["file"].as_str().unwrap().contains(file) && p["symbol"] == symbol)
    };
    assert!(probed("libjemalloc", "malloc") && probed("libjemalloc", "free"));
    // The workload's calls, all made under main: the numbers `check` fixes.
    let ours = |field: &str| stack_sum(&report, "libc", field, |fr| has(fr, "main"));
    assert_eq!(ours("allocs"), 29);
    assert_eq!(
        ours("alloc_bytes"),
        1000 + 1000 + 300 + 64 + 128 + 100_000 + 50 + 70 + 300 + 1000 + 512 + 96 + 5000 + 8192
    );
    assert_eq!(ours("frees"), 8);
    assert_eq!(ours("freed_bytes"), 1000 + 64 + 128 + 70);
    assert_eq!(
        ours("live_bytes"),
        1000 + 300 + 100_000 + 50 + 300 + 1000 + 512 + 96 + 5000 + 8192
    );
    check_functions(&report);
    assert_eq!(report["lost_events"], 0, "lost: {}", report["lost"]);
}

/// Kernels without multi-uprobe links get one perf event per probe; that path, forced,
/// counts the same.
#[test]
fn perf_event_uprobes_count_every_allocator_exactly() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("c-perf-event");
    let json = dir.join("report.json");
    let bin = c_workload();
    let out = Command::new(pyleak_bin())
        .env("PYLEAK_NO_MULTI_UPROBE", "1")
        .args(["record", "-q", "--json", json.to_str().unwrap(), "--"])
        .arg(&bin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["probe_links"], "perf-event");
    check(&report);
    assert_no_pyleak_programs();
}

#[test]
fn attach_mode_counts_every_allocator_exactly() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("c-attach");
    let go = dir.join("go");
    let mut target = Command::new(c_workload());
    target.arg("--wait").arg(&go);
    let report = attach_and_record(
        target,
        &go,
        "alloc_workload: done",
        &dir.join("report.json"),
    );
    check(&report);
}

/// The libc layer's report on `alloc_workload MODE N`.
fn record_libc(name: &str, mode: &str, n: u64) -> Value {
    let bin = c_workload();
    let args = [
        "--layers",
        "libc",
        "--",
        bin.to_str().unwrap(),
        mode,
        &n.to_string(),
    ];
    record_json(&scratch(name), &args).0
}

/// More live blocks than the kernel's live table has slots (2 Mi): the rest go to its
/// overflow map, and every count stays exact.
#[test]
fn blocks_beyond_the_live_table_are_counted_exactly() {
    if !root_or_skip() {
        return;
    }
    const N: u64 = 2_150_000;
    let report = record_libc("c-many", "--many", N);
    let libc = layer(&report, "libc");
    assert_eq!(libc["allocs"], N, "{libc}");
    assert_eq!(libc["alloc_bytes"], N * 24);
    assert_eq!(libc["frees"], N / 2);
    assert_eq!(libc["unmatched_frees"], 0);
    assert_eq!(libc["live_count"], N / 2);
    assert_eq!(libc["live_bytes"], N / 2 * 24);
    assert_eq!(
        stack_sum(&report, "libc", "live_count", |fr| has(fr, "many_blocks")),
        N / 2
    );
    // Every block freed lived through the rest of the allocation loop and the start of the
    // freeing one: a second or more, traced. Lifetimes come from the exactly-timed blocks
    // (one per CPU per tick), so there are hundreds of them.
    let life = &libc["lifetime_percentiles_us"];
    let p50 = life["p50"].as_u64().expect("freed blocks have lifetimes");
    assert!((100_000..120_000_000).contains(&p50), "lifetimes: {life}");
    assert_eq!(report["lost_events"], 0, "lost: {}", report["lost"]);
}

/// Blocks freed on another thread than the one that allocated them: the two threads' probes
/// meet in the live table from two CPUs, and every count stays exact.
#[test]
fn blocks_freed_by_another_thread_are_counted_exactly() {
    if !root_or_skip() {
        return;
    }
    const N: u64 = 200_000;
    let report = record_libc("c-handoff", "--handoff", N);
    let libc = layer(&report, "libc");
    let ours = |field: &str| stack_sum(&report, "libc", field, |fr| has(fr, "handoff"));
    assert_eq!(ours("allocs"), N, "{libc}");
    assert_eq!(ours("alloc_bytes"), N * 40);
    assert_eq!(ours("frees"), N - N / 10);
    assert_eq!(ours("live_count"), N / 10);
    assert_eq!(ours("live_bytes"), N / 10 * 40);
    // No other block is freed: the 8 unmatched frees are glibc's, at the consumer's exit
    // (its tcache struct, allocated inside malloc, and the 7 chunks cached in it, which the
    // workload had freed already).
    assert_eq!(libc["frees"], N - N / 10);
    assert_eq!(report["lost_events"], 0, "lost: {}", report["lost"]);
}

#[test]
fn folded_output_is_inferno_compatible() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("c-folded");
    let folded = dir.join("out.folded");
    let bin = c_workload();
    for (metric, want) in [
        ("live-bytes", 1000u64),
        ("alloc-bytes", 2000),
        ("allocs", 15),
    ] {
        let (_, _) = record_json(
            &dir,
            &[
                "-o",
                folded.to_str().unwrap(),
                "--metric",
                metric,
                "--",
                bin.to_str().unwrap(),
            ],
        );
        let text = std::fs::read_to_string(&folded).unwrap();
        // Every line is `frames value` with frames separated by ';', the layer first.
        let mut leak_malloc = 0;
        for line in text.lines() {
            let (stack, value) = line.rsplit_once(' ').expect("folded line has a value");
            let value: u64 = value.parse().expect("numeric value");
            assert!(stack.starts_with('['), "layer frame first: {line}");
            if stack.starts_with("[libc];") && stack.contains(";leak_malloc (alloc_workload)") {
                leak_malloc += value;
            }
        }
        assert_eq!(leak_malloc, want, "metric {metric}:\n{text}");
    }
}

/// Every output format from one recording; the pprof profile read back by Go's
/// `go tool pprof` (installed by `cargo xtask test`): the leak's function with its bytes.
#[test]
fn pprof_and_speedscope_outputs_read_back() {
    if !root_or_skip() {
        return;
    }
    assert!(
        Command::new("go").arg("version").output().is_ok(),
        "go is missing: `cargo xtask test` installs golang-go (apt-get install golang-go)"
    );
    let dir = scratch("c-pprof");
    let bin = c_workload();
    let pb = dir.join("out.pb.gz");
    let (report, _) = record_json(
        &dir,
        &["-o", pb.to_str().unwrap(), "--", bin.to_str().unwrap()],
    );
    let top = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-unit=B",
            "-sample_index=inuse_space",
        ])
        .arg(&pb)
        .env("HOME", &dir)
        .output()
        .expect("running go tool pprof");
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&top.stderr)
    );
    // The libc layer (no Python here): leak_malloc holds 1000 bytes live, as in the JSON.
    assert_eq!(
        stack_sum(&report, "libc", "live_bytes", |fr| fr
            .iter()
            .any(|f| f == "leak_malloc (alloc_workload)")),
        1000
    );
    let line = text
        .lines()
        .find(|l| l.ends_with(" leak_malloc"))
        .unwrap_or_else(|| panic!("no leak_malloc in:\n{text}"));
    assert!(line.trim_start().starts_with("1000B "), "{line}");
    // One layer, each byte once: the profile's total is the libc layer's live bytes.
    let total = format!("Total samples = {}B", layer(&report, "libc")["live_bytes"]);
    assert!(text.contains(&total), "{total} in:\n{text}");

    let ss = dir.join("out.speedscope.json");
    record_json(
        &dir,
        &["-o", ss.to_str().unwrap(), "--", bin.to_str().unwrap()],
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&ss).unwrap()).unwrap();
    assert_eq!(
        v["$schema"],
        "https://www.speedscope.app/file-format-schema.json"
    );
    assert_eq!(v["profiles"][0]["type"], "sampled");
}
