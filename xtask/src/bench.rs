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
}

/// Runs every benchmark and prints the tables.
pub fn run(pyleak: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let quick;
    let args = if args.quick {
        quick = BenchArgs {
            pairs: args.pairs / 10,
            runs: 1,
            quick: true,
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

/// pyperformance benchmarks run in-process by `bench/pyperf_subset.py`, with the loops that
/// make each take roughly 0.1–0.3 s untraced here.
const PYPERF_SUBSET: [(&str, u32); 6] = [
    ("float", 1),
    ("json_dumps", 10),
    ("deltablue", 30),
    ("raytrace", 1),
    ("go", 1),
    ("richards", 3),
];

/// Python workloads (a pyperformance subset and `bench/py_alloc.py`): run time untraced,
/// under pyleak's default layers, with the pymalloc layer (with and without Python stacks),
/// and under memray (default and `--trace-python-allocators`), as ratios; plus the cost of
/// the Python stack capture per allocation.
fn python_bench(pyleak: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let python = "/root/.pyenv/versions/3.12.1/bin/python3";
    let venv = root().join("target/bench/venv");
    let venv_python = venv.join("bin/python3");
    let ready = || {
        Command::new(&venv_python)
            .args(["-c", "import memray, pyperformance"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ready() {
        // A venv copied from another checkout points at that checkout: make our own.
        let _ = std::fs::remove_dir_all(&venv);
        run_cmd(Command::new(python).arg("-m").arg("venv").arg(&venv))
            .context("making the benchmark venv (pyenv 3.12.1)")?;
        run_cmd(Command::new(&venv_python).args([
            "-m",
            "pip",
            "install",
            "-q",
            "memray",
            "pyperformance",
        ]))
        .context("installing memray and pyperformance into the benchmark venv")?;
    }
    let py = venv_python.to_string_lossy().into_owned();
    let subset = root()
        .join("bench/pyperf_subset.py")
        .to_string_lossy()
        .into_owned();
    let py_alloc = root()
        .join("bench/py_alloc.py")
        .to_string_lossy()
        .into_owned();
    let json = root().join("target/bench/py.json");
    let memray_out = root()
        .join("target/bench/memray.bin")
        .to_string_lossy()
        .into_owned();
    let pl = pyleak.to_string_lossy().into_owned();
    let mut workloads: Vec<(String, Vec<String>)> = PYPERF_SUBSET
        .iter()
        .map(|(name, loops)| {
            (
                (*name).to_owned(),
                vec![subset.clone(), (*name).to_owned(), loops.to_string()],
            )
        })
        .collect();
    workloads.push(("py_alloc.py".into(), vec![py_alloc]));
    let strs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    println!(
        "\nPython workloads (pyperformance {} benchmark functions run in-process, and \
         bench/py_alloc.py), CPython 3.12.1, in-script seconds, median of {} runs",
        PYPERF_SUBSET.len(),
        args.runs
    );
    println!(
        "| workload | untraced s | pyleak libc,vm,pages | pyleak sampled pymalloc + libc,vm,pages | \
         pyleak exact pymalloc (every layer) | pyleak exact, no Python stacks | memray | \
         memray --trace-python-allocators | stack capture µs/alloc |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut logs = [0f64; 6];
    for (name, script) in &workloads {
        let target: Vec<String> = std::iter::once(py.clone())
            .chain(script.iter().cloned())
            .collect();
        let pyleak_with = |extra: &[&str]| -> Vec<String> {
            let mut v = strs(&[&pl, "record", "-q"]);
            v.extend(strs(extra));
            v.push("--".into());
            v.extend(target.iter().cloned());
            v
        };
        let memray_with = |extra: &[&str]| -> Vec<String> {
            let mut v = strs(&[&py, "-m", "memray", "run", "-f", "-q"]);
            v.extend(strs(extra));
            v.extend(strs(&["-o", &memray_out]));
            v.extend(script.iter().cloned());
            v
        };
        let j = json.to_string_lossy().into_owned();
        let modes = [
            target.clone(),
            pyleak_with(&["--layers", "libc,vm,pages"]),
            pyleak_with(&[
                "--layers",
                "pymalloc,libc,vm,pages",
                "--pymalloc",
                "sampled",
            ]),
            pyleak_with(&["--layers", "all", "--pymalloc", "exact", "--json", &j]),
            pyleak_with(&[
                "--layers",
                "all",
                "--pymalloc",
                "exact",
                "--no-python-stacks",
            ]),
            memray_with(&[]),
            memray_with(&["--trace-python-allocators"]),
        ];
        let mut t = Vec::new();
        for argv in &modes {
            t.push(median(argv, args.runs, seconds).with_context(|| format!("{name}: {argv:?}"))?);
        }
        // Allocations the pymalloc run recorded (each one captured a stack).
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json)?).context("pyleak JSON")?;
        let allocs: f64 = ["pymalloc", "pymem_raw", "libc"]
            .iter()
            .filter_map(|l| report["layers"][*l]["allocs"].as_f64())
            .sum();
        let per_alloc_us = (t[3] - t[4]) / allocs.max(1.0) * 1e6;
        for (k, l) in logs.iter_mut().enumerate() {
            *l += (t[k + 1] / t[0]).ln();
        }
        println!(
            "| {name} | {:.3} | {:.2}× | {:.2}× | {:.1}× | {:.1}× | {:.2}× | {:.2}× | {per_alloc_us:.2} |",
            t[0],
            t[1] / t[0],
            t[2] / t[0],
            t[3] / t[0],
            t[4] / t[0],
            t[5] / t[0],
            t[6] / t[0],
        );
    }
    let n = workloads.len() as f64;
    let g: Vec<f64> = logs.iter().map(|l| (l / n).exp()).collect();
    println!(
        "| geometric mean | | {:.2}× | {:.2}× | {:.1}× | {:.1}× | {:.2}× | {:.2}× | |",
        g[0], g[1], g[2], g[3], g[4], g[5]
    );
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
