//! Bad input: each a one-line error that says what to do, and a non-zero exit.

use std::process::Command;

use pyleak_tests::*;

fn one_line_error(out: &std::process::Output, want: &str) {
    assert!(!out.status.success(), "should fail: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(
        lines[0].starts_with("pyleak: ") && lines[0].contains(want),
        "{err}"
    );
}

#[test]
fn not_root() {
    if !root_or_skip() {
        return;
    }
    // Drop to nobody for this one run.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(pyleak_bin())
        .args(["record", "--", "/bin/true"])
        .output()
        .expect("running setpriv");
    one_line_error(&out, "needs root");
}

#[test]
fn pid_that_does_not_exist() {
    if !root_or_skip() {
        return;
    }
    one_line_error(
        &pyleak(&["record", "-p", "999999999"]),
        "no process with PID 999999999",
    );
}

#[test]
fn empty_command() {
    if !root_or_skip() {
        return;
    }
    one_line_error(&pyleak(&["record", "--"]), "empty command");
    one_line_error(&pyleak(&["record"]), "nothing to trace");
}

#[test]
fn command_not_found() {
    if !root_or_skip() {
        return;
    }
    one_line_error(
        &pyleak(&["record", "--", "no-such-program-xyz"]),
        "not found",
    );
}

#[test]
fn unknown_layer() {
    if !root_or_skip() {
        return;
    }
    one_line_error(
        &pyleak(&["record", "--layers", "heap", "--", "/bin/true"]),
        "unknown layer `heap`",
    );
}

#[test]
fn unwritable_output() {
    if !root_or_skip() {
        return;
    }
    one_line_error(
        &pyleak(&[
            "record",
            "--json",
            "/nonexistent/dir/r.json",
            "--",
            "/bin/true",
        ]),
        "cannot write /nonexistent/dir/r.json",
    );
}

#[test]
fn tracefs_not_mounted_is_mounted_by_pyleak() {
    if !root_or_skip() {
        return;
    }
    // With debugfs mounted, pyleak uses its copy of tracefs and mounts nothing: there is no
    // mount to test.
    let debugfs_copy = std::path::Path::new("/sys/kernel/debug/tracing/events").exists();
    if !skip_unless(
        !debugfs_copy,
        "debugfs is mounted (its tracing/ serves pyleak): run `umount /sys/kernel/debug`",
    ) {
        return;
    }
    let tracing = std::path::Path::new("/sys/kernel/tracing/events");
    if tracing.exists() {
        let st = Command::new("umount")
            .arg("/sys/kernel/tracing")
            .status()
            .unwrap();
        if !skip_unless(st.success(), "cannot unmount tracefs to test mounting it") {
            return;
        }
    }
    let out = pyleak(&["record", "-q", "--", "/bin/true"]);
    assert!(out.status.success(), "{out:?}");
    assert!(tracing.exists(), "pyleak mounted tracefs");
}

#[test]
fn cgroup_that_is_not_a_cgroup_v2_directory() {
    if !root_or_skip() {
        return;
    }
    // A plain directory, a missing group, a cgroup v1 hierarchy's directory.
    for path in [
        "/tmp",
        "/sys/fs/cgroup/unified/no-such-group-xyz",
        "/sys/fs/cgroup/memory",
    ] {
        if path.contains("memory") && !std::path::Path::new(path).exists() {
            continue;
        }
        one_line_error(
            &pyleak(&["record", "--cgroup", path]),
            "is not a cgroup v2 directory",
        );
    }
}

#[test]
fn unknown_or_malformed_container_id() {
    if !root_or_skip() {
        return;
    }
    one_line_error(
        &pyleak(&["record", "--container", "0123456789abcdef"]),
        "no container with id `0123456789abcdef`",
    );
    one_line_error(
        &pyleak(&["record", "--container", "my-app"]),
        "`my-app` is not a container id",
    );
}

#[test]
fn two_kinds_of_target() {
    if !root_or_skip() {
        return;
    }
    one_line_error(
        &pyleak(&["record", "--all", "--cgroup", "/sys/fs/cgroup/unified"]),
        "give one kind of target",
    );
    one_line_error(
        &pyleak(&["record", "--all", "-p", "1"]),
        "give one kind of target",
    );
}
