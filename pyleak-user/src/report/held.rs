//! Text sections about memory held that is not a leak: what the allocators keep resident
//! after their blocks are freed (retention), the moment the most was live (the peak), and
//! what forked children copied from their parents (copy-on-write).

use std::io::Write;

use super::human_bytes;
use crate::analysis::Analysis;

/// Frames shown (leaf end) per stack in these sections.
const FRAMES_SHOWN: usize = 3;

/// The leaf [`FRAMES_SHOWN`] frames of a root-first stack, leaf first: `a <- b <- c`.
fn leaf_first(frames: &[String]) -> String {
    let shown: Vec<&str> = frames
        .iter()
        .rev()
        .take(FRAMES_SHOWN)
        .map(String::as_str)
        .collect();
    shown.join(" <- ")
}

/// Below this, a kind's retention is not worth a line (a few pages always are).
const RETENTION_SHOWN_BYTES: u64 = 1 << 20;

/// Allocator retention: per process and mapping kind, resident bytes, the share live
/// blocks use, who faulted the pages in and what would give them back.
pub fn retention(report: &Analysis, out: &mut dyn Write) -> std::io::Result<()> {
    let shown: Vec<_> = report
        .retention
        .iter()
        .filter(|r| r.retained_bytes >= RETENTION_SHOWN_BYTES)
        .collect();
    if shown.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "allocator retention, not leak suspects (resident pages faulted in while tracing that no live block accounts for):"
    )?;
    for r in shown {
        let used = if r.resident_bytes == 0 {
            0.0
        } else {
            r.used_bytes as f64 * 100.0 / r.resident_bytes as f64
        };
        writeln!(
            out,
            "  {:<14} {:>10} resident, {}{:.1}% used by live blocks, {} retained (pid {})",
            r.kind,
            human_bytes(r.resident_bytes),
            if r.used_estimated { "~" } else { "" },
            used,
            human_bytes(r.retained_bytes),
            r.pid
        )?;
        for s in &r.stacks {
            writeln!(
                out,
                "      faulted in {:>10} at {}",
                human_bytes(s.resident_bytes),
                leaf_first(&s.frames)
            )?;
        }
        writeln!(out, "      gives it back: {}", r.gives_back)?;
    }
    Ok(())
}

/// Layers whose peak the text shows: what Python and C asked for (the vm and pages
/// layers' peaks stay in the JSON).
const PEAK_LAYERS: [&str; 3] = ["pymalloc", "pymem_raw", "libc"];

/// The peaks: per allocator layer, when the most was live and who held it.
pub fn peaks(report: &Analysis, out: &mut dyn Write) -> std::io::Result<()> {
    let shown: Vec<_> = report
        .peak
        .iter()
        .filter(|p| PEAK_LAYERS.contains(&p.layer.as_str()) && p.live_bytes > 0)
        .collect();
    if shown.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "peak live memory (highest growth sample, every {} s):",
        report.interval_s
    )?;
    for p in shown {
        let now = report.layers.get(&p.layer).map_or(0, |l| l.live_bytes);
        writeln!(
            out,
            "  {:<9} {:>10} at {:.1} s ({} live at the end)",
            p.layer,
            human_bytes(p.live_bytes),
            p.t_s,
            human_bytes(now)
        )?;
        for s in p.stacks.iter().take(3) {
            writeln!(
                out,
                "      {:>10} at {} (pid {})",
                human_bytes(s.live_bytes),
                leaf_first(&s.frames),
                s.pid
            )?;
        }
    }
    Ok(())
}

/// Below this, a child's copies are not worth a line (every fork copies a few pages: the
/// stack, the interpreter's state).
const COW_SHOWN_BYTES: u64 = 1 << 20;

/// Copy-on-write after fork: per child, the bytes it made private and the lines that
/// wrote them.
pub fn copy_on_write(report: &Analysis, out: &mut dyn Write) -> std::io::Result<()> {
    let shown: Vec<_> = report
        .copy_on_write
        .iter()
        .filter(|c| c.bytes >= COW_SHOWN_BYTES)
        .collect();
    if shown.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "copy-on-write after fork, not leak suspects (pages a child shared with its parent, copied when the child wrote them):"
    )?;
    for c in shown {
        let parent = c
            .parent
            .map(|p| format!(", forked by {p}"))
            .unwrap_or_default();
        let Some((top, rest)) = c.stacks.split_first() else {
            continue;
        };
        writeln!(
            out,
            "  pid {}{parent}: {} made private, {} by {}",
            c.pid,
            human_bytes(c.bytes),
            human_bytes(top.bytes),
            leaf_first(&top.frames)
        )?;
        for s in rest.iter().take(2) {
            writeln!(
                out,
                "      {:>10} by {}",
                human_bytes(s.bytes),
                leaf_first(&s.frames)
            )?;
        }
    }
    writeln!(
        out,
        "  keeps them shared: gc.freeze() in the parent before it forks (a child's collections then leave what it inherited alone)"
    )
}
