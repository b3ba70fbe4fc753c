//! The text summary printed at the end of a recording.

use std::io::Write;

use pyleak_common::Layer;

use super::{human_bytes, Report};

/// How many stacks the summary lists.
const TOP_STACKS: usize = 10;
/// How many frames (leaf end) each listed stack shows.
const FRAMES_SHOWN: usize = 8;

/// Writes the summary: a table of layers, lost events, the stacks holding most live memory.
pub fn write(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    let procs: Vec<String> = report
        .processes
        .iter()
        .map(|p| format!("{} ({})", p.pid, p.comm))
        .collect();
    if procs.len() > 4 {
        writeln!(
            out,
            "pyleak: {:.1} s recorded, {} processes (per process below)",
            report.duration_s,
            procs.len()
        )?;
    } else {
        writeln!(
            out,
            "pyleak: {:.1} s recorded, process {}",
            report.duration_s,
            procs.join(", ")
        )?;
    }
    writeln!(
        out,
        "{:<10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>12} {:>8} {:>8} {:>8} {:>8}",
        "layer", "allocs", "frees", "alloc", "freed", "live n", "live", "p50", "p90", "p99", "max"
    )?;
    for layer in Layer::ALL {
        let Some(l) = report.layers.get(layer.name()) else {
            continue;
        };
        let p = |k: &str| {
            l.size_percentiles
                .get(k)
                .map(|v| human_bytes(*v))
                .unwrap_or_else(|| "-".into())
        };
        writeln!(
            out,
            "{:<10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>12} {:>8} {:>8} {:>8} {:>8}",
            layer.name(),
            l.allocs,
            l.frees,
            human_bytes(l.alloc_bytes),
            human_bytes(l.freed_bytes),
            l.live_count,
            human_bytes(l.live_bytes),
            p("p50"),
            p("p90"),
            p("p99"),
            p("max"),
        )?;
    }
    let unmatched: Vec<String> = Layer::ALL
        .iter()
        .filter_map(|l| {
            report
                .layers
                .get(l.name())
                .filter(|r| r.unmatched_frees > 0)
                .map(|r| format!("{} {}", l.name(), r.unmatched_frees))
        })
        .collect();
    if !unmatched.is_empty() {
        writeln!(
            out,
            "frees of memory allocated before tracing (not counted): {}",
            unmatched.join(", ")
        )?;
    }
    write_processes(report, out)?;
    if report.lost_events == 0 {
        writeln!(out, "lost events: 0")?;
    } else {
        let reasons: Vec<String> = report
            .lost
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(
            out,
            "lost events: {} ({})",
            report.lost_events,
            reasons.join(", ")
        )?;
    }
    let top: Vec<_> = report
        .stacks
        .iter()
        .filter(|s| s.live_bytes > 0)
        .take(TOP_STACKS)
        .collect();
    if top.is_empty() {
        writeln!(out, "no live memory attributed to any stack")?;
        return Ok(());
    }
    writeln!(out, "top stacks by live bytes:")?;
    for s in top {
        writeln!(
            out,
            "  {:<9} {:>10} live in {} (pid {}, {} allocated){}",
            s.layer,
            human_bytes(s.live_bytes),
            s.live_count,
            s.pid,
            human_bytes(s.alloc_bytes),
            if s.truncated { " [truncated]" } else { "" }
        )?;
        for f in s.frames.iter().rev().take(FRAMES_SHOWN) {
            writeln!(out, "      {f}")?;
        }
    }
    Ok(())
}

/// Per process, when there are several: pid, command, cgroup, CPython version, and the
/// live bytes of each layer.
fn write_processes(report: &Report, out: &mut impl Write) -> std::io::Result<()> {
    if report.processes.len() < 2 {
        return Ok(());
    }
    let mut live: std::collections::HashMap<(u32, &str), u64> = std::collections::HashMap::new();
    for s in &report.stacks {
        *live.entry((s.pid, s.layer.as_str())).or_default() += s.live_bytes;
    }
    writeln!(out, "per process (live bytes):")?;
    writeln!(
        out,
        "  {:>7} {:<16} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10}  cgroup",
        "pid", "command", "python", "pymalloc", "pymem_raw", "libc", "vm", "pages"
    )?;
    for p in &report.processes {
        let l = |layer: Layer| human_bytes(live.get(&(p.pid, layer.name())).copied().unwrap_or(0));
        writeln!(
            out,
            "  {:>7} {:<16} {:<8} {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
            p.pid,
            p.comm,
            p.python.as_deref().unwrap_or("-"),
            l(Layer::Pymalloc),
            l(Layer::PymemRaw),
            l(Layer::Libc),
            l(Layer::Vm),
            l(Layer::Pages),
            p.cgroup.as_deref().unwrap_or("?"),
        )?;
    }
    Ok(())
}
