//! Copy-on-write after fork (tests/workloads/py_cow.py): the parent builds 200,000 small
//! lists and forks two children (`os.fork`, then a `multiprocessing` 'fork' Process) that
//! allocate none of it but run `gc.collect()` at one line, which writes every inherited
//! list's GC header: each child copies ~14 MiB of its parent's pages. Each child also
//! keeps 2 MiB of libc blocks, the parent 3 MiB.
//!
//! Per child: no suspect and no page of its own at the collecting line (before
//! copy-on-write was told apart, each child's copies were ~14 MiB of its pages there),
//! its `copy_on_write` bytes at that line within 10% of its own measure (its
//! `/proc/self/smaps_rollup` Private_Dirty after the line minus before), and its libc
//! leak exact; the parent: its leak exact, no copies, and no new pages at its own
//! collection after the forks (which writes the pages they write-protected). Launch mode on pyenv 3.12 and Debian's 3.11; `--pid` on 3.12,
//! attached after the heap was built (the children's copies are of memory pyleak never
//! saw made).
//! Layers libc, vm and pages (the leaks are malloc's, the copies are faults).

use std::{path::Path, process::Command};

use pyleak_tests::*;
use serde_json::Value;

const SCRIPT: &str = "py_cow.py";
const LAYERS: &str = "libc,vm,pages";

/// The frame pyleak names for the workload's line marked `marker`, in `function`.
fn frame(function: &str, marker: &str) -> String {
    let script = workload(SCRIPT);
    let line = marker_line(&script, marker);
    format!("{function} ({script}:{line})")
}

/// The innermost Python frame of a stack (frames root first, `native_frames` at the leaf
/// end are native).
fn python_leaf(s: &Value) -> Option<&str> {
    let frames = s["frames"].as_array()?;
    let native = s["native_frames"].as_u64().unwrap_or(0) as usize;
    frames
        .len()
        .checked_sub(native + 1)
        .and_then(|i| frames[i].as_str())
}

/// Live libc bytes of `pid` at stacks whose innermost Python frame is `leaf`.
fn libc_at(report: &Value, pid: u64, leaf: &str) -> u64 {
    report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["pid"] == pid && s["layer"] == "libc" && python_leaf(s) == Some(leaf))
        .map(|s| s["live_bytes"].as_u64().expect("live_bytes"))
        .sum()
}

/// Live pages-layer bytes of `pid` at stacks whose innermost Python frame is `leaf`.
fn pages_at(report: &Value, pid: u64, leaf: &str) -> u64 {
    report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["pid"] == pid && s["layer"] == "pages" && python_leaf(s) == Some(leaf))
        .map(|s| s["live_bytes"].as_u64().expect("live_bytes"))
        .sum()
}

/// The workload's truth: (child pid, how it was made, its Private_Dirty growth) per
/// child, and the parent's pid and leaked bytes.
fn truth(out: &Path) -> (Vec<(u64, String, u64)>, u64, u64) {
    let text = std::fs::read_to_string(out).expect("workload output");
    let mut children = Vec::new();
    let mut parent = None;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("workload JSON line");
        if let Some(pid) = v["child"].as_u64() {
            children.push((
                pid,
                v["how"].as_str().expect("how").to_owned(),
                v["private_dirty_growth"].as_u64().expect("growth"),
            ));
        } else {
            parent = Some((
                v["parent"].as_u64().expect("parent"),
                v["leaked"].as_u64().expect("leaked"),
            ));
        }
    }
    let (pid, leaked) = parent.expect("the parent's line");
    (children, pid, leaked)
}

fn check(what: &str, report: &Value, out: &Path) {
    let (children, parent, parent_leaked) = truth(out);
    assert_eq!(children.len(), 2, "{what}: two children: {children:?}");
    let cow_line = frame("make_private", "# COW LINE");
    let child_leak = frame("leak_blocks", "# CHILD LEAK");
    let no_cow = Vec::new();
    let cow = report["copy_on_write"].as_array().unwrap_or(&no_cow);
    for (pid, how, truth) in &children {
        let what = format!("{what}, {how} child {pid}");
        assert!(
            *truth >= 10 << 20,
            "{what}: the workload's collection copied only {truth} B"
        );
        for s in report["suspects"].as_array().expect("suspects") {
            let at = s["frames"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == cow_line.as_str()));
            assert!(
                s["pid"] != *pid || !at || s["live_bytes"].as_u64().unwrap() < 1 << 20,
                "{what}: a suspect at the collecting line: {s}"
            );
        }
        // What the copies were taken for before: pages of the child's own.
        let pages = pages_at(report, *pid, &cow_line);
        assert!(
            pages < 1 << 20,
            "{what}: {pages} B of the child's own pages at {cow_line}"
        );
        let entry = cow
            .iter()
            .find(|c| c["pid"] == *pid)
            .unwrap_or_else(|| panic!("{what}: no copy_on_write entry: {cow:?}"));
        assert_eq!(entry["parent"], parent, "{what}: {entry}");
        let at_line: u64 = entry["stacks"]
            .as_array()
            .expect("stacks")
            .iter()
            .filter(|s| python_leaf(s) == Some(cow_line.as_str()))
            .map(|s| s["bytes"].as_u64().expect("bytes"))
            .sum();
        let total = entry["bytes"].as_u64().expect("bytes");
        eprintln!(
            "{what}: copy-on-write {at_line} B at the line ({total} B in all), Private_Dirty grew {truth} B; {pages} B of its own pages there"
        );
        let err = (at_line as f64 - *truth as f64).abs() / *truth as f64;
        let python = entry["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| python_leaf(s).is_some());
        assert!(
            err <= 0.10,
            "{what}: {at_line} B copied at {cow_line}, truth {truth} B ({:.1}% off){}: {entry}",
            err * 100.0,
            if python {
                ""
            } else {
                "; no stack has a Python frame"
            }
        );
        assert_eq!(
            libc_at(report, *pid, &child_leak),
            2 << 20,
            "{what}: its leak at {child_leak}"
        );
    }
    // The parent's collection after its forks writes pages it had (with `--pid`, from
    // before pyleak attached): no new pages.
    let parent_gc = frame("main", "# PARENT GC");
    let pages = pages_at(report, parent, &parent_gc);
    eprintln!("{what}: the parent's collection: {pages} B of new pages");
    assert!(pages < 1 << 20, "{what}: {pages} B of pages at {parent_gc}");
    let parent_leak = frame("main", "# PARENT LEAK");
    assert_eq!(
        libc_at(report, parent, &parent_leak),
        parent_leaked,
        "{what}: the parent's leak"
    );
    assert!(
        cow.iter().all(|c| c["pid"] != parent),
        "{what}: the parent copied nothing of its children's: {cow:?}"
    );
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

#[test]
fn copy_on_write_in_forked_children_of_a_launched_command() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1", "debian 3.11"]) {
        let dir = scratch("cow-launch");
        let out = dir.join("truth.jsonl");
        let (report, _) = record_json(
            &dir,
            &[
                "--layers",
                LAYERS,
                "--",
                python.to_str().unwrap(),
                &workload(SCRIPT),
                out.to_str().unwrap(),
                "--leak",
            ],
        );
        check(&format!("{label}, launched"), &report, &out);
        assert_no_pyleak_programs();
    }
}

#[test]
fn copy_on_write_in_forked_children_of_a_process_attached_by_pid() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1"]) {
        let dir = scratch("cow-attach");
        let out = dir.join("truth.jsonl");
        let go = dir.join("go");
        let mut target = Command::new(python);
        target
            .arg(workload(SCRIPT))
            .arg(&out)
            .arg("--wait")
            .arg(&go)
            .arg("--heap-first")
            .arg("--leak");
        let report = attach_and_record_with(
            target,
            &go,
            "done",
            &dir.join("report.json"),
            &["--layers", LAYERS],
        );
        check(&format!("{label}, --pid"), &report, &out);
        assert_no_pyleak_programs();
    }
}
