//! Python programs leaking below Python: 1 MiB blocks from libc malloc through ctypes, and
//! an anonymous mapping with every page touched. Live bytes above an idle baseline (the
//! same script leaking nothing) must be within 2% of the truth, on every CPython here, in
//! launch mode and attached with --pid.
//!
//! And `--native`: a C library built here with frame pointers mallocs a known number of
//! blocks of a known size in `leak_inner`, called by `leak_outer`, called through ctypes at
//! a known line. The libc stack holding exactly those bytes must read, root first, the
//! Python frames `traceback.extract_stack()` gives at the call, then native frames marked
//! `[native]` (and counted in `native_frames`) ending `leak_outer`, `leak_inner`; without
//! `--native`, the same Python frames and nothing below them.

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

/// `attached`: pyleak attached to the running target (else it launched it).
fn check(label: &str, base: &Value, leak: &Value, attached: bool) {
    within_2pct(
        label,
        "libc",
        live(leak, "libc") - live(base, "libc"),
        (MALLOC_MIB << 20) as f64,
    );
    // File pages aside: a fault on a library maps its neighbours too (fault-around), and
    // the two runs run slightly different code.
    let not_file = |r: &Value| {
        live(r, "pages")
            - r["linkage"]["resident_by_kind"]["file"]
                .as_u64()
                .unwrap_or(0) as f64
    };
    within_2pct(
        label,
        "pages",
        not_file(leak) - not_file(base),
        (MMAP_MIB << 20) as f64,
    );
    // The mapping itself, plus glibc's own mmap per 1 MiB block (a page of header each).
    within_2pct(
        label,
        "vm",
        live(leak, "vm") - live(base, "vm"),
        ((MMAP_MIB + MALLOC_MIB) << 20) as f64,
    );
    if !attached {
        assert_eq!(leak["lost_events"], 0, "{label}: lost {}", leak["lost"]);
        return;
    }
    // Attached: a malloc already under way in the waiting target while its return probe
    // went in before its entry probe returns unmatched, and is counted (once in a few runs
    // on Debian 3.11's ~900 probes). Nothing else may be lost.
    for (reason, n) in leak["lost"].as_object().expect("lost") {
        let n = n.as_u64().unwrap();
        let allowed = if reason == "unmatched_return" { 4 } else { 0 };
        assert!(
            n <= allowed,
            "{label}: lost {n} to {reason}: {}",
            leak["lost"]
        );
    }
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
        check(&label, &base, &leak, false);
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
        check(&label, &base, &leak, true);
    }
}

/// Size and number of the blocks `leak_inner` mallocs (odd, so no other stack holds
/// exactly these bytes by chance).
const NATIVE_SIZE: u64 = 77_777;
const NATIVE_COUNT: u64 = 13;

/// Splits `qualname (path:line)` into (last name component, path, line).
fn parse_python(frame: &str) -> Option<(String, String, u64)> {
    let (name, rest) = frame.split_once(" (")?;
    let (path, line) = rest.strip_suffix(')')?.rsplit_once(':')?;
    let short = name.rsplit('.').next()?.to_owned();
    Some((short, path.to_owned(), line.parse().ok()?))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("an array of strings")
        .iter()
        .map(|f| f.as_str().expect("a string").to_owned())
        .collect()
}

/// Runs the ctypes script under `pyleak record --layers LAYERS EXTRA…`, returning the
/// report, the folded stacks and the script's own account (its expected stack).
fn record_native(
    dir: &std::path::Path,
    python: &std::path::Path,
    layers: &str,
    extra: &[&str],
) -> (Value, String, Value) {
    let folded = dir.join(format!("{layers}{}.folded", extra.join("")));
    let lib = native_frames_lib();
    let script = root().join("tests/workloads/py_native_frames.py");
    let mut args = vec!["-o", folded.to_str().unwrap(), "--layers", layers];
    args.extend_from_slice(extra);
    let (size, count) = (NATIVE_SIZE.to_string(), NATIVE_COUNT.to_string());
    args.extend([
        "--",
        python.to_str().unwrap(),
        script.to_str().unwrap(),
        lib.to_str().unwrap(),
        &size,
        &count,
    ]);
    let (report, out) = record_json(dir, &args);
    let info: Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("the script's JSON line"),
    )
    .expect("the script's JSON");
    assert_eq!(info["kept"], NATIVE_COUNT, "the C library kept every block");
    let folded = std::fs::read_to_string(&folded).expect("reading the folded stacks");
    (report, folded, info)
}

/// Checks the Python part of `frames` (root first) against the script's traceback.
fn check_python_frames(label: &str, frames: &[String], info: &Value) {
    let expected = info["expected"].as_array().expect("expected frames");
    let file = info["file"].as_str().expect("script path");
    assert!(
        frames.len() >= expected.len(),
        "{label}: {frames:?} shorter than the traceback {expected:?}"
    );
    for (f, e) in frames.iter().zip(expected) {
        let (name, path, line) =
            parse_python(f).unwrap_or_else(|| panic!("{label}: `{f}` is not a Python frame"));
        assert!(
            Some(name.as_str()) == e[0].as_str() && Some(line) == e[1].as_u64() && path == file,
            "{label}: frames {frames:?} differ from the traceback {expected:?} in {file}"
        );
        assert!(
            !f.ends_with("[native]"),
            "{label}: Python frame `{f}` marked native"
        );
    }
}

/// The report's libc row that leak_inner's blocks are in, with --native: exactly the known
/// bytes, Python frames then native frames ending leak_outer, leak_inner. Returns the
/// native frames.
fn check_native(label: &str, report: &Value, folded: &str, info: &Value) -> Vec<String> {
    let rows: Vec<&Value> = report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["layer"] == "libc")
        .filter(|s| {
            strings(&s["frames"])
                .iter()
                .any(|f| f.starts_with("leak_inner ("))
        })
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "{label}: want one libc stack through leak_inner, got {rows:#?}"
    );
    let row = rows[0];
    assert_eq!(
        row["live_bytes"],
        NATIVE_SIZE * NATIVE_COUNT,
        "{label}: {row:#}"
    );
    assert_eq!(row["live_count"], NATIVE_COUNT, "{label}: {row:#}");
    assert_eq!(row["allocs"], NATIVE_COUNT, "{label}: {row:#}");
    let frames = strings(&row["frames"]);
    check_python_frames(label, &frames, info);
    let py = info["expected"].as_array().unwrap().len();
    let native = &frames[py..];
    assert_eq!(
        row["native_frames"],
        native.len(),
        "{label}: native_frames counts the frames below the Python ones: {frames:#?}"
    );
    assert!(native.len() >= 2, "{label}: {frames:#?}");
    check_native_part(label, &frames, native);
    let line = format!("[libc];{} {}", frames.join(";"), NATIVE_SIZE * NATIVE_COUNT);
    assert!(
        folded.lines().any(|l| l == line),
        "{label}: folded output lacks `{line}`:\n{folded}"
    );
    eprintln!("{label}: {line}");
    native.to_vec()
}

/// Every frame under the Python ones is marked native, none is the eval loop, and the
/// last (up to) two are leak_outer, leak_inner.
fn check_native_part(label: &str, frames: &[String], native: &[String]) {
    for f in native {
        assert!(
            f.ends_with(" [native]"),
            "{label}: `{f}` below the Python frames is not marked native: {frames:#?}"
        );
        assert!(
            !f.starts_with("_PyEval_EvalFrame"),
            "{label}: the eval loop is the Python frames, not a native frame under them: {frames:#?}"
        );
    }
    let lib = "libpyleak_native_frames.so";
    let want = [
        format!("leak_outer ({lib}) [native]"),
        format!("leak_inner ({lib}) [native]"),
    ];
    assert_eq!(
        native[native.len().saturating_sub(2)..],
        want[2 - native.len().min(2)..],
        "{label}: the leaf is malloc's caller leak_inner, under leak_outer: {frames:#?}"
    );
}

/// Without --native: the same Python frames hold the blocks, with nothing below them.
fn check_no_native(label: &str, report: &Value, folded: &str, info: &Value) {
    let py = info["expected"].as_array().unwrap().len();
    let mut found = None;
    for s in report["stacks"].as_array().expect("stacks") {
        let frames = strings(&s["frames"]);
        assert!(
            !frames
                .iter()
                .any(|f| f.ends_with("[native]") || f.starts_with("leak_inner (")),
            "{label}: a native frame without --native: {s:#}"
        );
        assert!(
            s["native_frames"] == 0 || frames.iter().all(|f| parse_python(f).is_none()),
            "{label}: native frames counted in a Python stack without --native: {s:#}"
        );
        if s["layer"] == "libc"
            && frames.len() == py
            && frames
                .last()
                .and_then(|f| parse_python(f))
                .is_some_and(|(n, _, _)| n == "call_c")
        {
            check_python_frames(label, &frames, info);
            found = Some((s.clone(), frames));
        }
    }
    let (row, frames) =
        found.unwrap_or_else(|| panic!("{label}: no libc stack ends at the ctypes call"));
    // The line holds the leak and nothing else in malloc (see py_native_frames.py).
    assert_eq!(
        row["live_bytes"],
        NATIVE_SIZE * NATIVE_COUNT,
        "{label}: {row:#}"
    );
    assert_eq!(row["live_count"], NATIVE_COUNT, "{label}: {row:#}");
    let line = format!("[libc];{} {}", frames.join(";"), NATIVE_SIZE * NATIVE_COUNT);
    assert!(
        folded.lines().any(|l| l == line),
        "{label}: folded output lacks `{line}`:\n{folded}"
    );
}

#[test]
fn native_frames_under_python_frames_every_cpython() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&ALL_PYTHONS) {
        let dir = scratch(&format!("pynative-frames-{}", label.replace(' ', "-")));
        let (report, folded, info) = record_native(&dir, &python, "libc", &["--native"]);
        check_native(&label, &report, &folded, &info);
        let (report, folded, info) = record_native(&dir, &python, "libc", &[]);
        check_no_native(&label, &report, &folded, &info);
    }
}

/// With every layer (the launch default): the pymalloc and pymem_raw probes change nothing
/// in the libc stack of a block C code mallocs itself. `--layer all` draws every layer in
/// the folded stacks (one layer, pymalloc, is the default).
#[test]
fn native_frames_with_every_layer_pyenv_312() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1"]) {
        let dir = scratch("pynative-frames-all-layers");
        let (report, folded, info) =
            record_native(&dir, &python, "all", &["--native", "--layer", "all"]);
        check_native(&label, &report, &folded, &info);
    }
}

/// `--native-depth N` keeps the leaf-most N native frames: 1 is malloc's caller alone
/// (read at malloc's entry), 2 adds the first frame-pointer frame.
#[test]
fn native_depth_keeps_the_leaf_most_frames_pyenv_312() {
    if !root_or_skip() {
        return;
    }
    for (label, python) in required_pythons(&["pyenv 3.12.1"]) {
        let dir = scratch("pynative-depth");
        let (full, folded, info) = record_native(&dir, &python, "libc", &["--native"]);
        let all = check_native(&label, &full, &folded, &info).len();
        let py = info["expected"].as_array().unwrap().len();
        for depth in [1usize, 2] {
            let d = depth.to_string();
            let (report, _, info) =
                record_native(&dir, &python, "libc", &["--native", "--native-depth", &d]);
            let row = report["stacks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["layer"] == "libc" && s["live_bytes"] == NATIVE_SIZE * NATIVE_COUNT)
                .unwrap_or_else(|| panic!("{label}: depth {depth}: no libc stack of the leak"));
            let frames = strings(&row["frames"]);
            check_python_frames(&label, &frames, &info);
            assert_eq!(
                row["native_frames"], depth,
                "{label}: depth {depth}: {frames:#?}"
            );
            assert_eq!(
                frames.len(),
                py + depth,
                "{label}: depth {depth}: {frames:#?}"
            );
            check_native_part(&label, &frames, &frames[py..]);
            assert!(depth < all, "{label}: the full walk is deeper than {depth}");
        }
    }
}
