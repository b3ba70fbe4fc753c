//! Folded stacks (`frame;frame;frame value`, root first), as inferno and flamegraph.pl read
//! them. The layer is the root frame, so one file holds every layer side by side.

use std::io::Write;

use clap::ValueEnum;

use crate::analysis::Analysis;

/// What a folded line's value counts.
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

/// Writes one line per (layer, stack) with a non-zero value; stacks of several processes
/// with the same frames are summed, unless `per_process` puts each process
/// (`comm (pid N)`) at the root, above the layer.
pub fn write(
    report: &Analysis,
    metric: Metric,
    per_process: bool,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let comms: std::collections::HashMap<u32, &str> = report
        .processes
        .iter()
        .map(|p| (p.pid, p.comm.as_str()))
        .collect();
    let mut lines: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for s in &report.stacks {
        let value = match metric {
            Metric::LiveBytes => s.live_bytes,
            Metric::AllocBytes => s.alloc_bytes,
            Metric::Allocs => s.allocs,
            Metric::Resident if s.layer == "pages" => s.live_bytes,
            Metric::Resident => 0,
        };
        if value == 0 {
            continue;
        }
        let mut key = String::new();
        if per_process {
            let comm = comms.get(&s.pid).copied().unwrap_or("?").replace(';', ":");
            key.push_str(&format!("{comm} (pid {});", s.pid));
        }
        key.push_str(&format!("[{}]", s.layer));
        for f in &s.frames {
            key.push(';');
            // ';' separates frames; keep it out of names.
            key.push_str(&f.replace(';', ":"));
        }
        *lines.entry(key).or_default() += value;
    }
    for (k, v) in lines {
        writeln!(out, "{k} {v}")?;
    }
    Ok(())
}

/// Draws the folded stacks as an SVG flamegraph (inferno), titled with the metric and the
/// layers drawn.
pub fn write_svg(
    report: &Analysis,
    metric: Metric,
    per_process: bool,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut folded = Vec::new();
    write(report, metric, per_process, &mut folded)?;
    let folded = String::from_utf8_lossy(&folded);
    let layers: std::collections::BTreeSet<&str> = folded
        .lines()
        .filter_map(|l| {
            // The first bracketed frame is the layer (after the process, with --per-process).
            l.split(';')
                .find_map(|f| f.strip_prefix('[')?.strip_suffix(']'))
        })
        .collect();
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = format!(
        "pyleak: {} by stack ({})",
        metric.name(),
        if layers.is_empty() {
            "no data".to_owned()
        } else {
            layers.into_iter().collect::<Vec<_>>().join(", ")
        }
    );
    opts.count_name = match metric {
        Metric::Allocs => "allocations".to_owned(),
        _ => "bytes".to_owned(),
    };
    if folded.trim().is_empty() {
        // inferno refuses an empty input; say so in the picture instead.
        return write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="600" height="40"><text x="10" y="25">{}: nothing to draw</text></svg>"#,
            opts.title
        );
    }
    inferno::flamegraph::from_lines(&mut opts, folded.lines(), out)
        .map_err(|e| std::io::Error::other(e.to_string()))
}
