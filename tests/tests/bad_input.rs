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

/// The one line on stderr besides the start of tracing (for errors met after it began).
fn one_line_after_tracing(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "should fail: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("pyleak: tracing"))
        .collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    lines[0].to_owned()
}

/// A tmpfs of `size` mounted at a fresh scratch directory (`ro` for read-only), unmounted
/// when dropped.
struct TmpMount(std::path::PathBuf);

impl TmpMount {
    fn new(name: &str, options: &str) -> TmpMount {
        let dir = scratch(name);
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&dir)
            .status()
            .expect("running mount");
        assert!(st.success(), "mounting a tmpfs at {}", dir.display());
        TmpMount(dir)
    }
}

impl Drop for TmpMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
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

#[test]
fn read_only_output_directory() {
    if !root_or_skip() {
        return;
    }
    let ro = TmpMount::new("ro-out", "ro,size=1m");
    let json = ro.0.join("r.json");
    let out = pyleak(&[
        "record",
        "--json",
        json.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    one_line_error(&out, "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "pyleak: cannot write {} (Read-only file system (os error 30)): give a path in a \
             writable directory with free space",
            json.display()
        )
    );
}

#[test]
fn full_disk_while_writing_keeps_the_old_report_whole() {
    if !root_or_skip() {
        return;
    }
    // One 4 KiB page of tmpfs, filled: the report cannot be written once tracing is done.
    let full = TmpMount::new("full-out", "size=4k");
    let json = full.0.join("r.json");
    std::fs::write(&json, "old report").unwrap();
    let filler = full.0.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 8192]);
    let out = pyleak(&[
        "record",
        "-q",
        "--json",
        json.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    assert_eq!(
        one_line_after_tracing(&out),
        format!(
            "pyleak: cannot write {} (No space left on device (os error 28)): give a path in a \
             writable directory with free space",
            json.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&json).unwrap(), "old report");
    let left: Vec<_> = std::fs::read_dir(&full.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "no temp file left: {left:?}");
    assert_no_pyleak_programs();
}

#[test]
fn a_symlink_planted_at_the_output_is_replaced_and_the_file_is_0600() {
    if !root_or_skip() {
        return;
    }
    let dir = scratch("planted");
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let json = dir.join("r.json");
    std::os::unix::fs::symlink(&victim, &json).unwrap();
    let out = pyleak(&[
        "record",
        "-q",
        "--json",
        json.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let meta = std::fs::symlink_metadata(&json).unwrap();
    assert!(meta.is_file(), "the link was replaced by the report");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Asked for: 0644.
    let out = pyleak(&[
        "record",
        "-q",
        "--file-mode",
        "644",
        "--json",
        json.to_str().unwrap(),
        "--",
        "/bin/true",
    ]);
    assert!(out.status.success(), "{out:?}");
    let meta = std::fs::metadata(&json).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
}
