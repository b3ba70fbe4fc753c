//! Command-line arguments (clap derive; the doc comments are the help text).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{report::OutputArgs, targets::TargetArgs};

/// Find memory leaks in running Python programs from the outside, at every layer of
/// CPython's allocator stack.
#[derive(Debug, Parser)]
#[command(name = "pyleak", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace running processes (--pid), a cgroup (--cgroup, --container), every Python
    /// process (--all) or a command (-- COMMAND) and report what is live.
    Record(RecordArgs),
    /// Trace like `record`, showing layer totals and the fastest-growing stacks live,
    /// refreshed every second (q or Ctrl-C to stop).
    Top(RecordArgs),
    /// Render a saved JSON report again, in any output format (text, JSON, folded, SVG,
    /// pprof, speedscope); needs no privileges.
    Report(ReportArgs),
    /// Count a Python process's live objects by type, from outside (reading its memory,
    /// no probes), and name the globals, class attributes and closure variables that hold
    /// the fastest-growing ones.
    Census(crate::census::CensusArgs),
}

/// `pyleak report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A report written by `pyleak record --json` (or `-o FILE.json`).
    #[arg(value_name = "FILE.json")]
    pub input: PathBuf,
    /// Where and how to write it again.
    #[command(flatten)]
    pub out: OutputArgs,
}

/// How the pymalloc layer is traced (see `--pymalloc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PymallocMode {
    /// Short windows; estimates.
    Sampled,
    /// Every call.
    Exact,
}

/// `pyleak record`.
#[derive(Debug, Args)]
pub struct RecordArgs {
    /// What to trace.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Where and how to write the report (besides the summary on stdout).
    #[command(flatten)]
    pub out: OutputArgs,
    /// Stop after this many seconds (default: until Ctrl-C or the target exits).
    #[arg(short, long, value_name = "SECS", allow_negative_numbers = true)]
    pub duration: Option<f64>,
    /// Write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Layers to probe, comma-separated: pymalloc, pymem_raw, libc, vm, pages, or all
    /// [default: all with a command, pymalloc,libc,vm,pages otherwise].
    #[arg(long, value_name = "LIST")]
    pub layers: Option<String>,
    /// How the pymalloc layer is traced. sampled: its probes go in for short windows
    /// (--pymalloc-window every --pymalloc-period on average) and what survives a window is
    /// followed by reading the target's memory; live bytes are estimates (marked ~), at a
    /// few percent of CPU. exact: every call trapped (tests, short runs; 10-25x CPU on
    /// allocation-heavy code).
    #[arg(long, value_enum, default_value = "sampled", env = "PYLEAK_PYMALLOC")]
    pub pymalloc: PymallocMode,
    /// How long each pymalloc sampling window stays open.
    #[arg(long, default_value_t = 0.05, value_name = "SECS")]
    pub pymalloc_window: f64,
    /// Mean seconds from one pymalloc sampling window to the next (drawn at random, so
    /// windows do not beat with the program's own period). Each window costs the target
    /// a few hundredths of a second however short it is (taking uprobes out is slow).
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub pymalloc_period: f64,
    /// Native frames kept per stack, 1 to 32 (1: only the immediate caller; more follow
    /// frame pointers).
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub native_depth: u32,
    /// Live memory younger than this at the end is not a leak suspect. The default, 1 s,
    /// outlives what a request or a job holds while in flight, and is short enough that a
    /// one-minute recording sees most of what it leaks aged.
    #[arg(
        long,
        default_value_t = 1.0,
        value_name = "SECS",
        allow_negative_numbers = true
    )]
    pub min_age: f64,
    /// Seconds between growth samples (live bytes per stack), from which growing stacks
    /// are told from caches that fill and level off [default: 2, or a tenth of a shorter
    /// --duration].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true)]
    pub interval: Option<f64>,
    /// Stream one JSON line per growth sample to FILE (layer totals, top growing stacks),
    /// for runs of days.
    #[arg(long, value_name = "FILE")]
    pub snapshots: Option<PathBuf>,
    /// Take a heap census (as `pyleak census`) of each Python target at every --interval
    /// sample and at the end: the report gains a `census` section (live objects by type,
    /// their growth, and the globals, class attributes, closures and thread locals that
    /// hold them). --pid and command targets.
    #[arg(long)]
    pub census: bool,
    /// Trace only the --pid or command targets themselves, not the processes they start.
    /// By default each new process of a target (fork, vfork, clone, and the programs they
    /// exec: multiprocessing workers) is traced under its own pid from its fork.
    #[arg(long)]
    pub no_follow: bool,
    /// Show the native frames under the Python ones (mixed stacks).
    #[arg(long)]
    pub native: bool,
    /// Blame each suspect on the stack that allocated it as it is. By default, memory the
    /// standard library or an installed package allocated (a Task inside asyncio.gather)
    /// is blamed on the innermost frame of your own code, the full stacks kept in the JSON.
    #[arg(long)]
    pub no_group_libs: bool,
    /// No status line on stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// Do not read Python stacks (benchmark of their cost); native stacks only.
    #[arg(long, hide = true)]
    pub no_python_stacks: bool,
    /// Attach empty programs at the same points, tracepoints included (the benchmark's
    /// floor); no report.
    #[arg(long, hide = true)]
    pub bare: bool,
}

impl RecordArgs {
    /// Seconds between growth samples: `--interval`, else 2, or a tenth of a `--duration`
    /// shorter than 2 s.
    pub fn interval(&self) -> f64 {
        self.interval.unwrap_or(match self.duration {
            Some(d) if d < 2.0 && d > 0.0 => d / 10.0,
            _ => 2.0,
        })
    }
}

/// A clap error (several lines: the error, a tip, the usage) as one line that ends with
/// where to look.
pub fn one_line(rendered: &str) -> String {
    let parts: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect();
    format!("{}; see `pyleak --help`", parts.join("; "))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn argument_errors_are_one_line() {
        let e = Cli::try_parse_from(["pyleak", "record", "--no-such-flag"]).unwrap_err();
        let line = one_line(&e.render().to_string());
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("unexpected argument '--no-such-flag' found"),
            "{line}"
        );
        assert!(line.ends_with("see `pyleak --help`"), "{line}");
        // Negative numbers reach pyleak's own checks.
        let cli = Cli::try_parse_from(["pyleak", "record", "-d", "-1", "--", "true"]).unwrap();
        let Command::Record(args) = cli.command else {
            panic!("record")
        };
        assert_eq!(args.duration, Some(-1.0));
    }
}
