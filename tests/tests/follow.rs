//! Children of `--pid` and command targets, followed by default: a `multiprocessing` Pool
//! (fork and spawn start methods) whose workers each leak a known number of 1 MiB C-heap
//! blocks at one line while the parent leaks nothing there (tests/workloads/
//! py_pool_follow.py). Each worker's leak must be reported exactly under its own pid, the
//! parent's at that line must be 0, and every worker must be listed as its child with the
//! gap between its fork (or exec) and its probes; `--no-follow` traces the parent only.
//!
//! The workers wait a second for their first task, longer than any measured gap (tens of
//! milliseconds, a few hundred when several interpreters start at once): each block is
//! allocated with the worker's probes in place, so the bytes are exact. Layers libc, vm and
//! pages: the leak is malloc's, and tracing every pymalloc call of three fresh interpreters
//! plus the parent can fill the per-stack totals map (64 Ki process/layer/stack entries;
//! a known limit, counted in `lost.stack_stats_full`).

use std::{collections::BTreeMap, path::Path, process::Command};

use pyleak_tests::*;
use serde_json::Value;

const SCRIPT: &str = "py_pool_follow.py";
const LAYERS: &str = "libc,vm,pages";

/// The leaking line as pyleak names it.
fn leak_frame() -> String {
    let script = workload(SCRIPT);
    let line = marker_line(&script, "# LEAK LINE");
    format!("leak_blocks ({script}:{line})")
}

/// Live libc bytes of `pid` at stacks whose leaf frame is `leaf`.
fn leaked_at(report: &Value, pid: u64, leaf: &str) -> u64 {
    report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["pid"] == pid && s["layer"] == "libc")
        .filter(|s| s["frames"].as_array().and_then(|f| f.last()) == Some(&Value::from(leaf)))
        .map(|s| s["live_bytes"].as_u64().expect("live_bytes"))
        .sum()
}

fn process(report: &Value, pid: u64) -> Option<&Value> {
    report["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
}

/// What the workload wrote: its pid and the bytes each worker pid leaked.
fn truth(out: &Path) -> (u64, BTreeMap<u64, u64>) {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out).expect("workload output"))
        .expect("workload JSON");
    let leaked = v["leaked"]
        .as_object()
        .expect("leaked")
        .iter()
        .map(|(pid, b)| (pid.parse().unwrap(), b.as_u64().unwrap()))
        .collect();
    (v["parent"].as_u64().expect("parent"), leaked)
}

/// Each worker's leak exact under its own pid, listed as the parent's child with its gap;
/// the parent clean at the leaking line; nothing lost but the calls of the gap.
///
/// A child runs while its probes go in: each file's return link goes in before its entry
/// link, so a call made meanwhile returns with no entry seen and is counted in
/// `lost.unmatched_return` or `lost.orphan_return` (0 to ~2000 here for Debian 3.11's
/// spawned interpreters, which malloc at start-up while theirs are attached; how many
/// depends on the timing). Those are the gap's calls, counted, not bounded here.
fn check_followed(what: &str, report: &Value, out: &Path, method: &str) {
    let (parent, leaked) = truth(out);
    let frame = leak_frame();
    assert_eq!(
        leaked.values().sum::<u64>(),
        14 << 20,
        "{what}: the workload's tasks leak 3+5+2+4 MiB"
    );
    assert_eq!(leaked_at(report, parent, &frame), 0, "{what}: parent");
    let mut children = 0;
    for (&pid, &bytes) in &leaked {
        assert_ne!(pid, parent, "{what}: a worker is not the parent");
        assert_eq!(
            leaked_at(report, pid, &frame),
            bytes,
            "{what}: worker {pid} at {frame}"
        );
        let p = process(report, pid).unwrap_or_else(|| panic!("{what}: worker {pid} listed"));
        let f = &p["followed"];
        assert_eq!(f["parent"], parent, "{what}: worker {pid}'s parent: {p}");
        assert_eq!(f["traced"], true, "{what}: {p}");
        assert_eq!(f["exec"], method == "spawn", "{what}: {p}");
        let gap = f["gap_ms"].as_f64().expect("gap_ms");
        eprintln!("{what}: worker {pid}: probes {gap:.1} ms after its fork/exec");
        assert!(
            gap < 1000.0,
            "{what}: worker {pid}'s probes came {gap} ms late, after its first task: {p}"
        );
    }
    // Every child of the parent is listed (with spawn also multiprocessing's resource
    // tracker), and no pid outside the family.
    for p in report["processes"].as_array().unwrap() {
        if p["pid"] != parent {
            assert_eq!(p["followed"]["parent"], parent, "{what}: {p}");
            children += 1;
        }
    }
    assert!(children >= leaked.len(), "{what}: {children} children");
    let lost = report["lost"].as_object().expect("lost");
    for (reason, n) in lost {
        let n = n.as_u64().unwrap();
        if reason == "unmatched_return" || reason == "orphan_return" {
            eprintln!("{what}: {n} returns in the gap ({reason})");
        } else {
            assert_eq!(n, 0, "{what}: lost {n} to {reason}: {lost:?}");
        }
    }
}

fn launched(label: &str, python: &Path, method: &str) {
    let dir = scratch(&format!("follow-launch-{method}"));
    let out = dir.join("truth.json");
    let what = format!("{label}, {method}, launched");
    let (report, _) = record_json(
        &dir,
        &[
            "--layers",
            LAYERS,
            "--",
            python.to_str().unwrap(),
            &workload(SCRIPT),
            method,
            out.to_str().unwrap(),
        ],
    );
    check_followed(&what, &report, &out, method);
    assert_no_pyleak_programs();
}

fn attached(label: &str, python: &Path, method: &str) {
    let dir = scratch(&format!("follow-attach-{method}"));
    let out = dir.join("truth.json");
    let go = dir.join("go");
    let json = dir.join("report.json");
    let mut target = Command::new(python);
    target
        .arg(workload(SCRIPT))
        .arg(method)
        .arg(&out)
        .arg("--wait")
        .arg(&go);
    let report = attach_and_record_with(target, &go, "done", &json, &["--layers", LAYERS]);
    check_followed(&format!("{label}, {method}, --pid"), &report, &out, method);
    assert_no_pyleak_programs();
}

#[test]
fn pool_workers_forked_by_a_launched_command() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1", "debian 3.11"]) {
        launched(&label, &python, "fork");
    }
}

#[test]
fn pool_workers_spawned_by_a_launched_command() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1", "debian 3.11"]) {
        launched(&label, &python, "spawn");
    }
}

#[test]
fn pool_workers_of_a_process_attached_by_pid() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1", "debian 3.11"]) {
        attached(&label, &python, "fork");
        attached(&label, &python, "spawn");
    }
}

#[test]
fn no_follow_traces_the_parent_only() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1"]) {
        let dir = scratch("follow-none");
        let out = dir.join("truth.json");
        let (report, _) = record_json(
            &dir,
            &[
                "--layers",
                LAYERS,
                "--no-follow",
                "--",
                python.to_str().unwrap(),
                &workload(SCRIPT),
                "fork",
                out.to_str().unwrap(),
            ],
        );
        let (parent, leaked) = truth(&out);
        assert_eq!(leaked.values().sum::<u64>(), 14 << 20, "{label}");
        let pids: Vec<&Value> = report["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| &p["pid"])
            .collect();
        assert_eq!(pids, vec![&Value::from(parent)], "{label}: the parent only");
        let stack_pids: std::collections::BTreeSet<u64> = report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["pid"].as_u64())
            .collect();
        assert_eq!(
            stack_pids.into_iter().collect::<Vec<_>>(),
            vec![parent],
            "{label}"
        );
        assert_eq!(leaked_at(&report, parent, &leak_frame()), 0, "{label}");
        assert_no_pyleak_programs();
    }
}
