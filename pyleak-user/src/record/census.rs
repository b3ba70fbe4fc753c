//! `pyleak record --census`: a heap census (`pyleak census`) of each Python target at
//! every growth sample and at the end, so that the report says which types grow and what
//! holds them next to where the memory was allocated. A census blocks the trace loop
//! while it parses (~0.5 s for a million objects here; the ring buffer keeps what comes
//! meanwhile, and counts what it drops).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::census::Report;
use crate::python::{self, census, PythonRuntime};
use crate::report::human_bytes;

/// Holders and types shown per process in the text summary.
const TOP: usize = 10;

/// One traced process's censuses.
struct Proc {
    rt: PythonRuntime,
    /// Where its runtime is loaded, once known (a launched command maps it later).
    bias: Option<u64>,
    report: Report,
    /// Why the last census failed, said once.
    failed: Option<String>,
    /// A command pyleak launched (starting when the recording starts).
    launched: bool,
}

/// The censuses of every Python target.
#[derive(Default)]
pub struct Censuses {
    procs: BTreeMap<u32, Proc>,
    /// Whether a sample was taken yet.
    sampled: bool,
}

impl Censuses {
    /// Whether `pid` is followed.
    pub fn has(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// Follows `pid`, which runs `rt` (3.8–3.13; others are left out with a warning);
    /// `launched`: a command pyleak started.
    pub fn add(&mut self, pid: u32, rt: &PythonRuntime, launched: bool) {
        let version = python::version_name(rt.cpython.version());
        if rt.cpython.heap_layout().is_none() {
            eprintln!("pyleak: warning: --census: process {pid} runs CPython {version}, whose heap pyleak cannot read (3.8-3.13)");
            return;
        }
        self.procs.insert(
            pid,
            Proc {
                rt: rt.clone(),
                bias: None,
                report: Report::new(pid, version),
                failed: None,
                launched,
            },
        );
    }

    /// Takes a census of every followed process but those `skip` names, timed from
    /// `started` (the recording's start) to the moment each process's memory was read. A
    /// process gone, or not started yet, is skipped (said once at debug level); so is a
    /// launched command at the recording's first sample, which finds its interpreter still
    /// starting (a half-built heap, counted as growth from nothing).
    pub fn take(&mut self, started: std::time::Instant, skip: impl Fn(u32) -> bool) {
        let begun = started.elapsed().as_secs_f64();
        let first = !std::mem::replace(&mut self.sampled, true);
        for (&pid, p) in &mut self.procs {
            if skip(pid) || (first && p.launched) {
                continue;
            }
            if p.bias.is_none() {
                p.bias = python::load_bias(pid, &p.rt);
            }
            let Some(bias) = p.bias else {
                continue;
            };
            match census::take(pid, &p.rt, bias, true) {
                Ok(c) => {
                    log::info!(
                        "census of {pid}: {} objects, paused {:.1} ms, parsed in {:.0} ms",
                        c.objects,
                        c.copy.paused_ms,
                        c.parse_ms
                    );
                    let t = c
                        .copy
                        .read_at
                        .map_or(begun, |at| at.duration_since(started).as_secs_f64());
                    p.report.add(t, c);
                    p.failed = None;
                }
                Err(e) => {
                    let e = e.to_string();
                    if p.failed.as_ref() != Some(&e) {
                        log::info!("census of {pid} at {begun:.1} s: {e}");
                    }
                    p.failed = Some(e);
                }
            }
        }
    }

    /// For `pyleak top`: per process, its `top` fastest-growing types and holders so far,
    /// as lines of text (nothing before a process's second census).
    pub fn live_lines(&self, top: usize) -> Vec<String> {
        let mut lines = Vec::new();
        for (&pid, p) in &self.procs {
            let (growth, holders) = p.report.current(top);
            let growing: Vec<_> = growth.iter().filter(|g| g.bytes_per_s > 0.0).collect();
            if growing.is_empty() && holders.is_empty() {
                continue;
            }
            lines.push(format!("growing types (pid {pid}):"));
            for g in growing.iter().take(top) {
                lines.push(format!(
                    "  {:>12}/s {:>12} objects/s  {}",
                    format!("+{}", human_bytes(g.bytes_per_s as u64)),
                    format!("{:+.1}", g.count_per_s),
                    g.name
                ));
            }
            lines.push(format!("holders (pid {pid}):"));
            for h in holders.iter().filter(|h| h.growth_bytes_per_s > 0.0) {
                let len = h.len.map(|n| format!(", {n} items")).unwrap_or_default();
                lines.push(format!(
                    "  {:>12}/s {:>10} retained  {} ({}{len})",
                    format!("+{}", human_bytes(h.growth_bytes_per_s as u64)),
                    human_bytes(h.retained_bytes),
                    h.path.join("."),
                    h.type_name
                ));
            }
        }
        lines
    }

    /// The holder of `pid`'s allocator block at `addr` in its last census.
    pub fn holder_of(&self, pid: u32, addr: u64) -> Option<&[String]> {
        self.procs.get(&pid)?.report.holder_of_block(addr)
    }

    /// The `census` section of the report (one entry per process with a census, shaped
    /// as `pyleak census --json`), and the text summary; None when no census was taken.
    pub fn finish(self) -> Option<(Value, String)> {
        let mut json = Vec::new();
        let mut text = String::new();
        for (_, p) in self.procs {
            if p.report.is_empty() {
                continue;
            }
            let done = p.report.finish(TOP);
            json.push(done.json());
            text.push('\n');
            text.push_str(&done.text(TOP));
        }
        (!json.is_empty()).then_some((Value::Array(json), text))
    }
}
