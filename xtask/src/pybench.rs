//! The Python half of `cargo xtask bench`: a pyperformance subset run in-process by
//! `bench/pyperf_subset.py`, plus `bench/py_alloc.py`, on pyenv's CPython 3.12.1.
//!
//! Two tables, each measured in the same invocation:
//! - **Steady state** (runs of a few seconds, as a traced service's are): untraced; pyleak's
//!   defaults when attaching (pymalloc sampled + libc, vm, pages); the same without the
//!   pymalloc layer; memray, and memray `--trace-python-allocators` (its mode that sees
//!   pymalloc). A window's cost is paid per window, so short runs only say whether one fell
//!   inside them.
//! - **Exact mode** (the short runs: exact mode traps on every allocation): untraced; the
//!   floor (empty programs at exact mode's own attach points: entry, return and free probes
//!   and the tracepoints, `--bare --layers all`); exact mode; exact mode without Python
//!   stacks; exact mode against its floor; the stack capture per allocation.

use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::{
    bench::{median2, seconds, BenchArgs},
    root, run as run_cmd,
};

/// pyperformance benchmarks run in-process by `bench/pyperf_subset.py`, with the loops that
/// make each take roughly 0.1–0.3 s untraced here (the exact-mode table); the steady-state
/// table runs [`STEADY_SCALE`] times as many.
const PYPERF_SUBSET: [(&str, u32); 6] = [
    ("float", 1),
    ("json_dumps", 10),
    ("deltablue", 30),
    ("raytrace", 1),
    ("go", 1),
    ("richards", 3),
];

/// How many times longer the steady-state runs are than the exact-mode ones (2–4 s each
/// untraced here; one every 2 s is the default window period).
const STEADY_SCALE: u32 = 20;

/// One table's modes: a column title and who runs the workload in it.
struct Table<'a> {
    title: &'a str,
    columns: Vec<(&'a str, Tracer<'a>)>,
}

/// Who runs the workload in a column.
enum Tracer<'a> {
    Untraced,
    Pyleak(&'a [&'a str]),
    Memray(&'a [&'a str]),
}

/// Runs both tables and prints them as Markdown.
pub fn run(pyleak: &Path, args: &BenchArgs) -> anyhow::Result<()> {
    let py = venv_python()?;
    let steady_scale = if args.smoke { 1 } else { STEADY_SCALE };
    let json = root().join("target/bench/py.json");
    let j = json.to_string_lossy().into_owned();
    let steady = Table {
        title: "Steady state",
        columns: vec![
            ("untraced s", Tracer::Untraced),
            (
                "pyleak defaults (pymalloc sampled, libc, vm, pages)",
                Tracer::Pyleak(&[
                    "--layers",
                    "pymalloc,libc,vm,pages",
                    "--pymalloc",
                    "sampled",
                ]),
            ),
            (
                "pyleak libc,vm,pages",
                Tracer::Pyleak(&["--layers", "libc,vm,pages"]),
            ),
            ("memray", Tracer::Memray(&[])),
            (
                "memray --trace-python-allocators",
                Tracer::Memray(&["--trace-python-allocators"]),
            ),
        ],
    };
    let exact_json: Vec<&str> = vec!["--layers", "all", "--pymalloc", "exact", "--json", &j];
    let exact = Table {
        title: "Exact mode",
        columns: vec![
            ("untraced s", Tracer::Untraced),
            (
                "floor: bare probes at exact mode's attach points",
                Tracer::Pyleak(&["--bare", "--layers", "all", "--pymalloc", "exact"]),
            ),
            ("pyleak exact (every layer)", Tracer::Pyleak(&exact_json)),
            (
                "pyleak exact, no Python stacks",
                Tracer::Pyleak(&[
                    "--layers",
                    "all",
                    "--pymalloc",
                    "exact",
                    "--no-python-stacks",
                ]),
            ),
        ],
    };
    let pl = pyleak.to_string_lossy().into_owned();

    println!(
        "\nPython workloads (pyperformance {} benchmark functions run in-process, and \
         bench/py_alloc.py), CPython 3.12.1, in-script seconds, median of {} runs",
        PYPERF_SUBSET.len(),
        args.runs
    );
    let rows = measure(&py, &pl, &steady, steady_scale, args.runs, None)?;
    for clock in [Clock::Cpu, Clock::Wall] {
        print_table(&steady, steady_scale, &rows, clock, &[]);
    }
    let rows = measure(&py, &pl, &exact, 1, args.runs, Some(&json))?;
    for clock in [Clock::Cpu, Clock::Wall] {
        // Exact mode against its floor, and the stack capture: (exact − exact without
        // stacks) per allocation the exact run recorded.
        let extra: Vec<(String, Vec<f64>)> = vec![
            (
                "exact / floor".into(),
                rows.iter()
                    .map(|r| r.of(clock)[2] / r.of(clock)[1])
                    .collect(),
            ),
            (
                "stack capture µs/alloc".into(),
                rows.iter()
                    .map(|r| (r.of(clock)[2] - r.of(clock)[3]) / r.allocs.max(1.0) * 1e6)
                    .collect(),
            ),
        ];
        print_table(&exact, 1, &rows, clock, &extra);
    }
    Ok(())
}

/// The benchmark venv's python (pyenv 3.12.1 with memray and pyperformance), made on first
/// use.
fn venv_python() -> anyhow::Result<String> {
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
    Ok(venv_python.to_string_lossy().into_owned())
}

/// Which of a workload's own times a table shows.
#[derive(Clone, Copy, PartialEq)]
enum Clock {
    /// The workload process's user + system CPU seconds (`time.process_time()`): what the
    /// traced program pays, probes included (they run in it), unmoved by other work on the
    /// machine's cores. pyleak's own CPU is measured apart (docs/benchmarks.md).
    Cpu,
    /// Wall-clock seconds (`time.perf_counter()`): also moved by whatever else shares the
    /// cores, pyleak's own thread included.
    Wall,
}

/// One workload's figures in a table.
struct Row {
    name: String,
    /// Median in-script wall seconds per column.
    times: Vec<f64>,
    /// Median in-script CPU seconds per column.
    cpu: Vec<f64>,
    /// Allocations the run that wrote the JSON report recorded (0 without one).
    allocs: f64,
}

impl Row {
    fn of(&self, clock: Clock) -> &[f64] {
        match clock {
            Clock::Cpu => &self.cpu,
            Clock::Wall => &self.times,
        }
    }
}

/// Per workload, the median in-script seconds of every column of `table`; with `json`,
/// the allocations recorded in the report a column writes there.
fn measure(
    py: &str,
    pyleak: &str,
    table: &Table,
    scale: u32,
    runs: usize,
    json: Option<&Path>,
) -> anyhow::Result<Vec<Row>> {
    let subset = root().join("bench/pyperf_subset.py");
    let py_alloc = root().join("bench/py_alloc.py");
    let memray_out = root().join("target/bench/memray.bin");
    let mut workloads: Vec<(String, Vec<String>)> = PYPERF_SUBSET
        .iter()
        .map(|(name, loops)| {
            (
                (*name).to_owned(),
                vec![
                    subset.to_string_lossy().into_owned(),
                    (*name).to_owned(),
                    (loops * scale).to_string(),
                ],
            )
        })
        .collect();
    workloads.push((
        "py_alloc.py".into(),
        vec![py_alloc.to_string_lossy().into_owned(), scale.to_string()],
    ));
    let mut rows = Vec::new();
    for (name, script) in workloads {
        let mut times = Vec::new();
        let mut cpu = Vec::new();
        for (_, tracer) in &table.columns {
            let mut argv: Vec<String> = Vec::new();
            match tracer {
                Tracer::Untraced => argv.push(py.to_owned()),
                Tracer::Pyleak(extra) => {
                    argv.extend([pyleak, "record", "-q"].map(String::from));
                    argv.extend(extra.iter().map(|s| (*s).to_owned()));
                    argv.extend(["--".to_owned(), py.to_owned()]);
                }
                Tracer::Memray(extra) => {
                    argv.extend([py, "-m", "memray", "run", "-f", "-q"].map(String::from));
                    argv.extend(extra.iter().map(|s| (*s).to_owned()));
                    argv.extend(["-o".to_owned(), memray_out.to_string_lossy().into_owned()]);
                }
            }
            argv.extend(script.iter().cloned());
            let (wall, cpus) =
                median2(&argv, runs, seconds).with_context(|| format!("{name}: {argv:?}"))?;
            times.push(wall);
            cpu.push(cpus);
        }
        let mut allocs = 0.0;
        if let Some(json) = json {
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(json)?).context("pyleak JSON")?;
            allocs = ["pymalloc", "pymem_raw", "libc"]
                .iter()
                .filter_map(|l| report["layers"][*l]["allocs"].as_f64())
                .sum();
        }
        rows.push(Row {
            name,
            times,
            cpu,
            allocs,
        });
    }
    Ok(rows)
}

/// Prints `rows` as a Markdown table: the untraced seconds, every other column as a ratio
/// of them, then the `extra` columns as they are; a geometric mean of every ratio last.
fn print_table(
    table: &Table,
    scale: u32,
    rows: &[Row],
    clock: Clock,
    extra: &[(String, Vec<f64>)],
) {
    println!(
        "\n{}, {} ({}× the exact-mode table's loops)",
        table.title,
        match clock {
            Clock::Cpu => "the workload's CPU time",
            Clock::Wall => "wall-clock time",
        },
        scale
    );
    let mut head = String::from("| workload |");
    for (i, (title, _)) in table.columns.iter().enumerate() {
        if i == 0 && clock == Clock::Cpu {
            head += " untraced CPU s |";
        } else {
            head += &format!(" {title} |");
        }
    }
    for (title, _) in extra {
        head += &format!(" {title} |");
    }
    println!("{head}");
    println!("|---|{}", "---:|".repeat(table.columns.len() + extra.len()));
    let n = rows.len() as f64;
    let mut logs = vec![0f64; table.columns.len() + extra.len()];
    for (i, row) in rows.iter().enumerate() {
        let (name, t) = (&row.name, row.of(clock));
        let mut line = format!("| {name} | {:.3} |", t[0]);
        for (k, v) in t.iter().enumerate().skip(1) {
            line += &format!(" {:.2}× |", v / t[0]);
            logs[k] += (v / t[0]).ln();
        }
        for (k, (_, values)) in extra.iter().enumerate() {
            line += &format!(" {:.2} |", values[i]);
            logs[table.columns.len() + k] += values[i].max(1e-9).ln();
        }
        println!("{line}");
    }
    let mut line = String::from("| geometric mean | |");
    for l in logs.iter().skip(1) {
        line += &format!(" {:.2} |", (l / n).exp());
    }
    println!("{line}");
}
