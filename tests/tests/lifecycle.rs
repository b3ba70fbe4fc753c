//! Every way a recording ends leaves nothing of pyleak in the kernel (programs, multi-uprobe
//! links, tracefs uprobes): Ctrl-C, SIGTERM, the target exiting, an error while writing the
//! report, and pyleak itself killed with SIGKILL; a target that did not end keeps running.
//! The leftover check tolerates another live recording and catches what none holds.

use std::process::{Command, Stdio};

use pyleak_tests::*;

fn sleeper() -> std::process::Child {
    Command::new("sleep")
        .arg("60")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting sleep")
}

fn ends_clean_on(sig: libc::c_int) {
    let dir = scratch(&format!("signal-{sig}"));
    let mut target = sleeper();
    let json = dir.join("r.json");
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "-p",
        &target.id().to_string(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let held = leftovers::held_by(pyleak.id());
    assert!(
        !held.programs.is_empty(),
        "programs should be loaded while tracing"
    );
    assert!(
        pyleak_links()
            .iter()
            .any(|(id, ty, _)| held.links.contains(id)
                && (ty.contains("uprobe_multi") || ty == "12")),
        "uprobes should be multi-uprobe links: {:?}",
        bpf_links()
    );
    signal(pyleak.id(), sig);
    let out = pyleak.wait_with_output().unwrap();
    assert!(out.status.success(), "pyleak after signal {sig}: {out:?}");
    assert!(json.exists(), "report written after signal {sig}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["probe_links"], "multi-uprobe");
    let detach = report["probes_detach_s"].as_f64().unwrap();
    assert!(detach > 0.0, "detach time measured: {detach}");
    assert_no_pyleak_programs();
    assert!(
        target.try_wait().unwrap().is_none(),
        "the target keeps running after pyleak's signal {sig}"
    );
    let _ = target.kill();
    let _ = target.wait();
}

#[test]
fn ctrl_c_detaches_everything() {
    if root_or_skip() {
        ends_clean_on(libc::SIGINT);
    }
}

#[test]
fn sigterm_detaches_everything() {
    if root_or_skip() {
        ends_clean_on(libc::SIGTERM);
    }
}

#[test]
fn target_exit_detaches_everything() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("exit");
    let (report, _) = record_json(&dir, &["--", "/bin/true"]);
    assert!(report["layers"]["libc"].is_object());
    assert_no_pyleak_programs();
}

#[test]
fn attached_process_exiting_mid_run_still_gets_a_report() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("pid-exits");
    // Long enough for pyleak to start on a loaded machine; it may still exit while the
    // probes go in, which must end the same way.
    let mut target = Command::new("sleep").arg("3").spawn().unwrap();
    let json = dir.join("r.json");
    let out = pyleak(&[
        "record",
        "-q",
        "-p",
        &target.id().to_string(),
        "--json",
        json.to_str().unwrap(),
        "-d",
        "30",
    ]);
    let _ = target.wait();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["processes"][0]["pid"], target.id());
    assert!(
        report["duration_s"].as_f64().unwrap() < 10.0,
        "ended when the process exited"
    );
    assert_no_pyleak_programs();
}

#[test]
fn error_while_writing_the_report_detaches_everything() {
    if !root_or_skip() {
        return;
    }
    // /dev/full accepts the open and fails the write: an error after tracing has begun.
    let out = pyleak(&["record", "-q", "-o", "/dev/full", "--", "/bin/true"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("pyleak: tracing"))
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains("cannot write /dev/full"),
        "one-line error: {err}"
    );
    assert_no_pyleak_programs();
}

#[test]
fn duration_ends_the_recording() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("duration");
    let mut target = sleeper();
    let (report, _) = record_json(&dir, &["-p", &target.id().to_string(), "-d", "1"]);
    let d = report["duration_s"].as_f64().unwrap();
    assert!((0.9..5.0).contains(&d), "duration {d}");
    let _ = target.kill();
    let _ = target.wait();
    assert_no_pyleak_programs();
}

/// pyleak killed outright: the kernel closes its links and programs, and a traced Python
/// (every layer probed, breakpoints in its code) finishes its work as if never traced.
#[test]
fn sigkill_of_pyleak_leaves_nothing_and_the_target_runs_on() {
    if !root_or_skip() {
        return;
    }
    // Debian's LTO build: the most probes (hundreds of inlined allocator copies).
    let Some((_, python)) = required_pythons(&["debian 3.11"]).into_iter().next() else {
        return;
    };
    let script = "import time\nkeep = []\nfor i in range(400):\n    keep.append([i] * 50)\n    time.sleep(0.01)\nprint('done', sum(len(k) for k in keep))\n";
    let mut target = Command::new(&python)
        .args(["-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting python");
    let pyleak = spawn_pyleak(&[
        "record",
        "-q",
        "--layers",
        "all",
        "-p",
        &target.id().to_string(),
    ]);
    assert!(
        !leftovers::held_by(pyleak.id()).links.is_empty(),
        "links placed while tracing"
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(pyleak.id(), libc::SIGKILL);
    let out = pyleak.wait_with_output().unwrap();
    assert!(!out.status.success(), "pyleak was killed: {out:?}");
    assert_no_pyleak_programs();
    assert!(
        target.try_wait().unwrap().is_none(),
        "the target still runs after pyleak's SIGKILL"
    );
    let done = target.wait_with_output().unwrap();
    assert!(done.status.success(), "target: {done:?}");
    assert_eq!(String::from_utf8_lossy(&done.stdout), "done 20000\n");
}

/// Another recording (a pyleak outside this test's process tree, as a soak or another
/// person's test is) is not a leftover while it lives; a program of it that outlives it (a
/// pin in bpffs holds it after its SIGKILL) is.
#[test]
fn leftover_check_tolerates_another_recording_not_what_it_left() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("another");
    let mut target = sleeper();
    let log = dir.join("stderr");
    // The shell starts pyleak in the background and exits: pyleak is no descendant of ours.
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#""$0" record -q -p "$1" -d 60 -o /dev/null >/dev/null 2>"$2" & echo $!"#)
        .arg(pyleak_bin())
        .arg(target.id().to_string())
        .arg(&log)
        .output()
        .expect("starting pyleak through sh");
    let pid: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("sh printed pyleak's pid");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("pyleak: tracing")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "pyleak did not start tracing within 30 s: {:?}",
            std::fs::read_to_string(&log)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let held = leftovers::held_by(pid);
    let (&prog, &link) = (
        held.programs.iter().next().expect("its programs"),
        held.links.iter().next().expect("its links"),
    );
    assert!(pyleak_program_ids().contains(&prog));
    assert_no_pyleak_programs();

    // Pin one of its programs and one of its links in a bpffs of our own, then kill it.
    let fs = dir.join("bpffs");
    std::fs::create_dir_all(&fs).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&fs)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a bpffs at {}", fs.display());
    let pin = |what: &str, id: u64| {
        let ok = Command::new("bpftool")
            .args([what, "pin", "id", &id.to_string()])
            .arg(fs.join(what))
            .status()
            .unwrap();
        assert!(ok.success(), "bpftool {what} pin id {id}");
    };
    pin("prog", prog);
    pin("link", link);
    signal(pid, libc::SIGKILL);
    while leftovers::held_by(pid).programs.contains(&prog) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let left = pyleak_leftovers();
    let unmount = || {
        let _ = Command::new("umount").arg(&fs).status();
    };
    if !(left.programs.iter().any(|(id, _)| *id == prog)
        && left.links.iter().any(|(id, _, _)| *id == link))
    {
        unmount();
        panic!("the pinned program {prog} and link {link} are leftovers: {left:?}");
    }
    unmount();
    let _ = target.kill();
    let _ = target.wait();
    assert_no_pyleak_programs();
}
