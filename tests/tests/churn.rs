//! Process churn in a group target: 50 short-lived programs, none missed; the same past
//! the cap on exited processes kept whole (the oldest retired and summed, pyleak's memory
//! bounded); a worker pool replacing its workers under sampled pymalloc windows.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use pyleak_tests::{group::*, *};
use serde_json::Value;

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
        // The layers this test was written for (the attach defaults under the test
        // runner's PYLEAK_PYMALLOC=exact until exact mode brought pymalloc in).
        "--layers",
        "libc,vm,pages",
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
fn exited_processes_past_the_cap_are_retired_and_summed() {
    if !cgroup_or_skip() {
        return;
    }
    let Some((_, python)) = required_pythons(&["debian 3.11"]).into_iter().next() else {
        return;
    };
    let dir = scratch("cgroup-retire");
    let json = dir.join("report.json");
    let script = script();
    let s = script.to_str().unwrap();
    let cg = TestCgroup::new("retire");
    // Keep 4 exited processes whole (test-only setting; users get 64).
    let pyleak = spawn_pyleak_with_env(
        &[
            "record",
            "-q",
            "--cgroup",
            cg.dir.to_str().unwrap(),
            // The layers this test was written for (see the first test).
            "--layers",
            "libc,vm,pages",
            "--json",
            json.to_str().unwrap(),
        ],
        "PYLEAK_TEST_EXITED_KEPT",
        "4",
    );
    // 12 programs, 4 at a time, leaking 1-3 MiB each.
    let mut expected: Vec<(u32, u64)> = Vec::new();
    for batch in 0..3 {
        let mut running = Vec::new();
        for i in 0..4 {
            let mib = 1 + ((batch * 4 + i) % 3) as u64;
            let child = cg.spawn(
                &python,
                &[s, &mib.to_string(), "--delay", "0.4", "--linger", "0.5"],
            );
            expected.push((child.id(), mib * MIB));
            running.push(child);
        }
        for mut c in running {
            wait_leaked(&mut c);
            assert!(c.wait().unwrap().success());
        }
    }
    // Every program has exited: a few of pyleak's 1 s ticks see them all reaped.
    std::thread::sleep(Duration::from_millis(3000));
    let report = stop(pyleak, &json);
    cg.remove();

    let retired = &report["retired"];
    assert_eq!(retired["processes"], 8, "{retired}");
    assert_eq!(retired["kept"], 4, "{retired}");
    let frame = leak_frame(s);
    type Leaks = Vec<(u32, u64)>;
    let (kept, gone): (Leaks, Leaks) = expected
        .iter()
        .partition(|&&(pid, _)| process(&report, pid).is_some());
    assert_eq!(kept.len(), 4, "kept {kept:?}, retired {gone:?}");
    // Those kept are exact; the retired ones are out of the stacks.
    let mut other_max = 0;
    for &(pid, bytes) in &kept {
        assert_eq!(leaked_at(&report, pid, "libc", &frame), bytes, "pid {pid}");
        let all: u64 = report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|st| st["pid"] == pid && st["layer"] == "libc")
            .map(|st| st["live_bytes"].as_u64().unwrap())
            .sum();
        other_max = other_max.max(all - bytes);
    }
    let stacks = stack_pids(&report);
    for &(pid, _) in &gone {
        assert!(!stacks.contains(&u64::from(pid)), "retired {pid} in stacks");
    }
    // What they left in libc is summed: their leaks, and what else such a program leaves
    // at exit (at most what the kept ones left besides their leaks, each).
    let leaked: u64 = gone.iter().map(|&(_, b)| b).sum();
    let libc = retired["live_bytes"]["libc"].as_u64().unwrap();
    assert!(
        libc >= leaked && libc <= leaked + 8 * other_max + MIB,
        "retired libc {libc}, their leaks {leaked}, others at most {other_max} each"
    );
    nothing_lost(&report);
    let text = std::process::Command::new(pyleak_bin())
        .args(["report", json.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("exited processes retired: 8 (pyleak keeps the last 4 whole;"),
        "{text}"
    );
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

/// Records, by cgroup, `py_fork_leak.py` (run by `python`) forking 6 children 1.5 s after
/// it starts, each
/// leaking 200 033 B at its leak line and exiting `linger` seconds later. Returns the
/// report, the parent's pid, and each child's process entry after checking that each
/// leaked exactly that at its line and that nothing was lost.
fn six_forked_children(python: &Path, name: &str, linger: &str) -> (Value, u64, Vec<Value>) {
    let dir = scratch(&format!("cgroup-{name}"));
    let json = dir.join("report.json");
    let script = root().join("tests/workloads/py_fork_leak.py");
    let s = script.to_str().unwrap();
    let cg = TestCgroup::new(name);
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "--cgroup",
        cg.dir.to_str().unwrap(),
        // The layers this test was written for (see the first test).
        "--layers",
        "libc,vm,pages",
        "--json",
        json.to_str().unwrap(),
    ]);
    let mut parent = cg.spawn(python, &[s, "6", "1.5", linger]);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(parent.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "forked");
    assert!(parent.wait().unwrap().success());
    let parent_pid = u64::from(parent.id());
    let report = stop(pyleak, &json);
    cg.remove();

    let leaf = format!("leak_in_child ({s}:{})", marker_line(s, "# LEAK LINE"));
    let children: Vec<Value> = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["pid"].as_u64() != Some(parent_pid))
        .cloned()
        .collect();
    assert_eq!(children.len(), 6, "{}", report["processes"]);
    for child in &children {
        let pid = child["pid"].as_u64().unwrap();
        let at_line = leaked_at(&report, pid as u32, "libc", &leaf);
        let big: Vec<String> = report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|st| st["pid"] == pid && st["live_bytes"].as_u64() >= Some(200_000))
            .map(|st| format!("{} {} at {}", st["layer"], st["live_bytes"], st["frames"]))
            .collect();
        assert_eq!(at_line, 200_033, "child {pid}: {big:?}");
    }
    nothing_lost(&report);
    (report, parent_pid, children)
}

/// Children a traced Python process forks inherit its Python layout in the kernel
/// (`task_newtask`): what a child allocates right after fork, before pyleak has found it,
/// carries its Python frames (it used to have native frames only). Each lives 3 s, long
/// enough for a growth sample to name its stacks while it lives.
#[test]
fn forked_children_leak_at_their_python_line_from_their_first_allocation() {
    if !cgroup_or_skip() {
        return;
    }
    let Some((_, python)) = required_pythons(&["pyenv 3.11.7"]).into_iter().next() else {
        return;
    };
    six_forked_children(&python, "fork", "3");
}

/// Children forked by a traced process that leak and exit at once, between two scans of
/// the group (1 s apart): the kernel announces each fork, so each child is its parent's
/// fork from the start: its frames are named from the family's memory after it is gone,
/// and the report gives it its parent's command name, CPython and cgroup.
#[test]
fn forked_children_gone_before_any_scan_are_named_as_their_parents_forks() {
    if !cgroup_or_skip() {
        return;
    }
    let Some((_, python)) = required_pythons(&["pyenv 3.11.7"]).into_iter().next() else {
        return;
    };
    let (report, parent_pid, children) = six_forked_children(&python, "fork-brief", "0");
    let parent = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(parent_pid))
        .expect("the parent in the report");
    for child in &children {
        for field in ["comm", "python", "cgroup"] {
            assert_eq!(
                child[field], parent[field],
                "child {}'s {field}: {child}, parent: {parent}",
                child["pid"]
            );
        }
    }
}

/// The frame `func (PATH:LINE)` of the line in tests/workloads/py_pid_reuse.py that keeps
/// `func`'s blocks.
fn pid_reuse_frame(script: &str, func: &str) -> String {
    let text = std::fs::read_to_string(script).expect("reading the workload");
    let def = format!("def {func}(");
    let start = text.lines().position(|l| l.starts_with(&def)).expect("def");
    let line = text
        .lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.contains("kept[i] = bytearray"))
        .expect("keeping line")
        .0
        + 1;
    format!("{func} ({script}:{line})")
}

/// A new process of the group given the pid of one that exited and is still kept whole
/// (pids wrap at `kernel.pid_max`; the hour's soak met it once in 7 858 workers): the old
/// one is retired at once, and the new one's blocks are its own, exactly. The kernel
/// counts by pid: before, the two were one process in the report (the first's blocks
/// under the second's pid, one process fewer retired).
#[test]
fn a_pid_used_again_while_its_exited_process_is_kept_starts_a_new_process() {
    if !cgroup_or_skip() {
        return;
    }
    let Some((_, python)) = required_pythons(&["pyenv 3.12.1"]).into_iter().next() else {
        return;
    };
    let dir = scratch("cgroup-pid-reuse");
    let json = dir.join("report.json");
    let (go, stop_file) = (dir.join("go"), dir.join("stop"));
    let script = root().join("tests/workloads/py_pid_reuse.py");
    let s = script.to_str().unwrap();
    let cg = TestCgroup::new("pid-reuse");
    let mut parent = cg.spawn(
        &python,
        &[s, go.to_str().unwrap(), stop_file.to_str().unwrap()],
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cg.procs().contains(&parent.id()) {
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
        // The layers this test was written for (see the first test).
        "--layers",
        "libc,vm,pages",
        "--json",
        json.to_str().unwrap(),
    ]);
    std::fs::write(&go, b"").unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(parent.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let truth: Value = serde_json::from_str(&line).expect("the workload's JSON line");
    assert_eq!(
        truth["same"], true,
        "the kernel did not give the pid again: {truth}"
    );
    let pid = truth["pid"].as_u64().unwrap() as u32;
    // A tick of pyleak's sees the second child's blocks.
    std::thread::sleep(Duration::from_millis(1500));
    let report = stop(pyleak, &json);
    std::fs::write(&stop_file, b"").unwrap();
    let _ = parent.wait();
    cg.remove();

    let (first, second) = (pid_reuse_frame(s, "first"), pid_reuse_frame(s, "second"));
    assert_eq!(
        leaked_at(&report, pid, "libc", &second),
        truth["second"][1].as_u64().unwrap(),
        "the second process's blocks at {second}"
    );
    assert_eq!(
        leaked_at(&report, pid, "libc", &first),
        0,
        "the first process's blocks are under the second's pid"
    );
    let retired = &report["retired"];
    assert_eq!(retired["processes"], 1, "{retired}");
    let libc = retired["live_bytes"]["libc"].as_u64().unwrap();
    let kept = truth["first"][1].as_u64().unwrap();
    assert!(
        libc >= kept && libc < kept + MIB,
        "retired libc {libc} B, the first child kept {kept} B"
    );
    nothing_lost(&report);
}
