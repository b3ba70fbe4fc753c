//! The pymalloc layer on builds that inline it and with replaced allocator tables.
//!
//! - Debian's `/usr/bin/python3.11` is an LTO+PGO build whose callers carry inlined copies
//!   of `_PyObject_Malloc` behind `cmp $fn,reg; jne` guards: for the same script its
//!   pymalloc counts must match pyenv 3.11.7's (a plain `--enable-shared` build) within 1%.
//! - `PYTHONMALLOC=malloc`, `PYTHONMALLOC=debug` and tracemalloc replace the tables: pyleak
//!   says so in one line and its counts stay right (malloc: the same requests in
//!   `pymem_raw`; hooks: the same `pymalloc` counts).
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
