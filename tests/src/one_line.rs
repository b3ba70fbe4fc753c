//! Checks of pyleak's one-line errors, shared by `tests/bad_input.rs` and
//! `tests/bad_targets.rs`, and the scratch filesystems and programs they need.

use std::process::Command;

use crate::{pyleak, root, scratch};

/// `out` failed with one line on stderr: `pyleak: …` holding `want`.
pub fn one_line_error(out: &std::process::Output, want: &str) {
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
pub fn one_line_after_tracing(out: &std::process::Output) -> String {
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
pub struct TmpMount(pub std::path::PathBuf);

impl TmpMount {
    /// Mounts it (`options` as `mount -o` takes them).
    pub fn new(name: &str, options: &str) -> TmpMount {
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

/// The exact one line pyleak prints for `args`, which fail before anything is traced.
pub fn exact_error(args: &[&str], want: &str) {
    let out = pyleak(args);
    assert!(!out.status.success(), "should fail: {args:?} {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("pyleak: {want}\n"),
        "{args:?}"
    );
}

/// Compiles `tests/workloads/SOURCE` with `cc FLAGS` into target/test-workloads/OUT.
pub fn cc(source: &str, out: &str, flags: &[&str]) -> std::path::PathBuf {
    let dir = root().join("target/test-workloads");
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join(out);
    let st = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(root().join("tests/workloads").join(source))
        .status()
        .expect("running cc");
    assert!(st.success(), "cc {source}");
    bin
}
