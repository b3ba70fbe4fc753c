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
    /// One run per mode and a tenth of the C loop's pairs (a few minutes in all).
    #[arg(long)]
    pub quick: bool,
    /// One short round of every mode (CI's smoke test: the tables are printed, the figures
    /// say little).
    #[arg(long)]
    pub smoke: bool,
}

/// Runs every benchmark and prints the tables.
pub fn run(pyleak: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let quick;
    let args = if args.quick || args.smoke {
        quick = BenchArgs {
            pairs: args.pairs / if args.smoke { 100 } else { 10 },
            runs: 1,
            quick: true,
            smoke: args.smoke,
        };
        &quick
    } else {
        args
    };
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
            "bare, every layer's attach points (floor of the next)",
            vec![
                pl.clone(),
                "record".into(),
                "--bare".into(),
                "-q".into(),
                "--".into(),
                lp.clone(),
                pairs.clone(),
            ],
        ),
        (
            "pyleak (every layer, the launch default)",
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
        results.push((
            *name,
            median(argv, args.runs, ns_per_pair)
                .with_context(|| format!("benchmark mode {name}"))?,
        ));
    }
    let untraced = results[0].1;
    let floor = results[1].1;
    println!(
        "\nC loop, {} malloc(64)/free pairs, median of {} runs",
        args.pairs, args.runs
    );
    // Every layer adds syscall and page-fault tracepoints, whose mere presence slows
    // uretprobes (they return through a syscall): that mode has a floor of its own.
    let floor_all = results[3].1;
    println!("| mode | ns per pair | × untraced | × floor (libc) | × its floor |");
    println!("|---|---:|---:|---:|---:|");
    for (i, (name, ns)) in results.iter().enumerate() {
        let own = match i {
            2 => format!("{:.2}", ns / floor),
            4 | 5 => format!("{:.2}", ns / floor_all),
            _ => "".to_owned(),
        };
        println!(
            "| {name} | {ns:.1} | {:.1} | {:.2} | {own} |",
            ns / untraced,
            ns / floor
        );
    }
    if let Some((_, peer)) = results.iter().find(|(n, _)| n.starts_with("memleak")) {
        let ours = results
            .iter()
            .find(|(n, _)| n.starts_with("pyleak (every"))
            .map(|r| r.1)
            .unwrap_or(f64::NAN);
        println!("\npyleak / memleak-style peer: {:.2}", ours / peer);
    }
    crate::pybench::run(pyleak, args)
}

/// Runs `argv` `runs` times; the median of what `measure` reads from each output.
pub(crate) fn median(
    argv: &[String],
    runs: usize,
    measure: fn(&[String]) -> anyhow::Result<f64>,
) -> anyhow::Result<f64> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        samples.push(measure(argv)?);
    }
    samples.sort_by(f64::total_cmp);
    eprintln!("bench: {argv:?}: {samples:?}");
    Ok(samples[samples.len() / 2])
}

/// Runs `argv` `runs` times; the medians of its `seconds` (`measure`) and `cpu_seconds`
/// lines.
pub(crate) fn median2(
    argv: &[String],
    runs: usize,
    measure: fn(&[String]) -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<(f64, f64)> {
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (w, c) = measure(argv)?;
        wall.push(w);
        cpu.push(c);
    }
    wall.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    eprintln!("bench: {argv:?}: wall {wall:?} cpu {cpu:?}");
    Ok((wall[wall.len() / 2], cpu[cpu.len() / 2]))
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

/// Runs one command and reads the number on its `KEY value` output line.
fn reported(argv: &[String], key: &str) -> anyhow::Result<f64> {
    Ok(reported_all(argv, &[key])?[0])
}

/// Runs one command and reads the numbers on its `KEY value` output lines, one per key.
fn reported_all(argv: &[String], keys: &[&str]) -> anyhow::Result<Vec<f64>> {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!("{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    keys.iter()
        .map(|key| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
                .with_context(|| format!("no {key} line in the output of {argv:?}"))
        })
        .collect()
}

/// The C loop's own time per malloc/free pair.
fn ns_per_pair(argv: &[String]) -> anyhow::Result<f64> {
    reported(argv, "ns_per_pair")
}

/// The Python workload's own run time and CPU time (seconds).
pub(crate) fn seconds(argv: &[String]) -> anyhow::Result<(f64, f64)> {
    let v = reported_all(argv, &["seconds", "cpu_seconds"])?;
    Ok((v[0], v[1]))
}
