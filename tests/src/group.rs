//! Group targets' helpers, shared by `tests/cgroup.rs` and `tests/churn.rs`: a child
//! cgroup v2 group made and removed, the leaking workload run in it, and reading the
//! report's stacks and processes.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{root, root_or_skip, signal, skip_unless};

/// A mebibyte.
pub const MIB: u64 = 1 << 20;
/// The cgroup v2 mount on these machines.
pub const CGROUP2: &str = "/sys/fs/cgroup/unified";

/// The workload each test runs in its group: it leaks a known number of MiB.
pub fn script() -> PathBuf {
    root().join("tests/workloads/py_group_leak.py")
}

/// The line that leaks, as `leak_blocks (PATH:LINE)` with the path the program ran.
pub fn leak_frame(path: &str) -> String {
    let text = std::fs::read_to_string(script()).expect("reading the workload");
    let line = text
        .lines()
        .position(|l| l.contains("# LEAK LINE"))
        .expect("marker line")
        + 1;
    format!("leak_blocks ({path}:{line})")
}

/// A child cgroup, removed (with whatever still runs in it killed) when dropped.
pub struct TestCgroup {
    /// Its directory under the cgroup v2 mount.
    pub dir: PathBuf,
}

impl TestCgroup {
    /// A fresh group named after the test and this process.
    pub fn new(name: &str) -> TestCgroup {
        TestCgroup::named(&format!("pyleak-test-{name}-{}", std::process::id()))
    }

    /// A fresh group `dirname` (one left from an earlier run is removed first).
    pub fn named(dirname: &str) -> TestCgroup {
        let dir = Path::new(CGROUP2).join(dirname);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TestCgroup { dir }
    }

    /// Its path as /proc/PID/cgroup shows it.
    pub fn path(&self) -> String {
        format!("/{}", self.dir.file_name().unwrap().to_string_lossy())
    }

    /// The processes in it.
    pub fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    /// Starts `program args` inside the group: a shell moves itself in, then execs it.
    pub fn spawn(&self, program: &Path, args: &[&str]) -> Child {
        let procs = self.dir.join("cgroup.procs");
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {} && exec \"$@\"", procs.display()))
            .arg("sh")
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting a program in the cgroup")
    }

    /// Kills what runs inside and removes the group.
    pub fn remove(&self) {
        for pid in self.procs() {
            signal(pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && self.dir.exists() {
            assert!(
                Instant::now() < deadline,
                "cannot remove {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if self.dir.exists() {
            self.remove();
        }
    }
}

/// Root, with cgroup v2 mounted where pyleak's tests expect it; says why not otherwise.
pub fn cgroup_or_skip() -> bool {
    root_or_skip()
        && skip_unless(
            Path::new(CGROUP2).join("cgroup.procs").exists(),
            "needs cgroup v2 mounted at /sys/fs/cgroup/unified",
        )
}

/// Waits for the program's "leaked" line.
pub fn wait_leaked(child: &mut Child) {
    let mut line = String::new();
    let stdout = child.stdout.as_mut().expect("piped stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the program");
    assert_eq!(line.trim(), "leaked", "program did not leak");
}

/// Live bytes of `layer` under `pid` at stacks whose leaf frame is `leaf`.
pub fn leaked_at(report: &Value, pid: u32, layer: &str, leaf: &str) -> u64 {
    report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["pid"] == pid && s["layer"] == layer)
        .filter(|s| s["frames"].as_array().and_then(|f| f.last()) == Some(&Value::from(leaf)))
        .map(|s| s["live_bytes"].as_u64().expect("live_bytes"))
        .sum()
}

/// The pids the report's stacks name.
pub fn stack_pids(report: &Value) -> BTreeSet<u64> {
    report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter_map(|s| s["pid"].as_u64())
        .collect()
}

/// The report's entry of process `pid`.
pub fn process(report: &Value, pid: u32) -> Option<&Value> {
    report["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
}

/// Nothing lost but returns of calls already in flight while a file-wide probe was being
/// attached (the return probe goes first; a call entering between the two attachments is
/// counted as `unmatched_return`): a few dozen at most, on a busy machine (6-8 when idle).
pub fn nothing_lost(report: &Value) {
    let lost = report["lost"].as_object().expect("lost");
    for (reason, n) in lost {
        let n = n.as_u64().unwrap();
        let allowed = if reason == "unmatched_return" { 32 } else { 0 };
        assert!(n <= allowed, "lost {n} to {reason}: {}", report["lost"]);
    }
}

/// Stops pyleak with Ctrl-C and reads its JSON report.
pub fn stop(pyleak: Child, json: &Path) -> Value {
    signal(pyleak.id(), libc::SIGINT);
    let out = pyleak.wait_with_output().expect("waiting for pyleak");
    assert!(out.status.success(), "pyleak failed: {out:?}");
    serde_json::from_str(&std::fs::read_to_string(json).expect("reading the JSON report"))
        .expect("parsing the JSON report")
}

/// BPF program ids the process `pid` holds open (from its fds' `prog_id`).
pub fn programs_of(pid: u32) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("reading fdinfo") {
        let info = std::fs::read_to_string(fd.unwrap().path()).unwrap_or_default();
        out.extend(info.lines().find_map(|l| {
            l.strip_prefix("prog_id:")
                .and_then(|v| v.trim().parse::<u64>().ok())
        }));
    }
    out
}

/// Ids of every BPF program loaded on the host.
pub fn loaded_ids() -> BTreeSet<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("running bpftool");
    let v: Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}
