//! Shared helpers for pyleak's privileged integration tests: finding the binary, building
//! the workloads, running pyleak and reading its JSON, finding the CPythons on the machine.
//!
//! A test that cannot run here (not root, a missing CPython) says so on stderr in capitals;
//! under CI (`CI` set) it fails instead, because there the feature is expected.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde_json::Value;

pub use leftovers::{assert_no_pyleak_programs, pyleak_leftovers};

pub mod group;
pub mod leftovers;
pub mod one_line;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests live in the workspace")
        .to_owned()
}

/// Runs `tmux ARGS` (terminal tests of `pyleak top`).
pub fn tmux(args: &[&str]) -> Output {
    Command::new("tmux")
        .args(args)
        .output()
        .expect("running tmux")
}

/// Polls tmux session `session`'s pane every half second for up to `secs` seconds until
/// `done` accepts it; returns the last pane seen.
pub fn tmux_pane_until(session: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut pane = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let cap = tmux(&["capture-pane", "-p", "-t", session]);
        pane = String::from_utf8_lossy(&cap.stdout).into_owned();
        if done(&pane) {
            break;
        }
    }
    pane
}

/// Sends q to tmux session `session` and waits up to 20 s for `file` to exist (the
/// command's `; touch FILE` once it quits); then ends the session.
pub fn tmux_quit(session: &str, file: &Path) {
    tmux(&["send-keys", "-t", session, "q"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = tmux(&["kill-session", "-t", session]);
}

/// The JSON line a workload printed on stdout.
pub fn printed(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line from the workload in {stdout}"));
    serde_json::from_str(line).expect("workload JSON")
}

/// The path of workload `name` in `tests/workloads`.
pub fn workload(name: &str) -> String {
    root()
        .join("tests/workloads")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The 1-based line of `script` holding `marker` (panics if none does).
pub fn marker_line(script: &str, marker: &str) -> u64 {
    let text = std::fs::read_to_string(script).expect("reading the workload");
    text.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("{marker} not in {script}")) as u64
        + 1
}

/// The pyleak binary under test (`PYLEAK_BIN`, else the release build).
pub fn pyleak_bin() -> PathBuf {
    let p = std::env::var_os("PYLEAK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/pyleak"));
    assert!(
        p.exists(),
        "{} missing: run the tests with `cargo xtask test`",
        p.display()
    );
    p
}

/// Whether we run under CI, where every feature is expected.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Reports a test that cannot run here: fails under CI, shouts otherwise. Returns false so
/// callers can `if !skip_unless(..) { return; }`.
pub fn skip_unless(ok: bool, why: &str) -> bool {
    if !ok {
        assert!(!in_ci(), "required under CI: {why}");
        eprintln!("\n!!! TEST NOT RUN: {why} !!!\n");
    }
    ok
}

/// True when running as root (eBPF needs it); see [`skip_unless`].
pub fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    skip_unless(
        unsafe { libc::geteuid() } == 0,
        "needs root to load eBPF programs",
    )
}

/// Builds the C workload once (-O0 so no call is optimised away, frame pointers for stacks).
pub fn c_workload() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = root().join("target/test-workloads");
        std::fs::create_dir_all(&out).expect("creating target/test-workloads");
        let bin = out.join("alloc_workload");
        let status = Command::new("gcc")
            .args(["-O0", "-fno-omit-frame-pointer", "-g", "-o"])
            .arg(&bin)
            .arg(root().join("tests/workloads/alloc_workload.c"))
            .status()
            .expect("running gcc");
        assert!(status.success(), "gcc failed on alloc_workload.c");
        bin
    })
    .clone()
}

/// Builds tests/workloads/native_frames_lib.c once into a shared library with frame
/// pointers (`cc -O1 -fno-omit-frame-pointer`), for the `--native` tests.
pub fn native_frames_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let out = root().join("target/test-workloads");
        std::fs::create_dir_all(&out).expect("creating target/test-workloads");
        let lib = out.join("libpyleak_native_frames.so");
        let status = Command::new("cc")
            .args([
                "-shared",
                "-fPIC",
                "-O1",
                "-fno-omit-frame-pointer",
                "-g",
                "-o",
            ])
            .arg(&lib)
            .arg(root().join("tests/workloads/native_frames_lib.c"))
            .status()
            .expect("running cc");
        assert!(status.success(), "cc failed on native_frames_lib.c");
        lib
    })
    .clone()
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = root()
        .join("target/test-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating a scratch directory");
    d
}

/// Runs `pyleak ARGS` to completion.
pub fn pyleak(args: &[&str]) -> Output {
    Command::new(pyleak_bin())
        .args(args)
        .output()
        .expect("running pyleak")
}

/// Runs `pyleak record --json FILE ARGS` and returns the parsed report and the output;
/// pyleak must succeed.
pub fn record_json(dir: &Path, args: &[&str]) -> (Value, Output) {
    record_json_ending(dir, args, 0)
}

/// [`record_json`] for a launched command that ends with a shell's status `code` (its
/// exit status, or 128 + the signal that killed it): pyleak ends with it.
pub fn record_json_ending(dir: &Path, args: &[&str], code: i32) -> (Value, Output) {
    let json = dir.join("report.json");
    let mut full = vec!["record", "-q", "--json", json.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    let out = pyleak(&full);
    assert!(
        out.status.code() == Some(code),
        "pyleak {full:?} ended with {} (expected {code}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let text = std::fs::read_to_string(&json).expect("reading the JSON report");
    (
        serde_json::from_str(&text).expect("parsing the JSON report"),
        out,
    )
}

/// Starts `pyleak ARGS` in the background and waits until it says it is tracing.
pub fn spawn_pyleak(args: &[&str]) -> Child {
    spawn_pyleak_without_env(args, "PYLEAK_NO_SUCH_VARIABLE")
}

/// [`spawn_pyleak`] with environment variable `var` taken away.
pub fn spawn_pyleak_without_env(args: &[&str], var: &str) -> Child {
    let mut cmd = Command::new(pyleak_bin());
    cmd.env_remove(var).args(args);
    spawn_tracing(cmd)
}

/// [`spawn_pyleak`] with environment variable `var` set to `value` (a test-only setting).
pub fn spawn_pyleak_with_env(args: &[&str], var: &str, value: &str) -> Child {
    let mut cmd = Command::new(pyleak_bin());
    cmd.env(var, value).args(args);
    spawn_tracing(cmd)
}

/// Starts `cmd` (a pyleak) and waits until it says it is tracing.
fn spawn_tracing(mut cmd: Command) -> Child {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting pyleak");
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "pyleak did not start tracing within 30 s"
        );
        match lines.next() {
            Some(Ok(line)) if line.starts_with("pyleak: tracing") => break,
            Some(Ok(_)) => continue,
            _ => {
                let out = child.wait_with_output().expect("waiting for pyleak");
                panic!("pyleak exited before tracing: {:?}", out.status);
            }
        }
    }
    // Keep draining stderr so pyleak never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: sending a signal to a process we started.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// The layer totals of a report.
pub fn layer(report: &Value, name: &str) -> Value {
    report["layers"][name].clone()
}

/// Sums a numeric field over the report's stacks of `layer` that satisfy `keep`.
pub fn stack_sum(
    report: &Value,
    layer: &str,
    field: &str,
    keep: impl Fn(&[String]) -> bool,
) -> u64 {
    report["stacks"]
        .as_array()
        .expect("stacks array")
        .iter()
        .filter(|s| s["layer"] == layer)
        .filter(|s| {
            let frames: Vec<String> = s["frames"]
                .as_array()
                .expect("frames")
                .iter()
                .map(|f| f.as_str().unwrap_or("").to_owned())
                .collect();
            keep(&frames)
        })
        .map(|s| s[field].as_u64().expect("numeric field"))
        .sum()
}

/// The CPythons on this machine: (label, interpreter path).
pub fn pythons() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let pyenv_root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"));
    for v in ["3.8.18", "3.9.18", "3.10.13", "3.11.7", "3.12.1", "3.13.0"] {
        let p = pyenv_root.join("versions").join(v).join("bin/python3");
        if p.exists() {
            out.push((format!("pyenv {v}"), p));
        }
    }
    if Path::new("/usr/bin/python3.11").exists() {
        out.push((
            "debian 3.11".to_owned(),
            PathBuf::from("/usr/bin/python3.11"),
        ));
    }
    out
}

/// Every CPython this machine kind has, by label (as [`pythons`] names them).
pub const ALL_PYTHONS: [&str; 7] = [
    "pyenv 3.8.18",
    "pyenv 3.9.18",
    "pyenv 3.10.13",
    "pyenv 3.11.7",
    "pyenv 3.12.1",
    "pyenv 3.13.0",
    "debian 3.11",
];

/// The CPythons a test needs, by label; missing ones are reported via [`skip_unless`].
pub fn required_pythons(labels: &[&str]) -> Vec<(String, PathBuf)> {
    let all = pythons();
    let mut out = Vec::new();
    for l in labels {
        match all.iter().find(|(label, _)| label == l) {
            Some(p) => out.push(p.clone()),
            None => {
                skip_unless(false, &format!("CPython `{l}` is not installed"));
            }
        }
    }
    out
}

/// `bpftool -j OBJECT show` (`prog`, `link`) as a JSON list (it prints `[]` for none);
/// panics on anything else, so no check passes on output it could not read.
pub(crate) fn bpftool_list(object: &str) -> Vec<Value> {
    let out = Command::new("bpftool")
        .args(["-j", object, "show"])
        .output()
        .expect("running bpftool");
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(a)) => a,
        other => panic!("bpftool -j {object} show: not a JSON list: {other:?}"),
    }
}

/// Names of BPF programs loaded in the kernel (through bpftool).
pub fn loaded_programs() -> Vec<String> {
    bpftool_list("prog")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect()
}

/// pyleak's program names (`pyleak_common::names::PROGRAMS`, which a unit test of
/// pyleak checks against the built eBPF object's programs, both ways).
pub const PYLEAK_PROGRAMS: [&str; pyleak_common::names::PROGRAMS.len()] =
    pyleak_common::names::PROGRAMS;

/// Whether a program name as bpftool prints it is one of pyleak's. The kernel keeps 15
/// characters of a name (`BPF_OBJ_NAME_LEN` is 16 with the NUL, `include/linux/bpf.h`);
/// bpftool prints the whole name from the program's BTF when it has it (bpftool 7's
/// `get_prog_full_name`), the 15 characters when not, so both forms match.
pub fn is_pyleak_program(name: &str) -> bool {
    PYLEAK_PROGRAMS
        .iter()
        .any(|p| *p == name || (p.len() > 15 && &p[..15] == name))
}

/// BPF links in the kernel (through bpftool): (link id, link type, program id).
pub fn bpf_links() -> Vec<(u64, String, u64)> {
    bpftool_list("link")
        .iter()
        .map(|l| {
            let ty = match &l["type"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (
                l["id"].as_u64().unwrap_or(0),
                ty,
                l["prog_id"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Ids of the loaded BPF programs that carry one of pyleak's names.
pub fn pyleak_program_ids() -> Vec<u64> {
    bpftool_list("prog")
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(is_pyleak_program))
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// The links that run one of pyleak's programs.
pub fn pyleak_links() -> Vec<(u64, String, u64)> {
    let ids = pyleak_program_ids();
    bpf_links()
        .into_iter()
        .filter(|(_, _, prog)| ids.contains(prog))
        .collect()
}

/// Attach mode, end to end: starts `target` (which waits for the file `go` before doing
/// its work, then prints `ready_line`), attaches `pyleak record -p` to it, lets it work,
/// stops pyleak with Ctrl-C once the line is printed, and returns the JSON report.
pub fn attach_and_record(target: Command, go: &Path, ready_line: &str, json: &Path) -> Value {
    attach_and_record_with(target, go, ready_line, json, &[])
}

/// [`attach_and_record`] with more arguments for `pyleak record`.
pub fn attach_and_record_with(
    mut target: Command,
    go: &Path,
    ready_line: &str,
    json: &Path,
    more: &[&str],
) -> Value {
    let _ = std::fs::remove_file(go);
    let mut target = target
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the target");
    let pid = target.id().to_string();
    let mut args = vec![
        "record",
        "-q",
        "-p",
        &pid,
        "--json",
        json.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(more);
    let pyleak = spawn_pyleak(&args);
    std::fs::write(go, b"").expect("writing the go file");
    let mut line = String::new();
    let stdout = target.stdout.take().expect("piped stdout");
    BufRead::read_line(&mut BufReader::new(stdout), &mut line).expect("reading the target");
    assert_eq!(line.trim(), ready_line);
    signal(pyleak.id(), libc::SIGINT);
    let out = pyleak.wait_with_output().expect("waiting for pyleak");
    let _ = target.kill();
    let _ = target.wait();
    assert!(out.status.success(), "pyleak failed: {out:?}");
    serde_json::from_str(&std::fs::read_to_string(json).expect("reading the JSON report"))
        .expect("parsing the JSON report")
}
