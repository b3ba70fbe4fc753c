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
            .find(|(n, _)| n.starts_with("pyleak (every"))
            .map(|r| r.1)
            .unwrap_or(f64::NAN);
        println!("\npyleak / memleak-style peer: {:.2}", ours / peer);
    }
    python_bench(pyleak, args)
}

/// Runs `argv` `runs` times; the median of what `measure` reads from each output.
fn median(
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

/// Python workload: run time untraced, under pyleak's layers, and under memray.
fn python_bench(pyleak: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let python = ["/root/.pyenv/versions/3.12.1/bin/python3", "python3"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .context("no python3 for the Python benchmark")?
        .to_owned();
    let script = root()
        .join("bench/py_alloc.py")
        .to_string_lossy()
        .into_owned();
    let venv = root().join("target/bench/venv");
    let venv_python = venv.join("bin/python3");
    let has_memray = || {
        Command::new(&venv_python)
            .args(["-c", "import memray"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_memray() {
        let _ = Command::new(&python)
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status();
        let _ = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "memray"])
            .status();
    }
    let pl = pyleak.to_string_lossy().into_owned();
    let rec = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![pl.clone(), "record".into(), "-q".into()];
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v.extend(["--".into(), python.clone(), script.clone()]);
        v
    };
    let mut modes: Vec<(&str, Vec<String>)> = vec![
        ("untraced", vec![python.clone(), script.clone()]),
        (
            "pyleak libc,vm,pages (the --pid default)",
            rec(&["--layers", "libc,vm,pages"]),
        ),
        (
            "pyleak all layers (the launch default)",
            rec(&["--layers", "all"]),
        ),
        (
            "pyleak all layers, no Python stacks",
            rec(&["--layers", "all", "--no-python-stacks"]),
        ),
        (
            "pyleak all layers, --native-depth 1",
            rec(&["--layers", "all", "--native-depth", "1"]),
        ),
    ];
    if has_memray() {
        let m = venv_python.to_string_lossy().into_owned();
        let out = root()
            .join("target/bench/memray.bin")
            .to_string_lossy()
            .into_owned();
        let memray = |extra: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = vec![
                m.clone(),
                "-m".into(),
                "memray".into(),
                "run".into(),
                "-f".into(),
                "-q".into(),
            ];
            v.extend(extra.iter().map(|s| (*s).to_owned()));
            v.extend(["-o".into(), out.clone(), script.clone()]);
            v
        };
        modes.push(("memray run", memray(&[])));
        modes.push((
            "memray run --trace-python-allocators",
            memray(&["--trace-python-allocators"]),
        ));
    } else {
        eprintln!("bench: memray could not be installed: its rows are missing");
    }
    let mut results = Vec::new();
    for (name, argv) in &modes {
        results.push((
            *name,
            median(argv, args.runs, seconds).with_context(|| format!("benchmark mode {name}"))?,
        ));
    }
    let base = results[0].1;
    println!(
        "\nPython workload (bench/py_alloc.py, {python}), in-script seconds, median of {} runs",
        args.runs
    );
    println!("| mode | seconds | × untraced |");
    println!("|---|---:|---:|");
    for (name, s) in &results {
        println!("| {name} | {s:.3} | {:.2} |", s / base);
    }
    Ok(())
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
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!("{argv:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {key} line in the output of {argv:?}"))
}

/// The C loop's own time per malloc/free pair.
fn ns_per_pair(argv: &[String]) -> anyhow::Result<f64> {
    reported(argv, "ns_per_pair")
}

/// The Python workload's own run time.
fn seconds(argv: &[String]) -> anyhow::Result<f64> {
    reported(argv, "seconds")
}
