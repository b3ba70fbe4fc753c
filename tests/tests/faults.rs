//! Faults: the target killed, segfaulting, exec'ing, forking 200 children, OOM-killed;
//! pyleak itself short of memory for its maps; two pyleaks on one process. Each recording
//! ends with a report that says what happened and leaves nothing of pyleak in the kernel.
//! The target (tests/workloads/faults.c) leaks 10 blocks of 1000 bytes in
//! `leak_before_fault` before its fault: each report must hold exactly those.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::OnceLock,
};

use pyleak_tests::*;
use serde_json::Value;

/// Builds tests/workloads/faults.c once (-O0, frame pointers: each allocation's caller).
fn faults_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = root().join("target/test-workloads");
        std::fs::create_dir_all(&out).unwrap();
        let bin = out.join("faults");
        let st = Command::new("cc")
            .args(["-O0", "-fno-omit-frame-pointer", "-g", "-o"])
            .arg(&bin)
            .arg(root().join("tests/workloads/faults.c"))
            .status()
            .expect("running cc");
        assert!(st.success(), "cc faults.c");
        bin
    })
    .clone()
}

/// The leak every mode makes: (live bytes, live blocks) under `leak_before_fault`.
fn leak(report: &Value) -> (u64, u64) {
    let under = |f: &[String]| f.iter().any(|f| f == "leak_before_fault (faults)");
    (
        stack_sum(report, "libc", "live_bytes", under),
        stack_sum(report, "libc", "live_count", under),
    )
}

/// `pyleak record --layers libc -- faults ARGS`, which ends with the shell's status `code`
/// (pyleak ends with its command's): the report, its stdout and stderr.
fn launch(name: &str, args: &[&str], code: i32) -> (Value, String, String) {
    let dir = scratch(name);
    let bin = faults_bin();
    let mut all = vec!["--layers", "libc", "--", bin.to_str().unwrap()];
    all.extend_from_slice(args);
    let (report, out) = record_json_ending(&dir, &all, code);
    (
        report,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn target_segfaulting() {
    if !root_or_skip() {
        return;
    }
    let (report, stdout, _) = launch("fault-segv", &["segv"], 128 + libc::SIGSEGV);
    assert_eq!(leak(&report), (10_000, 10));
    assert_eq!(
        report["command_exit"],
        "killed by signal 11 (Segmentation fault)"
    );
    assert!(
        stdout.contains("pyleak: the command ended: killed by signal 11 (Segmentation fault)\n")
    );
    assert_no_pyleak_programs();
}

#[test]
fn target_killed_by_sigkill() {
    if !root_or_skip() {
        return;
    }
    let (report, _, _) = launch("fault-kill9", &["kill9"], 128 + libc::SIGKILL);
    assert_eq!(leak(&report), (10_000, 10));
    assert_eq!(report["command_exit"], "killed by signal 9 (Killed)");
    assert_no_pyleak_programs();
}

#[test]
fn target_execing_another_program() {
    if !root_or_skip() {
        return;
    }
    // The exec'd program runs to its end untouched (it used to get the ptrace SIGTRAP of
    // its exec and die of it): its output and exit status are its own.
    let (report, stdout, _) = launch(
        "fault-exec",
        &["exec", "/bin/sh", "-c", "echo exec-ok; exit 4"],
        4,
    );
    assert!(stdout.starts_with("exec-ok\n"), "{stdout}");
    assert_eq!(report["command_exit"], "exited with status 4");
    // What the first program leaked stays live under its pid. Its frames cannot be named
    // once exec has replaced its memory map (a known limit, README), unless pyleak read
    // that map before the exec (a CI rehearsal under load did): then they are its own,
    // with libc's frame under `main` when that was read too.
    let stacks = report["stacks"].as_array().unwrap();
    let unnamed = serde_json::json!(["[unknown native code]"]);
    let named = |frames: &Value| {
        let f: Vec<&str> = frames
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        f.ends_with(&["main (faults)", "leak_before_fault (faults)"])
            && f.len() <= 3
            && f.first()
                .is_some_and(|r| *r == "main (faults)" || r.contains("libc.so"))
    };
    assert!(
        stacks.iter().any(|s| s["layer"] == "libc"
            && s["live_bytes"] == 10_000
            && s["live_count"] == 10
            && (s["frames"] == unnamed || named(&s["frames"]))),
        "{stacks:?}"
    );
    assert_no_pyleak_programs();
}

#[test]
fn target_forking_200_children() {
    if !root_or_skip() {
        return;
    }
    // Each child mallocs 500 bytes and exits at once, mostly before its probes can go in.
    let (report, stdout, _) = launch("fault-fork", &["fork", "200"], 0);
    assert!(stdout.starts_with("faults: children reaped\n"), "{stdout}");
    assert_eq!(report["command_exit"], "exited with status 0");
    assert_eq!(leak(&report), (10_000, 10));
    let processes = report["processes"].as_array().unwrap();
    assert_eq!(processes.len(), 201, "the command and its 200 children");
    let (children, commands): (Vec<&Value>, Vec<&Value>) =
        processes.iter().partition(|p| p["followed"].is_object());
    assert_eq!(commands.len(), 1, "{commands:?}");
    let command = &commands[0]["pid"];
    let mut traced = 0;
    for p in children {
        let f = &p["followed"];
        assert_eq!(&f["parent"], command, "{p}");
        let pid = p["pid"].as_u64().unwrap();
        let mine: u64 = report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["pid"] == pid && s["layer"] == "libc")
            .map(|s| s["live_bytes"].as_u64().unwrap())
            .sum();
        if f["traced"] == true {
            traced += 1;
            // Its malloc(500) is seen when it came after its probes.
            assert!(mine == 0 || mine == 500, "{p}: {mine} bytes");
        } else {
            assert_eq!(mine, 0, "{p}: untraced, yet {mine} bytes");
        }
    }
    eprintln!("{traced} of 200 children traced before they exited");
    assert_eq!(
        stack_sum(&report, "libc", "allocs", |_| true),
        report["layers"]["libc"]["allocs"].as_u64().unwrap()
    );
    assert_no_pyleak_programs();
}

#[test]
fn target_forking_200_children_not_followed() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("fault-fork-nofollow");
    let bin = faults_bin();
    let (report, out) = record_json(
        &dir,
        &[
            "--layers",
            "libc",
            "--no-follow",
            "--",
            bin.to_str().unwrap(),
            "fork",
            "200",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("faults: children reaped\n"), "{stdout}");
    assert_eq!(report["command_exit"], "exited with status 0");
    // The command is traced, not its children.
    assert_eq!(leak(&report), (10_000, 10));
    let pids: Vec<&Value> = report["processes"].as_array().unwrap().iter().collect();
    assert_eq!(pids.len(), 1, "only the command: {pids:?}");
    assert_no_pyleak_programs();
}

/// Starts `faults wait GO` (it leaks once GO exists, then prints `faults: ready`).
fn waiting_target(go: &std::path::Path) -> std::process::Child {
    let _ = std::fs::remove_file(go);
    Command::new(faults_bin())
        .arg("wait")
        .arg(go)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_ready(target: &mut std::process::Child) {
    let mut line = String::new();
    BufReader::new(target.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "faults: ready\n");
}

#[test]
fn attached_target_sigkilled_mid_recording() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("fault-attached-kill");
    let go = dir.join("go");
    let json = dir.join("r.json");
    let mut target = waiting_target(&go);
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "--layers",
        "libc",
        "-p",
        &target.id().to_string(),
        "--json",
        json.to_str().unwrap(),
    ]);
    std::fs::write(&go, b"").unwrap();
    wait_ready(&mut target);
    target.kill().unwrap();
    target.wait().unwrap();
    // pyleak ends by itself once its only target is gone, with the report.
    let out = pyleak.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(leak(&report), (10_000, 10));
    assert!(
        report.get("command_exit").is_none(),
        "an attached process's end is not seen"
    );
    assert_no_pyleak_programs();
}

#[test]
fn two_pyleaks_on_one_process_are_both_exact() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("fault-two");
    let go = dir.join("go");
    let mut target = waiting_target(&go);
    let pid = target.id().to_string();
    let jsons = [dir.join("a.json"), dir.join("b.json")];
    let pyleaks: Vec<_> = jsons
        .iter()
        .map(|j| {
            spawn_pyleak(&[
                "record",
                "-q",
                "--layers",
                "libc",
                "-p",
                &pid,
                "--json",
                j.to_str().unwrap(),
            ])
        })
        .collect();
    std::fs::write(&go, b"").unwrap();
    wait_ready(&mut target);
    for p in pyleaks {
        signal(p.id(), libc::SIGINT);
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    target.kill().unwrap();
    target.wait().unwrap();
    for j in &jsons {
        let report: Value = serde_json::from_str(&std::fs::read_to_string(j).unwrap()).unwrap();
        assert_eq!(leak(&report), (10_000, 10), "{}", j.display());
        assert_eq!(report["lost_events"], 0);
    }
    assert_no_pyleak_programs();
}

/// A memory cgroup made for one test, removed when dropped. This host's cgroup v2
/// hierarchy (/sys/fs/cgroup/unified) has no memory controller (it is bound to the v1
/// hierarchy at /sys/fs/cgroup/memory), so the limit is v1's `memory.limit_in_bytes`.
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    fn new(name: &str, limit: &str) -> Option<MemoryCgroup> {
        let v1 = PathBuf::from("/sys/fs/cgroup/memory");
        if !skip_unless(
            v1.join("memory.limit_in_bytes").exists(),
            "no cgroup v1 memory controller at /sys/fs/cgroup/memory",
        ) {
            return None;
        }
        let dir = v1.join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.limit_in_bytes"), limit).unwrap();
        Some(MemoryCgroup(dir))
    }

    /// `sh -c` text that moves the shell into the group, then execs `then`.
    fn enter_then(&self, then: &str) -> String {
        format!("echo $$ > {}/cgroup.procs && exec {then}", self.0.display())
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn target_oom_killed_in_a_memory_cgroup() {
    if !root_or_skip() {
        return;
    }
    let Some(cg) = MemoryCgroup::new("pyleak-oom", "64M") else {
        return;
    };
    let bin = faults_bin();
    // The shell joins the group and execs the target, which grows past the limit.
    let script = cg.enter_then(&format!("{} grow 1024", bin.display()));
    let dir = scratch("fault-oom");
    let (report, _) = record_json_ending(
        &dir,
        &["--layers", "libc", "--", "sh", "-c", &script],
        128 + libc::SIGKILL,
    );
    assert_eq!(report["command_exit"], "killed by signal 9 (Killed)");
    let oom = std::fs::read_to_string(cg.0.join("memory.oom_control")).unwrap();
    assert!(
        oom.contains("oom_kill 1"),
        "the OOM killer killed it: {oom}"
    );
    assert_eq!(leak(&report), (10_000, 10));
    assert_no_pyleak_programs();
}

#[test]
fn pyleak_under_a_memory_limit_too_low_for_its_maps() {
    if !root_or_skip() {
        return;
    }
    let Some(cg) = MemoryCgroup::new("pyleak-maps", "30M") else {
        return;
    };
    let script = cg.enter_then(&format!("{} record -- /bin/true", pyleak_bin().display()));
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let group = format!(
        "/{}",
        cg.0.strip_prefix("/sys/fs/cgroup/memory")
            .unwrap()
            .display()
    );
    let want_start = "pyleak: the kernel could not allocate pyleak's maps: they need about ";
    let want_end = format!(
        " MiB of kernel memory at start (more as stacks are found), charged to pyleak's memory cgroup {group}, limited to 30 MiB: raise its limit to at least "
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(want_start) && err.contains(&want_end),
        "{err}"
    );
    // The figure it gives is enough: the same recording under that limit works.
    let need: u64 = err[err.find("at least ").unwrap() + 9..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    std::fs::write(cg.0.join("memory.limit_in_bytes"), format!("{need}M")).unwrap();
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "with {need} MiB: {out:?}");
    assert_no_pyleak_programs();
}

/// `pyleak record` with one of its maps shrunk (`PYLEAK_TEST_MAP_ENTRIES`) so that it
/// fills: the drops are counted under `reason` in `lost`, in `lost_events` and on the
/// summary's `lost events` line, and the report is still written whole.
fn fill_map(name: &str, map: &str, entries: u32, reason: &str, args: &[&str]) -> Value {
    let dir = scratch(name);
    let json = dir.join("r.json");
    let mut all = vec!["record", "-q", "--json", json.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = Command::new(pyleak_bin())
        .env("PYLEAK_TEST_MAP_ENTRIES", format!("{map}={entries}"))
        .args(&all)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let lost = &report["lost"];
    let dropped = lost[reason].as_u64().unwrap();
    assert!(dropped > 0, "{map} of {entries} filled: {lost}");
    let sum: u64 = lost
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(report["lost_events"], sum);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("lost events: {sum} ({reason} {dropped}")),
        "{stdout}"
    );
    assert_eq!(report["command_exit"], "exited with status 0");
    if reason == "stacks_full" {
        // What it means and what to do, under the lost events.
        assert!(
            stdout.contains("the kernel's stack table (STACKS,")
                && stdout.contains("--pymalloc sampled"),
            "{stdout}"
        );
    }
    assert_no_pyleak_programs();
    report
}

#[test]
fn ring_buffer_full() {
    if !root_or_skip() {
        return;
    }
    // One page of ring buffer against 64 MiB touched a page at a time (16k page faults).
    let bin = faults_bin();
    fill_map(
        "full-ring",
        "EVENTS",
        4096,
        "ring_full",
        &[
            "--layers",
            "vm,pages",
            "--",
            bin.to_str().unwrap(),
            "grow",
            "64",
        ],
    );
}

#[test]
fn live_block_table_and_overflow_map_full() {
    if !root_or_skip() {
        return;
    }
    // More live blocks than the table's 2 Mi slots (256 Ki buckets of 8; Fibonacci hashing
    // spreads a malloc's evenly spaced addresses evenly, so buckets fill together): those
    // past it go to the overflow map, shrunk to 64 entries, which fills.
    let bin = faults_bin();
    let report = fill_map(
        "full-live",
        "LIVE_ALLOCS",
        64,
        "live_allocs_full",
        &[
            "--layers",
            "libc",
            "--",
            bin.to_str().unwrap(),
            "many",
            "2300000",
        ],
    );
    // Every block past the table's and the overflow map's room is a drop; the layer's
    // counters still count every block.
    // pyleak-common: LIVE_TABLE_BUCKETS (2^18) × LIVE_BUCKET_SLOTS (8), and the 64 above.
    let room: u64 = (1 << 21) + 64;
    let dropped = report["lost"]["live_allocs_full"].as_u64().unwrap();
    assert!(dropped >= 2_300_000 - room, "{dropped} dropped");
    assert!(layer(&report, "libc")["live_count"].as_u64().unwrap() >= 2_300_000);
}

#[test]
fn stack_map_full() {
    if !root_or_skip() {
        return;
    }
    let bin = c_workload();
    fill_map(
        "full-stacks",
        "STACKS",
        2,
        "stacks_full",
        &["--layers", "libc", "--", bin.to_str().unwrap()],
    );
}

#[test]
fn per_stack_totals_full() {
    if !root_or_skip() {
        return;
    }
    let bin = c_workload();
    fill_map(
        "full-stack-stats",
        "STACK_STATS",
        2,
        "stack_stats_full",
        &["--layers", "libc", "--", bin.to_str().unwrap()],
    );
}
