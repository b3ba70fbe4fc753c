//! Group targets end to end: a child cgroup v2 group with leaky Python programs inside
//! (one started after pyleak, in another CPython version) and one outside; a program in its
//! own mount and pid namespaces running a libc only reachable through /proc/PID; 50
//! short-lived programs; a group removed mid-run. Each inside program's leak must be
//! reported under its pid with its exact bytes at its leaking line.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use pyleak_tests::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const CGROUP2: &str = "/sys/fs/cgroup/unified";

fn script() -> PathBuf {
    root().join("tests/workloads/py_group_leak.py")
}

/// The line that leaks, as `leak_blocks (PATH:LINE)` with the path the program ran.
fn leak_frame(path: &str) -> String {
    let text = std::fs::read_to_string(script()).expect("reading the workload");
    let line = text
        .lines()
        .position(|l| l.contains("# LEAK LINE"))
        .expect("marker line")
        + 1;
    format!("leak_blocks ({path}:{line})")
}

/// A child cgroup, removed (with whatever still runs in it killed) when dropped.
struct TestCgroup {
    dir: PathBuf,
}

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        TestCgroup::named(&format!("pyleak-test-{name}-{}", std::process::id()))
    }

    fn named(dirname: &str) -> TestCgroup {
        let dir = Path::new(CGROUP2).join(dirname);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TestCgroup { dir }
    }

    /// Its path as /proc/PID/cgroup shows it.
    fn path(&self) -> String {
        format!("/{}", self.dir.file_name().unwrap().to_string_lossy())
    }

    fn procs(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    /// Starts `program args` inside the group: a shell moves itself in, then execs it.
    fn spawn(&self, program: &Path, args: &[&str]) -> Child {
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
    fn remove(&self) {
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

fn cgroup_or_skip() -> bool {
    root_or_skip()
        && skip_unless(
            Path::new(CGROUP2).join("cgroup.procs").exists(),
            "needs cgroup v2 mounted at /sys/fs/cgroup/unified",
        )
}

/// Waits for the program's "leaked" line.
fn wait_leaked(child: &mut Child) {
    let mut line = String::new();
    let stdout = child.stdout.as_mut().expect("piped stdout");
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the program");
    assert_eq!(line.trim(), "leaked", "program did not leak");
}

/// Live bytes of `layer` under `pid` at stacks whose leaf frame is `leaf`.
fn leaked_at(report: &Value, pid: u32, layer: &str, leaf: &str) -> u64 {
    report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter(|s| s["pid"] == pid && s["layer"] == layer)
        .filter(|s| s["frames"].as_array().and_then(|f| f.last()) == Some(&Value::from(leaf)))
        .map(|s| s["live_bytes"].as_u64().expect("live_bytes"))
        .sum()
}

fn stack_pids(report: &Value) -> BTreeSet<u64> {
    report["stacks"]
        .as_array()
        .expect("stacks")
        .iter()
        .filter_map(|s| s["pid"].as_u64())
        .collect()
}

fn process(report: &Value, pid: u32) -> Option<&Value> {
    report["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .find(|p| p["pid"] == pid)
}

/// Nothing lost but returns of calls already in flight while a file-wide probe was being
/// attached (the return probe goes first; a call entering between the two attachments is
/// counted as `unmatched_return`): a few dozen at most, on a busy machine (6-8 when idle).
fn nothing_lost(report: &Value) {
    let lost = report["lost"].as_object().expect("lost");
    for (reason, n) in lost {
        let n = n.as_u64().unwrap();
        let allowed = if reason == "unmatched_return" { 32 } else { 0 };
        assert!(n <= allowed, "lost {n} to {reason}: {}", report["lost"]);
    }
}

/// Stops pyleak with Ctrl-C and reads its JSON report.
fn stop(pyleak: Child, json: &Path) -> Value {
    signal(pyleak.id(), libc::SIGINT);
    let out = pyleak.wait_with_output().expect("waiting for pyleak");
    assert!(out.status.success(), "pyleak failed: {out:?}");
    serde_json::from_str(&std::fs::read_to_string(json).expect("reading the JSON report"))
        .expect("parsing the JSON report")
}

/// BPF program ids the process `pid` holds open (from its fds' `prog_id`).
fn programs_of(pid: u32) -> BTreeSet<u64> {
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

fn loaded_ids() -> BTreeSet<u64> {
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

#[test]
fn only_the_groups_processes_including_later_ones_and_another_cpython() {
    if !cgroup_or_skip() {
        return;
    }
    let pys = required_pythons(&["pyenv 3.12.1", "debian 3.11"]);
    if pys.len() < 2 {
        return;
    }
    let (py312, py311) = (&pys[0].1, &pys[1].1);
    let dir = scratch("cgroup-inside");
    let json = dir.join("report.json");
    let go = dir.join("go");
    let script = script();
    let s = script.to_str().unwrap();
    let cg = TestCgroup::new("inside");

    // Inside from the start, leaking 3 MiB once pyleak is attached.
    let mut first = cg.spawn(py312, &[s, "3", "--wait", go.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cg.procs().contains(&first.id()) {
        assert!(
            Instant::now() < deadline,
            "program did not enter the cgroup"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "--cgroup",
        cg.dir.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    std::fs::write(&go, b"").unwrap();
    wait_leaked(&mut first);
    // Started after pyleak, another CPython (its runtime is in the executable): 5 MiB.
    // Its runtime file is new to pyleak, which learns its layout ~0.1 s after the exec:
    // the delay keeps the leak after that (later processes get it from the kernel).
    let mut later = cg.spawn(py311, &[s, "5", "--delay", "0.5", "--linger", "30"]);
    wait_leaked(&mut later);
    // Outside the group: 7 MiB that must not show.
    let mut outside = Command::new(py312)
        .args([s, "7", "--linger", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_leaked(&mut outside);
    std::thread::sleep(Duration::from_millis(300));
    let report = stop(pyleak, &json);
    let _ = outside.kill();
    let _ = outside.wait();
    cg.remove();
    let _ = first.wait();
    let _ = later.wait();

    let frame = leak_frame(s);
    assert_eq!(
        leaked_at(&report, first.id(), "libc", &frame),
        3 * MIB,
        "first: {}",
        report["stacks"]
    );
    assert_eq!(
        leaked_at(&report, later.id(), "libc", &frame),
        5 * MIB,
        "later: {}",
        report["stacks"]
    );
    assert!(
        !stack_pids(&report).contains(&(outside.id() as u64)),
        "the outside program was traced"
    );
    assert!(process(&report, outside.id()).is_none());
    for (child, version) in [(&first, "3.12"), (&later, "3.11")] {
        let p = process(&report, child.id()).expect("listed in processes");
        assert_eq!(p["cgroup"], cg.path());
        assert_eq!(p["python"], version);
    }
    nothing_lost(&report);
}

#[test]
fn own_mount_and_pid_namespaces_with_a_libc_reached_through_proc() {
    if !cgroup_or_skip() {
        return;
    }
    let pys = required_pythons(&["debian 3.11"]);
    if pys.is_empty() {
        return;
    }
    let dir = scratch("cgroup-mntns");
    let json = dir.join("report.json");
    let newroot = dir.join("root");
    std::fs::create_dir_all(&newroot).unwrap();
    let cg = TestCgroup::new("mntns");
    let libc_so = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    // A private tmpfs root with /usr bound in, its own copy of libc in /opt and the
    // workload in /w: none of it exists at these paths in pyleak's mount namespace.
    let setup = format!(
        "set -e; R={r}; mount --make-rprivate /; mount -t tmpfs tmpfs $R; \
         mkdir -p $R/usr $R/opt $R/w $R/proc $R/tmp; mount --rbind /usr $R/usr; \
         ln -s usr/lib $R/lib; ln -s usr/lib64 $R/lib64; ln -s usr/bin $R/bin; \
         cp {libc_so} $R/opt/libc.so.6; cp {script} $R/w/leak.py; mount -t proc proc $R/proc; \
         echo $$ > {procs}; \
         exec chroot $R /usr/bin/env LD_LIBRARY_PATH=/opt /usr/bin/python3.11 /w/leak.py 4 --wait /tmp/go",
        r = newroot.display(),
        script = script().display(),
        procs = cg.dir.join("cgroup.procs").display(),
    );
    // Its own pid namespace too, as in a container: the interpreter numbers its threads
    // there (the shell is its pid 1, writing "1" to cgroup.procs moves itself).
    let mut target = Command::new("unshare")
        .args(["-m", "-p", "-f", "sh", "-c", &setup])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting unshare");
    // Wait until it runs python with the copied libc.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let pid = cg.procs().first().copied().unwrap_or(0);
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if pid != 0 && maps.contains("/opt/libc.so.6") && maps.contains("python3.11") {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the namespaced python did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !newroot.join("opt/libc.so.6").exists(),
        "the copied libc must be invisible from pyleak's mount namespace"
    );
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "--cgroup",
        cg.dir.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    std::fs::write(format!("/proc/{pid}/root/tmp/go"), b"").expect("writing the go file");
    wait_leaked(&mut target);
    let report = stop(pyleak, &json);
    cg.remove();
    let _ = target.wait();

    assert_eq!(
        leaked_at(&report, pid, "libc", &leak_frame("/w/leak.py")),
        4 * MIB,
        "{}",
        report["stacks"]
    );
    let probed_copy = report["probes"].as_array().unwrap().iter().any(|p| {
        p["symbol"] == "malloc"
            && p["file"].as_str().is_some_and(|f| {
                f.starts_with(&format!("/proc/{pid}/root/")) && f.ends_with("/opt/libc.so.6")
            })
    });
    assert!(
        probed_copy,
        "the copy of libc was not probed: {}",
        report["probes"]
    );
}

#[test]
fn fifty_short_lived_programs_none_missed_nothing_left_behind() {
    if !cgroup_or_skip() {
        return;
    }
    let pys = required_pythons(&["pyenv 3.12.1", "debian 3.11"]);
    if pys.len() < 2 {
        return;
    }
    let dir = scratch("cgroup-churn");
    let json = dir.join("report.json");
    let script = script();
    let s = script.to_str().unwrap();
    let cg = TestCgroup::new("churn");
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "--cgroup",
        cg.dir.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let pyleak_pid = pyleak.id();
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{pyleak_pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    };
    // 50 programs, 5 at a time, alternating CPythons, leaking 1-3 MiB each; each lives
    // about half a second after leaking (time for pyleak to name their stacks while they
    // live, on a busy machine too).
    let mut expected: Vec<(u32, u64)> = Vec::new();
    let mut rss_after_10 = 0;
    for batch in 0..10 {
        let mut running = Vec::new();
        for i in 0..5 {
            let n = batch * 5 + i;
            let mib = 1 + (n % 3) as u64;
            let py = &pys[n % 2].1;
            // The delay: see the first test (the first process of each CPython).
            let child = cg.spawn(
                py,
                &[s, &mib.to_string(), "--delay", "0.4", "--linger", "0.5"],
            );
            expected.push((child.id(), mib * MIB));
            running.push(child);
        }
        for mut c in running {
            wait_leaked(&mut c);
            assert!(c.wait().unwrap().success());
        }
        if batch == 1 {
            std::thread::sleep(Duration::from_millis(1500));
            rss_after_10 = rss();
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let rss_after_50 = rss();
    let ids = programs_of(pyleak_pid);
    assert!(!ids.is_empty(), "pyleak holds no BPF program");
    let report = stop(pyleak, &json);
    cg.remove();

    let frame = leak_frame(s);
    let mut wrong = Vec::new();
    for &(pid, bytes) in &expected {
        let got = leaked_at(&report, pid, "libc", &frame);
        if got != bytes || process(&report, pid).is_none() {
            let big: Vec<String> = report["stacks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["pid"] == pid && s["layer"] == "libc")
                .filter(|s| s["live_bytes"].as_u64().unwrap() >= MIB)
                .map(|s| format!("{} at {}", s["live_bytes"], s["frames"]))
                .collect();
            wrong.push(format!(
                "pid {pid}: {got} of {bytes} (1 MiB+ stacks: {big:?})"
            ));
        }
    }
    assert!(wrong.is_empty(), "missed or wrong: {wrong:?}");
    nothing_lost(&report);
    eprintln!(
        "pyleak RSS after 10 processes {:.1} MiB, after 50 {:.1} MiB",
        rss_after_10 as f64 / MIB as f64,
        rss_after_50 as f64 / MIB as f64
    );
    // Per-process state grows with what the processes left live, not with time: 40
    // more processes cost pyleak less than 32 MiB.
    assert!(
        rss_after_50 < rss_after_10 + 32 * MIB,
        "pyleak grew from {} to {} MiB over 40 processes",
        rss_after_10 / MIB,
        rss_after_50 / MIB
    );
    // Every program pyleak held is gone with it (their uprobes with them).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<u64> = ids.intersection(&loaded_ids()).copied().collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left loaded: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_group_that_empties_and_is_removed_mid_run() {
    if !cgroup_or_skip() {
        return;
    }
    let pys = required_pythons(&["pyenv 3.12.1"]);
    if pys.is_empty() {
        return;
    }
    let dir = scratch("cgroup-gone");
    let json = dir.join("report.json");
    let script = script();
    let s = script.to_str().unwrap();
    let cg = TestCgroup::new("gone");
    let mut pyleak = Command::new(pyleak_bin())
        .args([
            "record",
            "-q",
            "--cgroup",
            cg.dir.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(pyleak.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("pyleak: tracing") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "pyleak exited early");
    }
    let mut child = cg.spawn(&pys[0].1, &[s, "2", "--delay", "0.5", "--linger", "0.3"]);
    wait_leaked(&mut child);
    assert!(child.wait().unwrap().success());
    // Empty: pyleak keeps tracing (a new process may come).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        pyleak.try_wait().unwrap().is_none(),
        "pyleak stopped on an empty group"
    );
    cg.remove();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = pyleak.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "pyleak did not end when the group went"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(status.success(), "pyleak failed: {rest}");
    assert!(
        rest.contains(&format!("cgroup {} was removed", cg.path())),
        "no word of the removal: {rest}"
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        leaked_at(&report, child.id(), "libc", &leak_frame(s)),
        2 * MIB,
        "{}",
        report["stacks"]
    );
}

#[test]
fn container_by_id_prefix_with_per_process_folded_stacks() {
    if !cgroup_or_skip() {
        return;
    }
    let pys = required_pythons(&["pyenv 3.12.1"]);
    if pys.is_empty() {
        return;
    }
    let dir = scratch("cgroup-container");
    let json = dir.join("report.json");
    let folded = dir.join("live.folded");
    let go = dir.join("go");
    let script = script();
    let s = script.to_str().unwrap();
    // What Docker's systemd driver makes, with a made-up id unique to this run.
    let id = format!("{:08x}{}", std::process::id(), "ab".repeat(28));
    let cg = TestCgroup::named(&format!("docker-{id}.scope"));
    let mut child = cg.spawn(&pys[0].1, &[s, "3", "--wait", go.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cg.procs().contains(&child.id()) {
        assert!(
            Instant::now() < deadline,
            "program did not enter the cgroup"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "--container",
        &id[..12],
        "--json",
        json.to_str().unwrap(),
        "-o",
        folded.to_str().unwrap(),
        "--per-process",
    ]);
    std::fs::write(&go, b"").unwrap();
    wait_leaked(&mut child);
    let report = stop(pyleak, &json);
    cg.remove();
    let _ = child.wait();

    let frame = leak_frame(s);
    assert_eq!(leaked_at(&report, child.id(), "libc", &frame), 3 * MIB);
    assert_eq!(
        process(&report, child.id()).expect("listed")["cgroup"],
        cg.path()
    );
    let text = std::fs::read_to_string(&folded).unwrap();
    let prefix = format!("python3 (pid {});[libc];", child.id());
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix) && l.contains(&format!(";{frame} ")))
        .unwrap_or_else(|| panic!("no per-process line for the leak in:\n{text}"));
    assert!(line.ends_with(&format!(" {}", 3 * MIB)), "{line}");
}

#[test]
fn all_python_processes_on_the_host_including_later_ones() {
    if !root_or_skip() {
        return;
    }
    let pys = required_pythons(&["pyenv 3.12.1", "debian 3.11"]);
    if pys.len() < 2 {
        return;
    }
    let dir = scratch("all-pythons");
    let json = dir.join("report.json");
    let go = dir.join("go");
    let script = script();
    let s = script.to_str().unwrap();
    let spawn = |py: &Path, args: &[&str]| {
        Command::new(py)
            .arg(s)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut before = spawn(&pys[0].1, &["3", "--wait", go.to_str().unwrap()]);
    // Not Python: must not be listed.
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pyleak = spawn_pyleak(&["record", "-q", "--all", "--json", json.to_str().unwrap()]);
    std::fs::write(&go, b"").unwrap();
    wait_leaked(&mut before);
    // A new CPython is counted once pyleak sees its runtime mapped (see the README).
    let mut later = spawn(&pys[1].1, &["5", "--delay", "0.5", "--linger", "30"]);
    wait_leaked(&mut later);
    std::thread::sleep(Duration::from_millis(300));
    let report = stop(pyleak, &json);
    for c in [&mut before, &mut later, &mut other] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let frame = leak_frame(s);
    assert_eq!(leaked_at(&report, before.id(), "libc", &frame), 3 * MIB);
    assert_eq!(leaked_at(&report, later.id(), "libc", &frame), 5 * MIB);
    assert_eq!(
        process(&report, before.id()).expect("listed")["python"],
        "3.12"
    );
    assert_eq!(
        process(&report, later.id()).expect("listed")["python"],
        "3.11"
    );
    assert!(process(&report, other.id()).is_none(), "sleep was traced");
    assert!(!stack_pids(&report).contains(&(other.id() as u64)));
}

/// A worker pool replacing its workers every 50 tasks (tests/workloads/soak_service.py),
/// with sampled pymalloc's windows opening every half second: each window attaches the
/// pymalloc probes again, by the file pyleak holds open (it used to be an fd closed with
/// the first worker's scan: pyleak died with "Bad file descriptor" within seconds).
#[test]
fn worker_churn_with_sampled_pymalloc_windows() {
    if !root_or_skip() || !cgroup_or_skip() {
        return;
    }
    let Some((_, python)) = required_pythons(&["debian 3.11"]).into_iter().next() else {
        return;
    };
    let cg = TestCgroup::new("churn");
    let service = root().join("tests/workloads/soak_service.py");
    let mut svc = cg.spawn(&python, &[service.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(500));
    let dir = scratch("cgroup-churn");
    let json = dir.join("r.json");
    let out = pyleak(&[
        "record",
        "-q",
        "--cgroup",
        cg.dir.to_str().unwrap(),
        "--pymalloc",
        "sampled",
        "--pymalloc-period",
        "0.5",
        "-d",
        "8",
        "--json",
        json.to_str().unwrap(),
    ]);
    cg.remove();
    let _ = svc.wait();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let seen = report["processes"].as_array().unwrap().len();
    assert!(seen >= 10, "workers came and went: {seen} processes seen");
    assert!(report["sampled_pymalloc"]["windows"].as_u64().unwrap() >= 4);
    nothing_lost(&report);
    assert_no_pyleak_programs();
}
