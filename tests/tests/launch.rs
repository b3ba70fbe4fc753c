//! A launched command (`pyleak record -- COMMAND`) behaves as without pyleak: a Ctrl-C
//! reaches it once, a stop signal stops it, `-d` ends the recording on time and leaves it
//! running, a command that cannot run is one line and a non-zero exit, and a Python that a
//! launched `env`, `setsid` or `bash -c` execs is traced from its first allocation.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pyleak_tests::*;

/// `pyleak record --json DIR/r.json -- PYTHON py_cleanup.py` in a process group of its own
/// (as a shell job is); returns pyleak once the command printed `running`, and its stdout.
fn cleanup_command(
    dir: &std::path::Path,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let py = python312();
    let mut cmd = Command::new(pyleak_bin());
    cmd.args(["record", "-q", "-o", "/dev/null", "--json"])
        .arg(dir.join("r.json"))
        .arg("--")
        .arg(py)
        .arg(root().join("tests/workloads/py_cleanup.py"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    // SIGINT as a terminal's job has it: a test run in the background of a shell without
    // job control inherits it ignored, and pyleak, like a shell, hands the command the
    // dispositions it got (Python installs no Ctrl-C handler when SIGINT is ignored).
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut pyleak = cmd.spawn().expect("starting pyleak");
    let mut out = BufReader::new(pyleak.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "running");
    (pyleak, out)
}

/// pyenv's CPython 3.12.1, which these tests launch.
fn python312() -> std::path::PathBuf {
    let (_, py) = required_pythons(&["pyenv 3.12.1"])
        .into_iter()
        .next()
        .expect("pyenv 3.12.1");
    py
}

fn rest(out: BufReader<std::process::ChildStdout>) -> Vec<String> {
    out.lines().map_while(Result::ok).collect()
}

/// Ctrl-C in a terminal signals the whole foreground group, the command with pyleak, a
/// terminal's hang-up its whole session, and `kill -TERM -PGID` (a service manager's stop)
/// the whole group: the command runs its handler to the end, undisturbed (pyleak once sent
/// it SIGTERM on top, killing its cleanup; a SIGHUP killed pyleak without a report; a
/// group's SIGTERM reached it twice). Each signal to pyleak alone is passed on as such.
/// pyleak ends with the command's exit status, as `time` does.
#[test]
fn a_signal_reaches_a_launched_command_once() {
    if !root_or_skip() {
        return;
    }
    for signal in [libc::SIGINT, libc::SIGHUP, libc::SIGTERM] {
        for to_group in [true, false] {
            let dir = scratch(&format!("launch-signal-{signal}-{to_group}"));
            let (mut pyleak, out) = cleanup_command(&dir);
            let pid = pyleak.id() as libc::pid_t;
            // SAFETY: signalling the group (or the process) of our own child.
            unsafe { libc::kill(if to_group { -pid } else { pid }, signal) };
            let lines = rest(out);
            let status = pyleak.wait().unwrap();
            assert!(
                lines.iter().any(|l| l == "cleanup done"),
                "signal {signal} to the group: {to_group}: {lines:?}"
            );
            assert_eq!(status.code(), Some(4), "signal {signal}, {to_group}");
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("r.json")).unwrap())
                    .unwrap();
            assert_eq!(
                report["command_exit"], "exited with status 4",
                "signal {signal}, {to_group}"
            );
        }
    }
    assert_no_pyleak_programs();
}

/// The state letter of `pid` (`/proc/PID/stat`, after the command name).
fn state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(") ")
        .next()
        .and_then(|s| s.chars().next())
        .unwrap_or('?')
}

/// SIGSTOP stops the command as it would untraced, until SIGCONT (pyleak's tracer once
/// let it run on through the stop).
#[test]
fn a_stop_signal_stops_a_launched_command() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("launch-stop");
    let (mut pyleak, out) = cleanup_command(&dir);
    // Its launcher thread forked it: the children of every task of pyleak's.
    let command = std::fs::read_dir(format!("/proc/{}/task", pyleak.id()))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| {
            c.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .next();
    let Some(command) = command else {
        let _ = pyleak.kill();
        panic!("the command is no child of pyleak's");
    };
    // SAFETY: signalling the command pyleak started for us.
    unsafe { libc::kill(command as libc::pid_t, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(state(command), 'T' | 't') {
        assert!(Instant::now() < deadline, "not stopped: {}", state(command));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still stopped a while later: a SIGINT now waits with it.
    std::thread::sleep(Duration::from_millis(500));
    assert!(matches!(state(command), 'T' | 't'), "{}", state(command));
    // SAFETY: as above.
    unsafe {
        libc::kill(command as libc::pid_t, libc::SIGCONT);
        libc::kill(command as libc::pid_t, libc::SIGINT);
    }
    let lines = rest(out);
    assert_eq!(
        pyleak.wait().unwrap().code(),
        Some(4),
        "the command's status"
    );
    assert!(lines.iter().any(|l| l == "cleanup done"), "{lines:?}");
    assert_no_pyleak_programs();
}

/// `-d 2` with a command: two seconds recorded (once four: a grace meant for a signalled
/// command), and the command runs on after pyleak.
#[test]
fn duration_ends_a_launched_recording_on_time() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("launch-duration");
    let json = dir.join("r.json");
    let out = Command::new(pyleak_bin())
        .args(["record", "-q", "-d", "2", "-o", "/dev/null", "--json"])
        .arg(&json)
        .args(["--", "sleep", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let recorded = report["duration_s"].as_f64().unwrap();
    assert!((2.0..2.5).contains(&recorded), "recorded {recorded} s");
    assert!(
        report["command_exit"].is_null(),
        "{}",
        report["command_exit"]
    );
    assert_no_pyleak_programs();
}

/// A command whose exec fails (a script whose #! interpreter is missing; a file that is
/// not executable; a directory): one line that says why, exit status 1, no report.
#[test]
fn a_command_that_cannot_run_is_one_line() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("launch-cannot-run");
    let script = dir.join("bad.py");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    let plain = dir.join("plain.py");
    std::fs::write(&plain, "print(1)\n").unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    for (cmd, says) in [
        (script.to_str().unwrap(), "cannot run"),
        (plain.to_str().unwrap(), "is not executable"),
        (dir.to_str().unwrap(), "is a directory"),
    ] {
        let out = Command::new(pyleak_bin())
            .args(["record", "--", cmd])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{cmd}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| !l.contains("warning")).collect();
        assert_eq!(errors.len(), 1, "{cmd}: {stderr}");
        assert!(errors[0].contains(says), "{cmd}: {stderr}");
        assert!(out.stdout.is_empty(), "{cmd}: a report: {out:?}");
    }
    assert_no_pyleak_programs();
}

/// A standard output that fails (a pipe closed by `head`) costs the report files nothing:
/// they are written first, then one line says what failed.
#[test]
fn a_closed_stdout_does_not_cost_the_report_files() {
    if !root_or_skip() {
        return;
    }
    let py = python312();
    let dir = scratch("launch-closed-stdout");
    let (json, folded) = (dir.join("r.json"), dir.join("r.folded"));
    let mut pyleak = Command::new(pyleak_bin())
        .args(["record", "-q", "--json"])
        .arg(&json)
        .arg("-o")
        .arg(&folded)
        .arg("--")
        .arg(&py)
        .args(["-c", "x = [bytearray(100_000) for _ in range(5)]"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(pyleak.stdout.take());
    let out = pyleak.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("writing the report to standard output"),
        "{stderr}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["command_exit"], "exited with status 0");
    assert!(std::fs::metadata(&folded).unwrap().len() > 0);
    assert_no_pyleak_programs();
}

/// `env`, `setsid` and `bash -c` exec Python in the process pyleak launched: it is held at
/// that exec until its new program is probed, so a leak made in the interpreter's first
/// milliseconds (and a short script's whole run) is named, bytes and line, as when Python
/// is launched directly. Before the hold, those runs had no Python frame at all.
#[test]
fn a_python_execd_by_env_setsid_or_bash_is_traced_from_its_start() {
    if !root_or_skip() {
        return;
    }
    let py = python312();
    let script = workload("py_early_leak.py");
    let line = marker_line(&script, "# the leak");
    let py = py.to_str().unwrap();
    let through_bash = format!("{py} {script}");
    let dir = scratch("launch-exec");
    for cmd in [
        vec![py, script.as_str()],
        vec!["/usr/bin/env", py, script.as_str()],
        vec!["/usr/bin/setsid", py, script.as_str()],
        vec!["/bin/bash", "-c", through_bash.as_str()],
    ] {
        let mut args = vec!["--layers", "libc", "--"];
        args.extend_from_slice(&cmd);
        let (report, _) = record_json(&dir, &args);
        let leaf = format!("early ({script}:{line})");
        let live: u64 = report["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["layer"] == "libc"
                    && s["frames"]
                        .as_array()
                        .unwrap()
                        .last()
                        .and_then(|f| f.as_str())
                        == Some(leaf.as_str())
            })
            .map(|s| s["live_bytes"].as_u64().unwrap())
            .sum();
        // 500 buffers of 4001 bytes, and the list's item array (made on the same line).
        assert!(
            (500 * 4001..=500 * 4001 + 8192).contains(&live),
            "{cmd:?}: {live} B live at {leaf}; libc stacks over 100 kB: {:#?}",
            report["stacks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["layer"] == "libc" && s["live_bytes"].as_u64().unwrap() > 100_000)
                .map(|s| (s["live_bytes"].clone(), s["frames"].clone()))
                .collect::<Vec<_>>()
        );
    }
    assert_no_pyleak_programs();
}

/// A launched command that starts a process and does not wait for it: the recording ends
/// with the command, and pyleak says which followed process was still running, untraced
/// from then on (before, the child's report was cut off without a word).
#[test]
fn a_child_left_running_by_the_command_is_said_so() {
    if !root_or_skip() {
        return;
    }
    let py = python312();
    let dir = scratch("child-left-running");
    let pidfile = dir.join("child.pid");
    let code = format!(
        "import subprocess, sys\n\
         p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)'],\n\
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n\
         open({:?}, 'w').write(str(p.pid))\n",
        pidfile.to_str().unwrap()
    );
    let out = pyleak(&[
        "record",
        "-q",
        "-o",
        dir.join("r.txt").to_str().unwrap(),
        "--",
        py.to_str().unwrap(),
        "-c",
        &code,
    ]);
    assert!(out.status.success(), "{out:?}");
    let child = std::fs::read_to_string(&pidfile).expect("the child's pid");
    let child: u32 = child.trim().parse().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    signal(child, libc::SIGKILL);
    assert!(
        err.contains(&format!(
            "1 followed process(es) still running, no longer traced (pid {child})"
        )),
        "{err}"
    );
    assert_no_pyleak_programs();
}
