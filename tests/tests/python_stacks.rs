//! Python stacks read in the kernel, on every CPython here: the frames reported for known
//! leaks equal `traceback.extract_stack()` at the leak (function and line), in the main
//! thread, in two other threads, for a malloc made with the GIL released, and for a
//! recursion deeper than the frames kept (marked truncated). Live bytes agree with
//! tracemalloc's for the same line within 2%.

use pyleak_tests::*;
use serde_json::Value;

fn script() -> String {
    root()
        .join("tests/workloads/py_stack_leak.py")
        .to_string_lossy()
        .into_owned()
}

/// Splits `qualname (path:line)` into (last name component, path, line).
fn parse(frame: &str) -> Option<(String, String, u64)> {
    let (name, rest) = frame.split_once(" (")?;
    let (path, line) = rest.strip_suffix(')')?.rsplit_once(':')?;
    let short = name.rsplit('.').next()?.to_owned();
    Some((short, path.to_owned(), line.parse().ok()?))
}

/// Whether reported frames (root first) end with the expected ones (`[[name, line]]`,
/// root first) in `file`, where the expected stack starts at the script's own frames.
fn matches(frames: &[Value], expected: &[Value], file: &str) -> bool {
    let frames: Vec<&str> = frames.iter().filter_map(Value::as_str).collect();
    if frames.len() != expected.len() {
        return false;
    }
    frames.iter().zip(expected).all(|(f, e)| {
        let Some((name, path, line)) = parse(f) else {
            return false;
        };
        let want_name = e[0].as_str().unwrap_or("");
        name == want_name
            && Some(line) == e[1].as_u64()
            && (path == file || !path.ends_with("py_stack_leak.py"))
    })
}

fn stacks<'a>(report: &'a Value, layer: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(move |s| s["layer"] == layer)
}

fn check_python(label: &str, python: &std::path::Path) {
    let dir = scratch(&format!("pystacks-{}", label.replace(' ', "-")));
    let (report, out) = record_json(
        &dir,
        &["--", python.to_str().unwrap(), &script(), "--tracemalloc"],
    );
    let info: Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with('{'))
            .expect("script output"),
    )
    .expect("script JSON");
    let file = info["file"].as_str().unwrap();
    // The version pyleak read from the binary: "3.X" of the label's "3.X.Y".
    let version = label.split(' ').nth(1).unwrap_or_default();
    let minor = version.split('.').take(2).collect::<Vec<_>>().join(".");
    assert_eq!(
        report["processes"][0]["python"], minor,
        "{label}: processes[].python"
    );
    // Debian's LTO build inlines PyObject_Malloc into its callers: its Python-level blocks are
    // checked where they reach malloc (all of these are > 512 bytes).
    let layer = if label.starts_with("debian") {
        "libc"
    } else {
        "pymalloc"
    };
    for tag in ["main", "thread_a", "thread_b", "deep"] {
        let expected = info["expected"][tag].as_array().unwrap().clone();
        let want = info["tracemalloc"][tag].as_u64().unwrap() as f64;
        let (live, truncated): (u64, bool) = if tag == "deep" {
            // 200 levels: the leaf-most 128 frames are kept under a "[truncated]" marker.
            let leaf = expected.last().unwrap();
            let deep: Vec<&Value> = stacks(&report, layer)
                .filter(|s| {
                    let fr = s["frames"].as_array().unwrap();
                    s["truncated"] == true
                        && fr[0] == "[truncated]"
                        && fr.len() == 129
                        && fr
                            .last()
                            .and_then(Value::as_str)
                            .and_then(parse)
                            .is_some_and(|(n, _, l)| {
                                Some(n.as_str()) == leaf[0].as_str() && Some(l) == leaf[1].as_u64()
                            })
                })
                .collect();
            assert!(
                deep.iter()
                    .any(|s| s["live_bytes"].as_u64().unwrap() >= 30000),
                "{label}: no truncated stack for the deep leak; the deepest stacks were {:#?}",
                stacks(&report, layer)
                    .filter(|s| s["frames"].as_array().unwrap().len() > 100)
                    .map(|s| {
                        let fr = s["frames"].as_array().unwrap();
                        (
                            s["live_bytes"].clone(),
                            s["truncated"].clone(),
                            fr.len(),
                            fr[..2].to_vec(),
                            fr[fr.len() - 2..].to_vec(),
                        )
                    })
                    .collect::<Vec<_>>()
            );
            (
                deep.iter().map(|s| s["live_bytes"].as_u64().unwrap()).sum(),
                true,
            )
        } else {
            let matching: Vec<&Value> = stacks(&report, layer)
                .filter(|s| matches(s["frames"].as_array().unwrap(), &expected, file))
                .collect();
            assert!(
                !matching.is_empty(),
                "{label}: no {layer} stack equals the traceback of `{tag}` {expected:?}"
            );
            (
                matching
                    .iter()
                    .map(|s| s["live_bytes"].as_u64().unwrap())
                    .sum(),
                false,
            )
        };
        let err = (live as f64 - want).abs() / want;
        assert!(
            err <= 0.02,
            "{label} {tag}: pyleak {live} B live vs tracemalloc {want} B ({:.2}% off)",
            err * 100.0
        );
        eprintln!(
            "{label} {tag}: {live} B live (tracemalloc {want}){}",
            if truncated { ", truncated" } else { "" }
        );
    }
    // opendir's buffer, allocated with the GIL released, belongs to lister().
    let expected = info["expected"]["gil_released"].as_array().unwrap().clone();
    assert!(
        stacks(&report, "libc").any(
            |s| matches(s["frames"].as_array().unwrap(), &expected, file)
                && s["alloc_bytes"].as_u64().unwrap() >= 32768
        ),
        "{label}: opendir's malloc not attributed to lister {expected:?}"
    );
    assert_eq!(report["lost_events"], 0, "{label}: lost {}", report["lost"]);
}

#[test]
fn frames_match_traceback_on_every_cpython() {
    if !root_or_skip() {
        return;
    }
    let all = required_pythons(&ALL_PYTHONS);
    for (label, python) in all {
        check_python(&label, &python);
    }
}

#[test]
fn unsupported_cpython_warns_and_counts() {
    if !root_or_skip() {
        return;
    }
    let Some((_, py37)) = std::fs::read_dir(
        std::env::var("PYENV_ROOT").unwrap_or_else(|_| "/root/.pyenv".into()) + "/versions",
    )
    .ok()
    .and_then(|d| {
        d.filter_map(Result::ok)
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .find(|(n, _)| n.starts_with("3.7"))
    }) else {
        skip_unless(false, "no CPython 3.7 under pyenv");
        return;
    };
    let dir = scratch("py37");
    let leak = root().join("tests/workloads/py_native_leak.py");
    let (report, out) = record_json(
        &dir,
        &[
            "--",
            py37.join("bin/python3").to_str().unwrap(),
            leak.to_str().unwrap(),
            "4",
            "0",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CPython 3.7") && err.contains("native stacks only"),
        "{err}"
    );
    assert_eq!(
        report["processes"][0]["python"], "3.7",
        "processes[].python"
    );
    let live = report["layers"]["libc"]["live_bytes"].as_u64().unwrap();
    assert!(
        live >= 4 << 20,
        "libc still counted without Python stacks: {live}"
    );
}

#[test]
fn demo_through_a_symlinked_python_names_the_leaking_line() {
    if !root_or_skip() {
        return;
    }
    // /usr/bin/python3 is a symlink to python3.11: the runtime must still be found.
    if !skip_unless(
        std::path::Path::new("/usr/bin/python3").exists(),
        "no /usr/bin/python3",
    ) {
        return;
    }
    let dir = scratch("demo");
    let demo = root().join("demo/leaky_service.py");
    let (report, _) = record_json(
        &dir,
        &[
            "--interval",
            "0.5",
            "--",
            "/usr/bin/python3",
            demo.to_str().unwrap(),
        ],
    );
    let file = demo.to_string_lossy().into_owned();
    let line = std::fs::read_to_string(&demo)
        .unwrap()
        .lines()
        .position(|l| l.contains("bytearray(64 * 1024)"))
        .expect("the leaking line")
        + 1;
    let top = stacks(&report, "libc")
        .max_by_key(|s| s["live_bytes"].as_u64().unwrap())
        .expect("libc stacks");
    let leaf = top["frames"]
        .as_array()
        .unwrap()
        .last()
        .and_then(Value::as_str)
        .unwrap_or("");
    assert_eq!(
        leaf,
        format!("handle_request ({file}:{line})"),
        "top libc stack: {top}"
    );
    // It is also the top leak suspect, growing; the bounded cache is not.
    let suspect = &report["suspects"][0];
    assert_eq!(suspect["frames"], top["frames"], "{suspect:#}");
    assert_eq!(suspect["trend"], "growing", "{suspect:#}");
    // 400 payloads of bytearray(64 KiB): 65537-byte blocks.
    let want = 400.0 * 65537.0;
    let live = top["live_bytes"].as_u64().unwrap() as f64;
    assert!((live - want).abs() / want <= 0.02, "live {live} vs {want}");
}

/// Live libc bytes and blocks under stacks whose leaf frame is `leaf` (`f (gen_a.py:13)`).
fn kept_at(report: &Value, leaf: &str) -> (u64, u64) {
    stacks(report, "libc")
        .filter(|s| {
            s["frames"]
                .as_array()
                .and_then(|f| f.last())
                .and_then(Value::as_str)
                == Some(leaf)
        })
        .fold((0, 0), |(b, n), s| {
            (
                b + s["live_bytes"].as_u64().unwrap(),
                n + s["live_count"].as_u64().unwrap(),
            )
        })
}

/// Code objects freed and replaced at the same addresses by code objects of other lines
/// (tests/workloads/py_code_reuse.py): each phase's bytes are at its own line, exactly.
/// The kernel keeps code objects' first lines in a per-CPU cache, valid until a code
/// object is freed (`code_dealloc`) or a process execs or exits: a first line kept past
/// a free would name phase B's bytes as phase A's line.
#[test]
fn code_objects_replaced_at_the_same_address_keep_their_own_lines() {
    if !root_or_skip() {
        return;
    }
    let script = root().join("tests/workloads/py_code_reuse.py");
    for (label, python) in required_pythons(&ALL_PYTHONS) {
        let dir = scratch(&format!("code-reuse-{}", label.replace(' ', "-")));
        let (report, out) = record_json(
            &dir,
            &[
                "--layers",
                "libc",
                "--",
                python.to_str().unwrap(),
                script.to_str().unwrap(),
            ],
        );
        let truth: Value = printed(&out);
        let reused = truth["reused"].as_u64().unwrap();
        // Without code objects at the same addresses this test would prove nothing.
        assert!(
            reused >= 10,
            "{label}: only {reused} of phase B's code objects took phase A's addresses"
        );
        let want = (
            truth["bytes_each"].as_u64().unwrap(),
            truth["blocks_each"].as_u64().unwrap(),
        );
        let a = kept_at(&report, "f (gen_a.py:13)");
        let b = kept_at(&report, "f (gen_b.py:113)");
        eprintln!("{label}: {reused} code addresses reused; gen_a.py:13 {a:?}, gen_b.py:113 {b:?}, each should be {want:?}");
        assert_eq!(a, want, "{label}: phase A's line (bytes, blocks)");
        assert_eq!(b, want, "{label}: phase B's line (bytes, blocks)");
        assert_eq!(report["lost_events"], 0, "{label}: lost {}", report["lost"]);
    }
}

/// Once a subinterpreter exists it heads the runtime's list of interpreters: a thread the
/// main interpreter starts afterwards is found after the subinterpreter's threads, and its
/// leak keeps its Python frames (before, its 10 000 blocks had none, on 3.12 and 3.13).
#[test]
fn a_main_interpreter_thread_started_after_a_subinterpreter_has_its_frames() {
    if !root_or_skip() {
        return;
    }
    let script = workload("py_subinterpreter_thread.py");
    let leaf = format!(
        "worker ({script}:{})",
        marker_line(&script, "# the thread's leak")
    );
    // 10 000 bytes objects of 233 bytes; KEPT's item array on top.
    let objects = 10_000 * 233;
    for (label, python) in required_pythons(&["pyenv 3.12.1", "pyenv 3.13.0"]) {
        let (report, out) = record_json(
            &scratch("subinterpreter-thread"),
            &[
                "--layers",
                "pymalloc",
                "--pymalloc",
                "exact",
                "--",
                python.to_str().unwrap(),
                &script,
            ],
        );
        let live = stack_sum(&report, "pymalloc", "live_bytes", |f| {
            f.last().is_some_and(|l| *l == leaf)
        });
        assert!(
            live >= objects && live <= objects + 120_000,
            "{label}: {live} B at {leaf}, {objects} B of objects kept: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
