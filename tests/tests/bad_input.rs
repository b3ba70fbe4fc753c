//! Bad input: each a one-line error that says what to do, and a non-zero exit. The
//! command line, the output files, the host; bad targets are in `bad_targets.rs`.

use std::process::Command;

use pyleak_tests::{one_line::*, *};

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

#[test]
fn durations_and_intervals_out_of_range() {
    if !root_or_skip() {
        return;
    }
    let d = "--duration must be above 0 and at most 1e9 seconds, not";
    let tail = ": e.g. `-d 60`, or leave it out to record until Ctrl-C";
    exact_error(
        &["record", "-d", "0", "--", "/bin/true"],
        &format!("{d} 0.0{tail}"),
    );
    exact_error(
        &["record", "-d", "-1", "--", "/bin/true"],
        &format!("{d} -1.0{tail}"),
    );
    exact_error(
        &["record", "-d", "1e300", "--", "/bin/true"],
        &format!("{d} 1e300{tail}"),
    );
    exact_error(
        &["record", "--interval", "10", "-d", "5", "--", "/bin/true"],
        "--interval 10 is longer than --duration 5: no growth sample would be taken; give an interval below the duration, e.g. `--interval 0.5`",
    );
    exact_error(
        &["record", "--interval", "1e300", "--", "/bin/true"],
        "--interval must be above 0 and at most 1e9 seconds, not 1e300: e.g. `--interval 2`",
    );
    exact_error(
        &["record", "--interval", "NaN", "--", "/bin/true"],
        "--interval must be above 0 and at most 1e9 seconds, not NaN: e.g. `--interval 2`",
    );
    exact_error(
        &["record", "--min-age", "-3", "--", "/bin/true"],
        "--min-age must be zero or more seconds, not -3: e.g. `--min-age 1`",
    );
    for depth in ["0", "33"] {
        exact_error(
            &["record", "--native-depth", depth, "--", "/bin/true"],
            &format!("--native-depth must be 1 to 32, not {depth}: e.g. `--native-depth 8`"),
        );
    }
}

#[test]
fn unknown_flags_and_bad_file_modes_are_one_line() {
    if !root_or_skip() {
        return;
    }
    exact_error(
        &["record", "--bogus", "--", "/bin/true"],
        "unexpected argument '--bogus' found; tip: to pass '--bogus' as a value, use '-- --bogus'; see `pyleak --help`",
    );
    exact_error(
        &["record", "--file-mode", "999", "--", "/bin/true"],
        "invalid value '999' for '--file-mode <OCTAL>': `999` is not a file mode: give octal permission bits, e.g. 600 or 644; see `pyleak --help`",
    );
}

#[test]
fn not_root_with_only_cap_bpf_and_cap_perfmon() {
    if !root_or_skip() {
        return;
    }
    // nobody's copy of the binary: target/ may not be reachable for it.
    let bin = std::env::temp_dir().join(format!("pyleak-caps-{}", std::process::id()));
    std::fs::copy(pyleak_bin(), &bin).unwrap();
    let as_nobody = |caps: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--ambient-caps={caps}"))
            .arg(&bin)
            .args(["record", "-q", "-d", "0.5", "--", "/bin/true"])
            .output()
            .expect("running setpriv")
    };
    let out = as_nobody("+bpf,+perfmon");
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "pyleak: pyleak is missing capabilities: CAP_SYS_PTRACE (read another user's memory map and memory), CAP_DAC_OVERRIDE (tracefs files owned by root): run it as root, or grant them (e.g. `setpriv --ambient-caps` or a container's `--cap-add`)\n"
    );
    // With the four it needs, nobody records.
    let out = as_nobody("+bpf,+perfmon,+sys_ptrace,+dac_override");
    let _ = std::fs::remove_file(&bin);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("lost events: 0"));
    assert_no_pyleak_programs();
}

/// Runs `script` (sh) in a private mount namespace, where what it mounts hides the host's
/// files from pyleak only.
fn in_mount_namespace(script: &str) -> std::process::Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("PYLEAK", pyleak_bin())
        .output()
        .expect("running unshare")
}

#[test]
fn no_kernel_btf_is_not_needed() {
    if !root_or_skip() {
        return;
    }
    // pyleak's programs use no CO-RE relocations: without /sys/kernel/btf/vmlinux they
    // load and count as usual.
    let out = in_mount_namespace(
        "mount -t tmpfs none /sys/kernel/btf && test ! -e /sys/kernel/btf/vmlinux && \"$PYLEAK\" record -q --layers libc -- /bin/true",
    );
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines().all(|l| l.starts_with("pyleak: tracing")),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("lost events: 0"));
}

#[test]
fn cgroup_v1_only_host() {
    if !root_or_skip() {
        return;
    }
    // Hide the cgroup v2 mount: only the v1 hierarchies are left.
    let out = in_mount_namespace(
        "umount /sys/fs/cgroup/unified && exec \"$PYLEAK\" record --cgroup system.slice",
    );
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "pyleak: no cgroup v2 hierarchy is mounted (no cgroup2 entry in /proc/self/mountinfo): mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`\n"
    );
}

#[test]
fn kernel_lockdown_confidentiality() {
    if !root_or_skip() {
        return;
    }
    // This kernel has no lockdown LSM and lockdown cannot be undone once set: the mode is
    // read from a file put in place of /sys/kernel/security/lockdown (what the kernel
    // writes there is `none integrity [confidentiality]`).
    let out = in_mount_namespace(
        "mount -t tmpfs none /sys/kernel/security && echo 'none integrity [confidentiality]' > /sys/kernel/security/lockdown && exec \"$PYLEAK\" record -- /bin/true",
    );
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "pyleak: the kernel is in lockdown confidentiality mode (/sys/kernel/security/lockdown), which closes tracefs and eBPF's kernel reads to pyleak: boot with `lockdown=integrity` (or none) to trace\n"
    );
    // Integrity mode leaves what pyleak needs open.
    let out = in_mount_namespace(
        "mount -t tmpfs none /sys/kernel/security && echo 'none [integrity] confidentiality' > /sys/kernel/security/lockdown && exec \"$PYLEAK\" record -q -- /bin/true",
    );
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn reports_that_are_not_reports() {
    // `pyleak report` needs no root: a report is untrusted input.
    let dir = scratch("bad-reports");
    let cases = [
        (
            "missing.json",
            None,
            "No such file or directory (os error 2)",
        ),
        (
            "text.json",
            Some("hello\n"),
            "expected value at line 1 column 1",
        ),
        (
            "empty.json",
            Some(""),
            "EOF while parsing a value at line 1 column 0",
        ),
        (
            "object.json",
            Some("{}"),
            "missing field `pyleak_version` at line 1 column 2",
        ),
        (
            "truncated.json",
            Some("{\"layers\": {\"libc\": {\"allocs\": 1"),
            "EOF while parsing an object at line 1 column 32",
        ),
        (
            "array.json",
            Some("[1, 2]"),
            "invalid type: integer `1`, expected a string at line 1 column 2",
        ),
    ];
    for (name, text, cause) in cases {
        let path = dir.join(name);
        if let Some(t) = text {
            std::fs::write(&path, t).unwrap();
        }
        exact_error(
            &["report", path.to_str().unwrap()],
            &format!(
                "cannot read report {} (give a file written by `pyleak record --json FILE`): {cause}",
                path.display()
            ),
        );
    }
}
