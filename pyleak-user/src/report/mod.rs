//! Rendering an [`Analysis`]: one module per output format, all behind one writer
//! ([`write`]) chosen by [`OutputFormat`]. Nothing here computes what leaks; it only writes
//! what the analysis found. The flamegraph-like formats (folded, SVG, pprof, speedscope)
//! draw the stacks [`drawn`] picks: one layer by default, so each byte counts once.

pub mod drawn;
pub mod file;
pub mod folded;
mod held;
pub mod pprof;
pub mod speedscope;
pub mod svg;
#[cfg(test)]
mod tests;
pub mod text;

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use clap::ValueEnum;

use self::{drawn::LayerChoice, file::OutputFile};
use crate::{
    analysis::Analysis,
    errors::{Cause, UserError},
};

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The text summary (what is printed at the end of a recording).
    Text,
    /// The whole analysis as JSON: pyleak's output contract, read back by `pyleak report`.
    Json,
    /// Folded stacks (`frame;frame value`), as inferno and flamegraph.pl read them.
    Folded,
    /// An SVG flamegraph.
    Svg,
    /// A gzipped pprof profile (`go tool pprof`, Pyroscope, Grafana).
    Pprof,
    /// A speedscope profile (JSON, <https://www.speedscope.app>).
    Speedscope,
}

impl OutputFormat {
    /// The format a file name implies: `.svg`, `.json`, `.speedscope.json`, `.pb.gz` or
    /// `.pprof`, `.txt`; anything else is folded stacks.
    pub fn from_path(path: &Path) -> OutputFormat {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if name.ends_with(".svg") {
            OutputFormat::Svg
        } else if name.ends_with(".speedscope.json") {
            OutputFormat::Speedscope
        } else if name.ends_with(".json") {
            OutputFormat::Json
        } else if name.ends_with(".pb.gz") || name.ends_with(".pprof") || name.ends_with(".pb") {
            OutputFormat::Pprof
        } else if name.ends_with(".txt") {
            OutputFormat::Text
        } else {
            OutputFormat::Folded
        }
    }
}

/// What a flamegraph's values count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Metric {
    /// Bytes still live at the end.
    LiveBytes,
    /// Bytes allocated over the recording.
    AllocBytes,
    /// Allocations over the recording.
    Allocs,
    /// Bytes of pages faulted in and still resident at the end (the pages layer).
    Resident,
}

impl Metric {
    /// Name, as given on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Metric::LiveBytes => "live-bytes",
            Metric::AllocBytes => "alloc-bytes",
            Metric::Allocs => "allocs",
            Metric::Resident => "resident",
        }
    }
}

/// The output flags `record` and `report` share.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Write the report to FILE, in the format of --format or else of FILE's name: .svg
    /// (flamegraph), .json (the whole analysis), .speedscope.json, .pb.gz or .pprof
    /// (pprof), .txt (the summary); anything else is folded stacks (inferno,
    /// flamegraph.pl).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The format of -o [default: from the file's name].
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub format: Option<OutputFormat>,
    /// What a flamegraph (folded, svg, pprof, speedscope) counts (resident: pages faulted
    /// in and still resident).
    #[arg(long, value_enum, default_value = "live-bytes")]
    pub metric: Metric,
    /// The layer a flamegraph draws: pymalloc, pymem_raw, libc, vm, pages, or all (every
    /// layer side by side: a byte then shows once per layer it passes through)
    /// [default: the topmost layer with data: what Python (or the program) asked for,
    /// each byte once; pages with --metric resident].
    #[arg(long, value_name = "LAYER")]
    pub layer: Option<String>,
    /// Start each flamegraph stack with its process (`comm (pid N)`).
    #[arg(long)]
    pub per_process: bool,
    /// Permission bits of the files written, in octal (reports name processes, paths and
    /// code: owner only by default).
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = file::parse_mode)]
    pub file_mode: u32,
}

/// How the flamegraph-like formats draw.
#[derive(Debug, Clone, PartialEq)]
pub struct Render {
    /// What values count.
    pub metric: Metric,
    /// Which layers are drawn.
    pub layer: LayerChoice,
    /// Each stack under its process.
    pub per_process: bool,
}

impl Render {
    /// The drawing `args` ask for; an unknown layer is an error.
    pub fn from_args(args: &OutputArgs) -> Result<Render, UserError> {
        Ok(Render {
            metric: args.metric,
            layer: LayerChoice::parse(args.layer.as_deref())?,
            per_process: args.per_process,
        })
    }
}

/// Writes `analysis` in `format`.
pub fn write(
    analysis: &Analysis,
    format: OutputFormat,
    render: &Render,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    match format {
        OutputFormat::Text => text::write(analysis, out),
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, analysis).map_err(std::io::Error::from)?;
            writeln!(out)
        }
        OutputFormat::Folded => folded::write(analysis, render, out),
        OutputFormat::Svg => svg::write(analysis, render, out),
        OutputFormat::Pprof => pprof::write(analysis, render, out),
        OutputFormat::Speedscope => speedscope::write(analysis, render, out),
    }
}

/// Opens an output file before anything is traced, so that a bad path fails first; it
/// gets its name only once written whole (see [`file`]).
pub fn create(path: &Path, mode: u32) -> Result<OutputFile, UserError> {
    OutputFile::create(path, mode)
}

/// Writes `analysis` in `format` to `out` and gives the file its name.
pub fn write_file(
    analysis: &Analysis,
    format: OutputFormat,
    render: &Render,
    out: OutputFile,
) -> Result<(), UserError> {
    out.commit(|w| write(analysis, format, render, w))
}

/// `pyleak report FILE.json`: the text summary again, and `-o` in any format.
pub fn rerender(input: &Path, args: &OutputArgs) -> anyhow::Result<i32> {
    let bad = |source: Cause| UserError::BadReport {
        path: input.to_owned(),
        source,
    };
    let render = Render::from_args(args)?;
    let text = std::fs::read_to_string(input).map_err(|e| bad(e.into()))?;
    let analysis: Analysis = serde_json::from_str(&text).map_err(|e| bad(e.into()))?;
    let out = args
        .output
        .as_deref()
        .map(|p| create(p, args.file_mode))
        .transpose()?;
    text::write(&analysis, &mut std::io::stdout().lock())?;
    if let Some(out) = out {
        let format = args
            .format
            .unwrap_or_else(|| OutputFormat::from_path(out.path()));
        write_file(&analysis, format, &render, out)?;
    }
    Ok(0)
}

/// `12.3 MiB` and friends.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
