//! `cargo xtask fuzz`: every fuzz target (`fuzz/fuzz_targets`) for a bounded time, from the
//! corpus in the repo, with debug assertions and overflow checks on. Installs the nightly
//! toolchain and cargo-fuzz when missing. A crash fails the task and names the input
//! (`fuzz/artifacts/TARGET/crash-…`); add it to `fuzz/corpus/TARGET/regression-…` once
//! fixed, so the unit tests replay it.

use std::process::Command;

use anyhow::{bail, Context as _};

use crate::{root, run};

/// The fuzz targets, as named in fuzz/Cargo.toml.
pub const TARGETS: [&str; 5] = ["proc_text", "elf", "prologue", "python_code", "report"];

/// Largest input libFuzzer makes (the ELF seeds are up to ~36 KB).
const MAX_LEN: &str = "-max_len=65536";

/// What one target did: its name and how many inputs it ran.
pub struct Outcome {
    /// Target name.
    pub target: &'static str,
    /// Inputs executed (libFuzzer's `Done N runs`).
    pub runs: u64,
    /// Seconds it ran.
    pub seconds: u64,
}

/// Makes sure `cargo +nightly fuzz` works here.
fn setup() -> anyhow::Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&toolchains.stdout).contains("nightly") {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output();
    if !fuzz.is_ok_and(|o| o.status.success()) {
        eprintln!("xtask: installing cargo-fuzz (about two minutes)");
        run(Command::new("cargo").args(["+nightly", "install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// Runs each target for `seconds` (after one build of all of them).
pub fn fuzz(seconds: u64) -> anyhow::Result<Vec<Outcome>> {
    setup()?;
    // No sanitizer: the parsers are safe Rust, so a bug is a panic, which libFuzzer
    // catches as it is; without ASan the build is shorter and each input faster.
    run(Command::new("cargo")
        .current_dir(root())
        .args(["+nightly", "fuzz", "build", "-s", "none"]))?;
    let mut out = Vec::new();
    for target in TARGETS {
        // libFuzzer adds what it finds to the first directory: a scratch one, so the
        // repo's corpus changes only by hand.
        let scratch = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&scratch)?;
        let seed = root().join("fuzz/corpus").join(target);
        let result = Command::new("cargo")
            .current_dir(root())
            .args(["+nightly", "fuzz", "run", "-s", "none", target])
            .arg(&scratch)
            .arg(&seed)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(MAX_LEN)
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&result.stderr);
        if !result.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed ({}):\n{}",
                result.status,
                tail.join("\n")
            );
        }
        let runs = done_runs(&log)
            .with_context(|| format!("fuzz target {target}: no `Done N runs` in its log"))?;
        out.push(Outcome {
            target,
            runs,
            seconds,
        });
    }
    Ok(out)
}

/// Prints what each target ran, and the total.
pub fn summary(outcomes: &[Outcome]) {
    for o in outcomes {
        eprintln!(
            "xtask: fuzz {}: {} inputs in {} s, no crash",
            o.target, o.runs, o.seconds
        );
    }
    let total: u64 = outcomes.iter().map(|o| o.runs).sum();
    eprintln!(
        "xtask: fuzzing ran {total} inputs through {} targets, no crash",
        outcomes.len()
    );
}

/// libFuzzer's closing line: `Done 477519 runs in 41 second(s)`.
fn done_runs(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        l.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_from_the_log() {
        let log = "#1 INITED\n#2 NEW\nDone 477519 runs in 41 second(s)\n";
        assert_eq!(super::done_runs(log), Some(477519));
        assert_eq!(super::done_runs("crash"), None);
    }

    #[test]
    fn every_target_is_built() {
        let manifest = std::fs::read_to_string(crate::root().join("fuzz/Cargo.toml")).unwrap();
        for t in super::TARGETS {
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t}");
        }
        assert_eq!(manifest.matches("[[bin]]").count(), super::TARGETS.len());
    }
}
