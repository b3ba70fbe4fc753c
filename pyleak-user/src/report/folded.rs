//! Folded stacks (`frame;frame;frame value`, root first), as inferno and flamegraph.pl read
//! them. The layer is the root frame, so one file holds every layer side by side.

use std::io::Write;

use clap::ValueEnum;

use super::Report;

/// What a folded line's value counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Metric {
    /// Bytes still live at the end.
    LiveBytes,
    /// Bytes allocated over the recording.
    AllocBytes,
    /// Allocations over the recording.
    Allocs,
}

/// Writes one line per (layer, stack) with a non-zero value; stacks of several processes
/// with the same frames are summed, unless `per_process` puts each process
/// (`comm (pid N)`) at the root, above the layer.
pub fn write(
    report: &Report,
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
