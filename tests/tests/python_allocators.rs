//! The pymalloc layer on builds that inline it and with replaced allocator tables.
//!
//! - Debian's `/usr/bin/python3.11` is an LTO+PGO build whose callers carry inlined copies
//!   of `_PyObject_Malloc` behind `cmp $fn,reg; jne` guards: for the same script its
//!   pymalloc counts must match pyenv 3.11.7's (a plain `--enable-shared` build) within 1%.
//! - `PYTHONMALLOC=malloc`, `PYTHONMALLOC=debug` and tracemalloc replace the tables: pyleak
//!   says so in one line and its counts stay right (malloc: the same requests in
//!   `pymem_raw`; hooks: the same `pymalloc` counts).
//!
//! - The raw domain the same way: Debian's copies of `_PyMem_RawMalloc`… are bare libc calls
//!   (some tail calls), and its pymem_raw counts must match pyenv's within 1%, with the
//!   workload's known number of raw allocations seen exactly on both.
//!
//! Both pythons run with `-s -S`: their `site` set-ups differ (Debian's and pyenv's
//! site-packages), which is not what is compared here.

use std::process::Command;

use pyleak_tests::*;
use serde_json::Value;

/// Requests the workload makes (≈ 9 pymalloc allocations each).
const N: u64 = 30_000;

fn workload() -> String {
    root()
        .join("tests/workloads/py_alloc_count.py")
        .to_string_lossy()
        .into_owned()
}

/// Records `python -s -S [extra] workload N` with `env` set; returns the report and stderr.
fn record(tag: &str, python: &str, extra: &[&str], env: &[(&str, &str)]) -> (Value, String) {
    let dir = scratch(&format!("pyalloc-{tag}"));
    let json = dir.join("report.json");
    let n = N.to_string();
    let mut args = vec![
        "record",
        "-q",
        "--layers",
        "pymalloc,pymem_raw,libc",
        "--json",
        json.to_str().unwrap(),
        "--",
        python,
        "-s",
        "-S",
    ];
    args.extend_from_slice(extra);
    let w = workload();
    args.extend([w.as_str(), n.as_str()]);
    let out = Command::new(pyleak_bin())
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .expect("running pyleak");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "pyleak {args:?} failed: {stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty()),
        Some((N / 2).to_string().as_str()),
        "the workload did not finish: {stderr}"
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (report, stderr)
}

fn n(report: &Value, layer_name: &str, field: &str) -> f64 {
    layer(report, layer_name)[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{layer_name}.{field} missing"))
}

fn within(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn debian_311_and_pyenv_3117_agree_on_pymalloc_counts() {
    if !root_or_skip() {
        return;
    }
    let ps = required_pythons(&["pyenv 3.11.7", "debian 3.11"]);
    let [(_, pyenv), (_, debian)] = ps.as_slice() else {
        return;
    };
    let (a, _) = record("pyenv", pyenv.to_str().unwrap(), &[], &[]);
    let (b, _) = record("debian", debian.to_str().unwrap(), &[], &[]);
    // Inlined copies are what carries the counts on Debian's build.
    assert!(
        b["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["symbol"] == "inlined allocator (guard)")
            .count()
            > 100,
        "no inlined allocator sites probed in {debian:?}"
    );
    for field in ["allocs", "frees", "alloc_bytes", "live_bytes", "live_count"] {
        let (x, y) = (n(&a, "pymalloc", field), n(&b, "pymalloc", field));
        eprintln!("pymalloc {field}: pyenv 3.11.7 {x}, debian 3.11 {y}");
        assert!(
            within(y, x, 0.01),
            "pymalloc {field}: debian {y} vs pyenv {x} (more than 1% apart)"
        );
    }
    // Free-list hand-overs (a block taken off a free list by another stack): Debian's
    // inlined `new_keys_object` hands no keys table over, so somewhat fewer there. A fresh
    // object counted as a hand-over too, between its inlined allocator's stack and its
    // inlined `_Py_NewReference`'s (the same line, another native frame), made it 2.6x
    // pyenv's here (163 633 against 61 844).
    let (x, y) = (n(&a, "pymalloc", "reused"), n(&b, "pymalloc", "reused"));
    eprintln!("pymalloc hand-overs: pyenv 3.11.7 {x}, debian 3.11 {y}");
    assert!(
        x > 0.0 && y <= 1.25 * x,
        "pymalloc hand-overs: debian {y} vs pyenv {x}"
    );
    // The workload's own requests dominate (the counts compared are not start-up noise).
    assert!(n(&a, "pymalloc", "allocs") > 8.0 * N as f64);
    assert!(n(&b, "pymalloc", "unmatched_frees") < 0.01 * n(&b, "pymalloc", "frees"));
}

#[test]
fn replaced_allocator_tables_pyenv_3117() {
    if !root_or_skip() {
        return;
    }
    let ps = required_pythons(&["pyenv 3.11.7"]);
    let [(_, py)] = ps.as_slice() else { return };
    let py = py.to_str().unwrap();
    let (base, err) = record("default", py, &[], &[]);
    assert!(!err.contains("warning"), "{err}");
    let allocs = n(&base, "pymalloc", "allocs");
    assert!(allocs > 8.0 * N as f64);

    // malloc: pymalloc is never called; the same requests are served by the raw domain's
    // functions (pymalloc's own raw requests, for blocks over 512 bytes, are not repeated).
    let (m, err) = record("malloc", py, &[], &[("PYTHONMALLOC", "malloc")]);
    assert!(
        err.contains("replaced by malloc (PYTHONMALLOC=malloc)"),
        "{err}"
    );
    assert_eq!(n(&m, "pymalloc", "allocs"), 0.0);
    let expected = allocs + n(&base, "pymem_raw", "allocs");
    let raw = n(&m, "pymem_raw", "allocs");
    assert!(
        within(raw, expected, 0.01),
        "PYTHONMALLOC=malloc: pymem_raw allocs {raw}, expected ≈{expected}"
    );
    assert!(within(
        n(&m, "pymem_raw", "live_count"),
        n(&base, "pymalloc", "live_count") + n(&base, "pymem_raw", "live_count"),
        0.01
    ));

    // Hooks that call the original allocators: counts unchanged.
    for (tag, extra, env) in [
        ("tracemalloc", &["-X", "tracemalloc"][..], &[][..]),
        ("debug", &[][..], &[("PYTHONMALLOC", "debug")][..]),
    ] {
        let (h, err) = record(tag, py, extra, env);
        assert!(err.contains("point at hooks"), "{tag}: {err}");
        for field in ["allocs", "frees", "live_count"] {
            let (x, y) = (n(&base, "pymalloc", field), n(&h, "pymalloc", field));
            assert!(within(y, x, 0.01), "{tag}: pymalloc {field} {y} vs {x}");
        }
    }
}

/// Steps of `py_raw_count.py`, and the raw-domain allocations each makes (all freed).
const RAW_STEPS: u64 = 10_000;
const RAW_PER_STEP: u64 = 15;
/// The array it holds at the end: 200000 eight-byte items.
const RAW_HELD_BYTES: f64 = 1_600_000.0;

/// Records `python -s -S py_raw_count.py RAW_STEPS` with the raw and libc layers.
fn record_raw(tag: &str, python: &str) -> Value {
    let dir = scratch(&format!("pyraw-{tag}"));
    let w = root().join("tests/workloads/py_raw_count.py");
    let steps = RAW_STEPS.to_string();
    let (report, out) = record_json(
        &dir,
        &[
            "--layers",
            "pymem_raw,libc",
            "--",
            python,
            "-s",
            "-S",
            w.to_str().unwrap(),
            &steps,
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.chars().all(|c| c.is_ascii_digit()) && !l.is_empty()),
        Some(steps.as_str()),
        "the workload did not finish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

#[test]
fn debian_311_and_pyenv_3117_agree_on_pymem_raw_counts() {
    if !root_or_skip() {
        return;
    }
    let ps = required_pythons(&["pyenv 3.11.7", "debian 3.11"]);
    let [(_, pyenv), (_, debian)] = ps.as_slice() else {
        return;
    };
    let a = record_raw("pyenv", pyenv.to_str().unwrap());
    let b = record_raw("debian", debian.to_str().unwrap());
    // Debian's raw copies that tail-call realloc (PyMem_Realloc, PyObject_Realloc) are
    // joined at their function's return.
    let tail = b["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["symbol"] == "inlined allocator (tail-call return)")
        .count();
    assert!(tail >= 2, "{tail} tail-call return probes in {debian:?}");
    for field in ["allocs", "frees", "alloc_bytes", "freed_bytes"] {
        let (x, y) = (n(&a, "pymem_raw", field), n(&b, "pymem_raw", field));
        eprintln!("pymem_raw {field}: pyenv 3.11.7 {x}, debian 3.11 {y}");
        assert!(
            within(y, x, 0.01),
            "pymem_raw {field}: debian {y} vs pyenv {x} (more than 1% apart)"
        );
    }
    // Everything the steps allocate is freed: what stays live is start-up's and the held
    // array, the same on both (a block whose allocation is missed looks leaked).
    let (x, y) = (
        n(&a, "pymem_raw", "live_count"),
        n(&b, "pymem_raw", "live_count"),
    );
    eprintln!("pymem_raw live_count: pyenv 3.11.7 {x}, debian 3.11 {y}");
    assert!((x - y).abs() <= 0.001 * n(&a, "pymem_raw", "allocs"));
    let (x, y) = (
        n(&a, "pymem_raw", "live_bytes"),
        n(&b, "pymem_raw", "live_bytes"),
    );
    eprintln!("pymem_raw live_bytes: pyenv 3.11.7 {x}, debian 3.11 {y}");
    assert!((x - y).abs() <= 0.001 * n(&a, "pymem_raw", "alloc_bytes"));
    assert!(n(&b, "pymem_raw", "unmatched_frees") < 0.01 * n(&b, "pymem_raw", "frees"));
    for (name, r) in [("pyenv 3.11.7", &a), ("debian 3.11", &b)] {
        // The known count, under the workload's own frame.
        let in_step = |field| {
            stack_sum(r, "pymem_raw", field, |frames| {
                frames.iter().any(|f| f.starts_with("step ("))
            })
        };
        assert_eq!(
            (in_step("allocs"), in_step("frees")),
            (RAW_PER_STEP * RAW_STEPS, RAW_PER_STEP * RAW_STEPS),
            "{name}: raw allocations and frees in step()"
        );
        // The held array is in both layers, its C-heap block marked as made for Python.
        let linkage = &r["linkage"];
        let (raw, libc) = (
            linkage["pymem_raw_live_bytes"].as_f64().unwrap(),
            linkage["libc_for_python_live_bytes"].as_f64().unwrap(),
        );
        eprintln!("{name}: live pymem_raw {raw} B, libc made for Python {libc} B");
        assert!(raw > RAW_HELD_BYTES, "{name}: pymem_raw live {raw} B");
        assert!(
            within(libc, raw, 0.01),
            "{name}: libc for Python {libc} B, raw {raw} B"
        );
    }
}
