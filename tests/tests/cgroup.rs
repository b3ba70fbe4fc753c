//! Group targets end to end: a child cgroup v2 group with leaky Python programs inside
//! (one started after pyleak, in another CPython version) and one outside; a program in its
//! own mount and pid namespaces running a libc only reachable through /proc/PID; a group
//! removed mid-run (process churn: `churn.rs`). Each inside program's leak must be
//! reported under its pid with its exact bytes at its leaking line.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pyleak_tests::{group::*, *};
use serde_json::Value;

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
        // The layers this test was written for (the attach defaults under the test
        // runner's PYLEAK_PYMALLOC=exact until exact mode brought pymalloc in).
        "--layers",
        "libc,vm,pages",
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
        // The layers this test was written for (the attach defaults under the test
        // runner's PYLEAK_PYMALLOC=exact until exact mode brought pymalloc in).
        "--layers",
        "libc,vm,pages",
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
