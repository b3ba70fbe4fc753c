//! The text summary printed at the end of a recording.

use std::io::Write;

use pyleak_common::Layer;

use super::human_bytes;
use crate::analysis::Analysis;

/// How many stacks the summary lists.
const TOP_STACKS: usize = 10;
/// How many frames (leaf end) each listed stack shows.
const FRAMES_SHOWN: usize = 8;

/// `bytes`, marked `~` when it is a sampled estimate.
fn approx(estimated: bool, bytes: u64) -> String {
    if estimated {
        format!("~{}", human_bytes(bytes))
    } else {
        human_bytes(bytes)
    }
}

/// A block count, marked `~` when it is a sampled estimate.
fn approx_count(estimated: bool, n: u64) -> String {
    if estimated {
        format!("~{n}")
    } else {
        n.to_string()
    }
}

/// `, ±stderr from N samples` for an estimate.
fn margin(e: Option<crate::analysis::Estimate>) -> String {
    match e {
        Some(e) => format!(
            " (±{} from {} samples)",
            human_bytes(e.live_bytes_stderr.round() as u64),
            e.samples
        ),
        None => String::new(),
    }
}

/// What a full stack table (`stacks_full` lost events) means and what to do: said once
/// while recording and under the report's lost events.
pub fn stacks_full_hint() -> String {
    format!(
        "the kernel's stack table (STACKS, {} stacks, never pruned) is full: new stacks are not kept, and their events' bytes go unattributed. Every Python process traced with --pymalloc exact interns thousands of stacks (a group of about 20 short-lived ones fills it): use the default --pymalloc sampled, or --layers libc,vm,pages, for long group recordings",
        pyleak_common::STACKS_ENTRIES
    )
}

/// Writes the summary: a table of layers, lost events, the stacks holding most live memory.
pub fn write(report: &Analysis, out: &mut dyn Write) -> std::io::Result<()> {
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
    if let Some(how) = &report.command_exit {
        writeln!(out, "pyleak: the command ended: {how}")?;
    }
    writeln!(
        out,
        "{:<10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "layer",
        "allocs",
        "frees",
        "alloc",
        "freed",
        "live n",
        "live",
        "p50",
        "p90",
        "p99",
        "max",
        "life p50",
        "life p99"
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
        let life = |k: &str| {
            l.lifetime_percentiles_us
                .get(k)
                .map(|v| human_duration_us(*v))
                .unwrap_or_else(|| "-".into())
        };
        writeln!(
            out,
            "{:<10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>12} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
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
            life("p50"),
            life("p99"),
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
    if let Some(r) = &report.retired {
        let left: Vec<String> = r
            .live_bytes
            .iter()
            .filter(|(_, &b)| b > 0)
            .map(|(l, &b)| format!("{l} {}", human_bytes(b)))
            .collect();
        writeln!(
            out,
            "exited processes retired: {} (pyleak keeps the last {} whole; older ones are summed here and left out of the stacks above), live at exit: {}",
            r.processes,
            r.kept,
            if left.is_empty() { "nothing".to_owned() } else { left.join(", ") }
        )?;
    }
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
        if report.lost.get("stacks_full").is_some_and(|&n| n > 0) {
            writeln!(out, "  {}", stacks_full_hint())?;
        }
    }
    if !report.probe_links.is_empty() {
        writeln!(
            out,
            "probes: {} uprobes ({}), attached in {:.2} s, detached in {:.2} s",
            report.probes.len(),
            if report.probe_links == "multi-uprobe" {
                "multi-uprobe links"
            } else {
                "one perf event each"
            },
            report.probes_attach_s,
            report.probes_detach_s
        )?;
    }
    if let Some(sp) = &report.sampled_pymalloc {
        let inclusion: Vec<String> = sp
            .inclusion
            .iter()
            .map(|(pid, p)| {
                let time = if sp.inclusion_from_time.contains(pid) {
                    " (the windows' share of time: too few arena pages faulted in inside them)"
                } else {
                    ""
                };
                format!("{:.2}% for pid {pid}{time}", p * 100.0)
            })
            .collect();
        writeln!(
            out,
            "pymalloc sampled: {} windows ({:.2} s open) saw {} of the heap's growth; {} samples live{}, {} found freed ({} reused by other objects){}{}; pymalloc figures marked ~ are estimates, requests above 512 B are counted exactly in libc (--pymalloc exact traps every call)",
            sp.windows,
            sp.window_open_s,
            if inclusion.is_empty() {
                "none".to_owned()
            } else {
                inclusion.join(", ")
            },
            sp.samples,
            if sp.unconfirmed > 0 {
                format!(
                    " ({} more from the last window, not judged again: left out)",
                    sp.unconfirmed
                )
            } else {
                String::new()
            },
            sp.freed,
            sp.reused,
            if sp.cut_to_pools > 0 {
                format!(
                    "; estimates cut by ~{} blocks to what the pools hold in use",
                    sp.cut_to_pools
                )
            } else {
                String::new()
            },
            if sp.capped { "; sample cap reached, no more windows" } else { "" }
        )?;
    }
    linkage(report, out)?;
    suspects(report, out)?;
    startup(report, out)?;
    super::held::retention(report, out)?;
    super::held::peaks(report, out)?;
    super::held::copy_on_write(report, out)?;
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
            "  {:<9} {:>10} live in {}{} (pid {}, {} allocated){}",
            s.layer,
            approx(s.estimate.is_some(), s.live_bytes),
            approx_count(s.estimate.is_some(), s.live_count),
            margin(s.estimate),
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

/// How many suspects the summary lists.
const TOP_SUSPECTS: usize = 5;

/// The layers linked, in words: requested by Python → held by pymalloc's arenas → held by
/// malloc → mapped → resident.
fn linkage(report: &Analysis, out: &mut dyn Write) -> std::io::Result<()> {
    let l = &report.linkage;
    let kinds = |m: &std::collections::BTreeMap<String, u64>| {
        let mut v: Vec<(&String, &u64)> = m.iter().filter(|(_, b)| **b > 0).collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        v.iter()
            .map(|(k, b)| format!("{} {}", k, human_bytes(**b)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(out, "memory by layer, top down (live at the end):")?;
    if report.layers.get("pymalloc").is_some_and(|r| r.allocs > 0) {
        writeln!(
            out,
            "  requested by Python code   {:>10} in pymalloc ({} in objects of at most 512 B)",
            human_bytes(l.live[Layer::Pymalloc]),
            human_bytes(l.pymalloc_small_live_bytes)
        )?;
    }
    if l.arena_count > 0 {
        let ratio = l
            .fragmentation_ratio
            .map(|r| format!("; {r:.1}x the small objects in them: fragmentation"))
            .unwrap_or_default();
        writeln!(
            out,
            "  held by pymalloc arenas    {:>10} in {} arenas mapped while tracing, {} resident{}",
            human_bytes(l.arena_bytes),
            l.arena_count,
            human_bytes(l.arena_resident_bytes),
            ratio
        )?;
    }
    if report.layers.get("pymem_raw").is_some_and(|r| r.allocs > 0) {
        writeln!(
            out,
            "  raw Python buffers         {:>10} in PyMem_Raw",
            human_bytes(l.live[Layer::PymemRaw])
        )?;
    }
    if report.layers.get("libc").is_some_and(|r| r.allocs > 0) {
        writeln!(
            out,
            "  held by malloc             {:>10} ({} of it for pymalloc/PyMem_Raw)",
            human_bytes(l.live[Layer::Libc]),
            human_bytes(l.libc_for_python_live_bytes)
        )?;
    }
    if report.layers.get("vm").is_some_and(|r| r.allocs > 0) {
        writeln!(
            out,
            "  mapped                     {:>10} ({})",
            human_bytes(l.live[Layer::Vm]),
            kinds(&l.vm_by_kind)
        )?;
    }
    if report.layers.get("pages").is_some_and(|r| r.allocs > 0) {
        let bulk = if l.resident_bulk_bytes > 0 {
            format!(
                "; {} of it mapped in bulk by single faults (fault-around, huge pages)",
                human_bytes(l.resident_bulk_bytes)
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "  resident                   {:>10} ({}){bulk}",
            human_bytes(l.live[Layer::Pages]),
            kinds(&l.resident_by_kind)
        )?;
    }
    Ok(())
}

/// The leak suspects, most likely first.
fn suspects(report: &Analysis, out: &mut dyn Write) -> std::io::Result<()> {
    if report.suspects.is_empty() {
        writeln!(
            out,
            "no leak suspects: nothing live older than {} s and no stack growing",
            report.min_age_s
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "leak suspects (live at least {} s, or growing; sampled every {} s, {} samples kept):",
        report.min_age_s, report.interval_s, report.samples
    )?;
    // One entry per Python stack (its layers are ranked together, upper layer first); the
    // linkage line gives the other layers.
    let mut seen = std::collections::HashSet::new();
    let shown = report
        .suspects
        .iter()
        .filter(|s| seen.insert((s.pid, &s.frames)))
        .take(TOP_SUSPECTS);
    for (i, s) in shown.enumerate() {
        let growth = match s.trend {
            crate::analysis::growth::Trend::Unknown => "growth unknown".to_owned(),
            t => format!(
                "{}, {}/s",
                format!("{t:?}").to_lowercase(),
                if s.growth_bytes_per_s >= 0.0 {
                    format!("+{}", human_bytes(s.growth_bytes_per_s as u64))
                } else {
                    format!("-{}", human_bytes((-s.growth_bytes_per_s) as u64))
                }
            ),
        };
        writeln!(
            out,
            "  #{} {:<9} {:>10} live in {}{} ({} older than {} s, oldest {:.1} s), {}, pid {}",
            i + 1,
            s.layer,
            approx(s.estimate.is_some(), s.live_bytes),
            approx_count(s.estimate.is_some(), s.live_count),
            margin(s.estimate),
            human_bytes(s.aged_live_bytes),
            report.min_age_s,
            s.oldest_age_s,
            growth,
            s.pid
        )?;
        for f in s.frames.iter().rev().take(FRAMES_SHOWN) {
            writeln!(out, "      {f}")?;
        }
        if !s.held_by.is_empty() {
            let held: Vec<String> = s
                .held_by
                .iter()
                .map(|h| {
                    let (n, b) = (h.count, human_bytes(h.bytes));
                    format!("{} ({n} blocks, {b})", h.path.join("."))
                })
                .collect();
            writeln!(out, "      held by: {}", held.join(", "))?;
        }
        if let Some(full) = s.full_stacks.first() {
            let inside: Vec<&str> = full.frames[s.frames.len().min(full.frames.len())..]
                .iter()
                .rev()
                .take(FRAMES_SHOWN)
                .map(String::as_str)
                .collect();
            let more = match s.full_stacks.len() {
                1 => String::new(),
                n => format!(" (and {} more library stacks)", n - 1),
            };
            writeln!(
                out,
                "      allocated inside library code: {}{more}",
                inside.join(" <- ")
            )?;
        }
        if let Some(note) = &s.note {
            writeln!(out, "      {note}")?;
        }
        let k = &s.linkage;
        let mut parts = Vec::new();
        // Every layer of the registry, top down, with pymalloc's arenas under malloc.
        for layer in Layer::ALL {
            let mut at = vec![(layer.info().shown, k.live[layer])];
            if layer == Layer::Libc {
                at.push(("arenas", k.arena_bytes));
            }
            for (name, v) in at {
                if v > 0 {
                    parts.push(format!("{name} {}", human_bytes(v)));
                }
            }
        }
        if !parts.is_empty() {
            writeln!(
                out,
                "      this stack at every layer: {}",
                parts.join(" -> ")
            )?;
        }
    }
    Ok(())
}

/// Start-up memory, apart from the suspects: one line in all, then the biggest stacks.
fn startup(report: &Analysis, out: &mut dyn Write) -> std::io::Result<()> {
    if report.startup.is_empty() {
        return Ok(());
    }
    let total: u64 = report.startup.iter().map(|s| s.live_bytes).sum();
    writeln!(
        out,
        "start-up memory, not leak suspects (made in the first {} s of a process, flat, no Python frame or an import's): {} in {} stacks",
        crate::analysis::STARTUP_S,
        human_bytes(total),
        report.startup.len()
    )?;
    for s in report.startup.iter().take(3) {
        let leaf = s.frames.last().map_or("?", String::as_str);
        writeln!(
            out,
            "      {:<9} {:>10}  {leaf}  (pid {})",
            s.layer,
            human_bytes(s.live_bytes),
            s.pid
        )?;
    }
    Ok(())
}

/// `850 us`, `12 ms`, `3.4 s`, `2.0 min`: a lifetime in microseconds, short.
fn human_duration_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} us"),
        1_000..1_000_000 => format!("{} ms", us / 1_000),
        1_000_000..120_000_000 => format!("{:.1} s", us as f64 / 1e6),
        _ => format!("{:.1} min", us as f64 / 60e6),
    }
}

/// Per process, when there are several: pid, command, cgroup, CPython version, the live
/// bytes of each layer, and for a followed child its parent and how late its probes came.
fn write_processes(report: &Analysis, out: &mut dyn Write) -> std::io::Result<()> {
    if report.processes.len() < 2 {
        return Ok(());
    }
    let mut live: std::collections::HashMap<(u32, &str), u64> = std::collections::HashMap::new();
    for s in &report.stacks {
        *live.entry((s.pid, s.layer.as_str())).or_default() += s.live_bytes;
    }
    writeln!(out, "per process (live bytes):")?;
    // One column per layer of the registry, in call order.
    let head: String = Layer::ALL
        .iter()
        .map(|l| format!(" {:>10}", l.name()))
        .collect();
    writeln!(
        out,
        "  {:>7} {:<16} {:<8}{head}  cgroup",
        "pid", "command", "python"
    )?;
    for p in &report.processes {
        let cols: String = Layer::ALL
            .iter()
            .map(|l| {
                let b = live.get(&(p.pid, l.name())).copied().unwrap_or(0);
                format!(" {:>10}", human_bytes(b))
            })
            .collect();
        writeln!(
            out,
            "  {:>7} {:<16} {:<8}{cols}  {}",
            p.pid,
            p.comm,
            p.python.as_deref().unwrap_or("-"),
            p.cgroup.as_deref().unwrap_or("?"),
        )?;
        match &p.followed {
            Some(f) if f.traced => writeln!(
                out,
                "  {:>7} child of {}, probes attached {:.0} ms after its {} (allocator calls before are not seen)",
                "",
                f.parent,
                f.gap_ms,
                if f.exec { "exec" } else { "fork" }
            )?,
            Some(f) => writeln!(
                out,
                "  {:>7} child of {}, exited before its probes were attached ({:.0} ms): its allocator calls are not seen",
                "", f.parent, f.gap_ms
            )?,
            None => {}
        }
    }
    Ok(())
}
