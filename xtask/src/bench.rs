//! `cargo xtask bench`: the cost of tracing, as ratios measured in one run.
//!
//! C loop of malloc/free pairs: untraced; bare uprobes on pyleak's own attach points (the
//! floor: what any uprobe tracer pays); pyleak; a memleak-style bpftrace script (bcc's
//! memleak cannot run on kernels without headers).

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _};

use crate::{root, run as run_cmd};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// malloc/free pairs per run.
    #[arg(long, default_value_t = 1_000_000)]
    pub pairs: u64,
    /// Runs per mode (the median is kept).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

/// Runs every benchmark and prints the tables.
pub fn run(pyleak: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let loop_bin = dir.join("malloc_loop");
    run_cmd(
        Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(&loop_bin)
            .arg(root().join("bench/malloc_loop.c")),
    )?;
    let have_bpftrace = ensure_bpftrace();
    let pairs = args.pairs.to_string();
    let lp = loop_bin.to_string_lossy().into_owned();
    let pl = pyleak.to_string_lossy().into_owned();
    let mut modes: Vec<(&str, Vec<String>)> = vec![
        ("untraced", vec![lp.clone(), pairs.clone()]),
        (
            "bare uprobes (floor)",
            vec![
                pl.clone(),
                "record".into(),
                "--bare".into(),
                "-q".into(),
                "--layers".into(),
                "libc".into(),
                "--".into(),
                lp.clone(),
                pairs.clone(),
            ],
        ),
        (
            "pyleak --layers libc",
            vec![
                pl.clone(),
                "record".into(),
                "-q".into(),
                "--layers".into(),
                "libc".into(),
                "--".into(),
                lp.clone(),
                pairs.clone(),
            ],
        ),
        (
            "pyleak (libc,vm,pages)",
            vec![
                pl.clone(),
                "record".into(),
                "-q".into(),
                "--".into(),
                lp.clone(),
                pairs.clone(),
            ],
        ),
        (
            "pyleak --native-depth 1",
            vec![
                pl.clone(),
                "record".into(),
                "-q".into(),
                "--native-depth".into(),
                "1".into(),
                "--".into(),
                lp.clone(),
                pairs.clone(),
            ],
        ),
    ];
    if have_bpftrace {
        let script = root()
            .join("bench/memleak.bt")
            .to_string_lossy()
            .into_owned();
        modes.push((
            "memleak-style bpftrace",
            vec![
                "bpftrace".into(),
                script,
                "-c".into(),
                format!("{lp} {pairs}"),
            ],
        ));
    } else {
        eprintln!(
            "bench: bpftrace unavailable (apt-get install bpftrace failed): memleak peer skipped"
        );
    }
    let mut results = Vec::new();
    for (name, argv) in &modes {
        let mut samples = Vec::new();
        for _ in 0..args.runs {
            samples.push(ns_per_pair(argv).with_context(|| format!("benchmark mode {name}"))?);
        }
        samples.sort_by(f64::total_cmp);
        let median = samples[samples.len() / 2];
        eprintln!("bench: {name}: {median:.1} ns/pair ({samples:?})");
        results.push((*name, median));
    }
    let untraced = results[0].1;
    let floor = results[1].1;
    println!(
        "\nC loop, {} malloc(64)/free pairs, median of {} runs",
        args.pairs, args.runs
    );
    println!("| mode | ns per pair | × untraced | × floor |");
    println!("|---|---:|---:|---:|");
    for (name, ns) in &results {
        println!(
            "| {name} | {ns:.1} | {:.1} | {:.2} |",
            ns / untraced,
            ns / floor
        );
    }
    if let Some((_, peer)) = results.iter().find(|(n, _)| n.starts_with("memleak")) {
        let ours = results
            .iter()
            .find(|(n, _)| n.starts_with("pyleak (libc"))
            .map(|r| r.1)
            .unwrap_or(f64::NAN);
        println!("\npyleak / memleak-style peer: {:.2}", ours / peer);
    }
    Ok(())
}

/// Runs one command and reads the loop's `ns_per_pair` line from its output.
fn ns_per_pair(argv: &[String]) -> anyhow::Result<f64> {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!("{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("ns_per_pair ")
                .and_then(|v| v.trim().parse().ok())
        })
        .with_context(|| format!("no ns_per_pair line in the output of {argv:?}"))
}

/// Installs bpftrace from Debian's packages if needed; whether it is there.
fn ensure_bpftrace() -> bool {
    let ok = |c: &str| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ok("bpftrace") {
        return true;
    }
    let _ = crate::apt_install(&["bpftrace"]);
    ok("bpftrace")
}
