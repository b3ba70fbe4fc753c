//! Python programs leaking below Python: 1 MiB blocks from libc malloc through ctypes, and
//! an anonymous mapping with every page touched. Live bytes above an idle baseline (the
//! same script leaking nothing) must be within 2% of the truth, on every CPython here, in
//! launch mode and attached with --pid.

use std::process::Command;

use pyleak_tests::*;
use serde_json::Value;

const MIB: f64 = 1048576.0;
const MALLOC_MIB: u64 = 16;
const MMAP_MIB: u64 = 12;

fn script() -> String {
    root()
        .join("tests/workloads/py_native_leak.py")
        .to_string_lossy()
        .into_owned()
}

fn live(report: &Value, layer: &str) -> f64 {
    report["layers"][layer]["live_bytes"]
        .as_u64()
        .expect("live_bytes") as f64
}

fn within_2pct(label: &str, what: &str, got: f64, want: f64) {
    let err = (got - want).abs() / want;
    assert!(
        err <= 0.02,
        "{label}: {what} above baseline {:.3} MiB, want {:.3} MiB ({:.2}% off)",
        got / MIB,
        want / MIB,
        err * 100.0
    );
}

fn launch(dir: &std::path::Path, python: &std::path::Path, malloc: u64, mmap: u64) -> Value {
    let (r, _) = record_json(
        dir,
        &[
            "--",
            python.to_str().unwrap(),
            &script(),
            &malloc.to_string(),
            &mmap.to_string(),
        ],
    );
    r
}

fn check(label: &str, base: &Value, leak: &Value) {
    within_2pct(
        label,
        "libc",
        live(leak, "libc") - live(base, "libc"),
        (MALLOC_MIB << 20) as f64,
    );
    within_2pct(
        label,
        "pages",
        live(leak, "pages") - live(base, "pages"),
        (MMAP_MIB << 20) as f64,
    );
    // The mapping itself, plus glibc's own mmap per 1 MiB block (a page of header each).
    within_2pct(
        label,
        "vm",
        live(leak, "vm") - live(base, "vm"),
        ((MMAP_MIB + MALLOC_MIB) << 20) as f64,
    );
    assert_eq!(leak["lost_events"], 0, "{label}: lost {}", leak["lost"]);
}

#[test]
fn launch_mode_every_cpython() {
    if !root_or_skip() {
        return;
    }
    let pythons = required_pythons(&ALL_PYTHONS);
    for (label, python) in pythons {
        let dir = scratch(&format!("pynative-{}", label.replace(' ', "-")));
        let base = launch(&dir, &python, 0, 0);
        let leak = launch(&dir, &python, MALLOC_MIB, MMAP_MIB);
        check(&label, &base, &leak);
        eprintln!(
            "{label}: ok (libc +{:.2} MiB, pages +{:.2} MiB)",
            (live(&leak, "libc") - live(&base, "libc")) / MIB,
            (live(&leak, "pages") - live(&base, "pages")) / MIB
        );
    }
}

fn attach(dir: &std::path::Path, python: &std::path::Path, malloc: u64, mmap: u64) -> Value {
    let go = dir.join(format!("go-{malloc}"));
    let mut target = Command::new(python);
    target
        .arg(script())
        .arg(malloc.to_string())
        .arg(mmap.to_string())
        .arg("--wait")
        .arg(&go);
    attach_and_record(
        target,
        &go,
        "leaked",
        &dir.join(format!("attach-{malloc}.json")),
    )
}

#[test]
fn attach_mode_pyenv_312_and_debian_311() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1", "debian 3.11"]) {
        let dir = scratch(&format!("pyattach-{}", label.replace(' ', "-")));
        let base = attach(&dir, &python, 0, 0);
        let leak = attach(&dir, &python, MALLOC_MIB, MMAP_MIB);
        check(&label, &base, &leak);
    }
}
