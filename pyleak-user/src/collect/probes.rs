//! Placing and removing uprobes: one multi-uprobe link per (program, file) where the
//! kernel has them, else one perf event per probe; return programs first.

use std::{num::NonZeroU32, path::Path};

use anyhow::Context as _;
use aya::programs::uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope};
use pyleak_common::names;

use super::{
    close_in_parallel, current_brk, error_chain, uprobe, LinkKey, Recorder, Uprobes,
    UPROBE_PROGRAMS,
};
use crate::{
    attach::{ProbeRole, ProbeSpec},
    errors::UserError,
    multi_uprobe::MultiLink,
};

impl Recorder {
    /// Starts tracing `pid`: marks it in the kernel and attaches `probes` for it alone.
    ///
    /// A process that exits while its probes go in (a zombie's `/proc/PID/root` is gone,
    /// so the next probe's file cannot be opened) stays a target: the recording ends as for
    /// any target that exits, with a report of what it did until then.
    pub fn add_target(&mut self, pid: u32, probes: &[ProbeSpec]) -> anyhow::Result<()> {
        self.mark_active(pid)?;
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or(UserError::NoSuchPid(pid))?);
        if let Err(e) = self.attach(probes, scope) {
            if crate::targets::alive(pid) {
                return Err(e);
            }
            log::info!("process {pid} exited while its probes were attached: {e:#}");
        }
        self.model.add_process(pid, current_brk(pid));
        if self.windows.is_some() {
            self.model.note_earlier_arenas(pid);
        }
        self.refresh_comm(pid);
        if !self.targets.contains(&pid) {
            self.targets.push(pid);
        }
        if let Some(cg) = crate::targets::group::of_process(pid) {
            self.cgroups.insert(pid, cg);
        }
        Ok(())
    }

    /// Attaches `probes` with `scope`; remembers them for the report.
    ///
    /// With multi-uprobe links, one link per (program, file) holds every probe of that
    /// program in the file. Return programs are attached first: a call entering between
    /// the two attachments must not leave an entry behind whose return is never seen (the
    /// thread's later calls would look nested in it); a return without its entry is
    /// counted.
    pub(super) fn attach(
        &mut self,
        probes: &[ProbeSpec],
        scope: UProbeScope,
    ) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        for p in probes {
            if let Some(info) = p.site {
                let id = pyleak_common::ProbeCookie::decode(p.cookie).stack_delta;
                let mut sites: aya::maps::Array<_, pyleak_common::SiteInfo> =
                    aya::maps::Array::try_from(
                        self.ebpf.map_mut("SITES").context("map SITES missing")?,
                    )?;
                sites.set(id, info, 0)?;
            }
        }
        // Sampled pymalloc reads the process's heap to judge its samples, which pyleak can
        // for the CPythons whose layout it knows: another's pymalloc probes stay out.
        let unjudged = match scope {
            UProbeScope::OneProcess(pid) if self.windows.is_some() => self
                .pythons
                .get(&pid.get())
                .filter(|v| !super::window::judges(v))
                .cloned(),
            _ => None,
        };
        let kept: Vec<ProbeSpec>;
        let probes = match &unjudged {
            Some(version) => {
                eprintln!(
                    "pyleak: warning: process {} runs CPython {version}, whose heap sampled pymalloc tracing cannot read (3.8 to 3.14): its pymalloc layer is left out",
                    match scope {
                        UProbeScope::OneProcess(pid) => pid.get(),
                        _ => 0,
                    }
                );
                kept = probes
                    .iter()
                    .filter(|p| !super::window::is_pymalloc_allocator(p))
                    .cloned()
                    .collect();
                &kept[..]
            }
            None => probes,
        };
        let now: Vec<&ProbeSpec> = match self.windows.as_mut() {
            Some(w) => w.keep(probes, scope),
            None => probes.iter().collect(),
        };
        let pid = match scope {
            UProbeScope::OneProcess(pid) => Some(pid.get()),
            _ => None,
        };
        if let Uprobes::Multi { .. } = self.uprobes {
            let specs: Vec<ProbeSpec> = now.into_iter().cloned().collect();
            let new_links = self.link_probes(&specs, pid)?;
            if let Uprobes::Multi { links, .. } = &mut self.uprobes {
                links.extend(new_links);
            }
        } else {
            for p in now {
                for &prog in programs_of(p.role, self.opts.bare) {
                    let point = UProbeAttachPoint {
                        location: UProbeAttachLocation::AbsoluteOffset(p.offset),
                        cookie: Some(p.cookie),
                    };
                    let program = uprobe(&mut self.ebpf, prog)?;
                    let id = program.attach(point, &p.path, scope).map_err(|e| {
                        anyhow::anyhow!(
                            "attaching {prog} to {}+{:#x} ({}): {}",
                            p.path.display(),
                            p.offset,
                            p.symbol,
                            error_chain(&e)
                        )
                    })?;
                    let link = program.take_link(id)?;
                    if let Uprobes::PerfEvents(links) = &mut self.uprobes {
                        links.push(link);
                    }
                }
            }
        }
        self.note_code_watch(probes, pid);
        self.probes.extend(probes.iter().cloned());
        self.attach_s += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Multi-uprobe links for `probes`, one per (program, file), file by file with each
    /// file's return programs first; in process `pid` only, when given. Errors: links are not in use, or the kernel refused.
    pub(super) fn link_probes(
        &self,
        probes: &[ProbeSpec],
        pid: Option<u32>,
    ) -> anyhow::Result<Vec<MultiLink>> {
        let Uprobes::Multi { programs, .. } = &self.uprobes else {
            anyhow::bail!("multi-uprobe links are not in use");
        };
        // (program, returns, file) → its probes in plan order, returns first.
        let mut groups: Vec<(LinkKey, Vec<&ProbeSpec>)> = Vec::new();
        for ret in [true, false] {
            for p in probes {
                for &prog in programs_of(p.role, self.opts.bare) {
                    if is_return(prog) != ret {
                        continue;
                    }
                    let key = (prog, ret, p.path.as_path());
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, points)) => points.push(p),
                        None => groups.push((key, vec![p])),
                    }
                }
            }
        }
        // File by file, each file's returns first: a call's entry and return probes are in
        // one file, and a process that runs meanwhile (a child just forked) has its calls'
        // returns unseen only while its own file's entry links go in.
        let mut files: Vec<&Path> = Vec::new();
        for ((_, _, path), _) in &groups {
            if !files.contains(path) {
                files.push(path);
            }
        }
        let file_index = |p: &Path| files.iter().position(|f| *f == p).unwrap_or(0);
        groups.sort_by_key(|((_, ret, path), _)| (file_index(path), !*ret));
        let mut links = Vec::new();
        for ((prog, ret, path), points) in groups {
            let offsets: Vec<(u64, u64)> = points.iter().map(|p| (p.offset, p.cookie)).collect();
            links.push(
                programs
                    .attach(prog, path, &offsets, ret, pid)
                    .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?,
            );
        }
        Ok(links)
    }

    /// Detaches every probe placed so far, uprobes and tracepoints; returns how long it
    /// took, in seconds. Each detach waits for RCU grace periods (~0.1 s here): multi-uprobe
    /// links and tracepoints are closed from several threads at once, which share them
    /// (1.1 s → 0.57 s for `--layers libc,vm,pages`). Perf-event uprobes are closed one
    /// after another: their detach holds a kernel-wide mutex, and 32 threads contending
    /// for it took 98 s for Debian 3.11's 903 probes.
    pub fn detach_probes(&mut self) -> f64 {
        let started = std::time::Instant::now();
        let tracepoints = std::mem::take(&mut self.tracepoint_links);
        match &mut self.uprobes {
            Uprobes::Multi { links, .. } => {
                close_in_parallel(std::mem::take(links));
            }
            Uprobes::PerfEvents(links) => links.clear(),
        }
        if let Some(w) = self.windows.as_mut() {
            w.opened = None;
            close_in_parallel(std::mem::take(&mut w.links));
        }
        close_in_parallel(tracepoints);
        started.elapsed().as_secs_f64()
    }

    /// Whether uprobes are placed as multi-uprobe links.
    pub fn multi_links(&self) -> bool {
        matches!(self.uprobes, Uprobes::Multi { .. })
    }

    /// `--cgroup`, `--all`: attaches `probes` to their file for every process mapping it
    /// (the kernel counts only the traced ones); the report names the file `shown`.
    pub fn attach_file_wide(&mut self, probes: &[ProbeSpec], shown: &Path) -> anyhow::Result<()> {
        debug_assert!(self.opts.filter.file_wide());
        let n = self.probes.len();
        self.attach(probes, UProbeScope::AllProcesses)?;
        for p in &mut self.probes[n..] {
            p.path = shown.to_owned();
        }
        Ok(())
    }
}

/// The programs a probe of `role` runs (the empty ones in the benchmark's floor).
fn programs_of(role: ProbeRole, bare: bool) -> &'static [&'static str] {
    match (role, bare) {
        (ProbeRole::Alloc, false) => &[names::ALLOC_EXIT, names::ALLOC_ENTER],
        (ProbeRole::Free, false) => &[names::FREE_ENTER],
        (ProbeRole::Finalize, _) => &[names::PY_FINALIZE_ENTER],
        (ProbeRole::PyInit, _) => &[names::PY_INIT_ENTER],
        (ProbeRole::CodeDealloc, _) => &[names::CODE_DEALLOC_ENTER],
        (ProbeRole::Alloc, true) => &[names::BARE_EXIT, names::BARE_ENTER],
        (ProbeRole::Free, true) => &[names::BARE_ENTER],
        (ProbeRole::Site, false) => &[names::SITE_ENTER],
        (ProbeRole::Join, false) => &[names::SITE_JOIN],
        (ProbeRole::JoinReturn, false) => &[names::SITE_JOIN_RET],
        (ProbeRole::Site | ProbeRole::Join, true) => &[names::BARE_ENTER],
        (ProbeRole::JoinReturn, true) => &[names::BARE_EXIT],
        (ProbeRole::ReuseObject, false) => &[names::REUSE_ENTER],
        (ProbeRole::ReuseBlock, false) => &[names::REUSE_EXIT],
        (ProbeRole::ReuseObject, true) => &[names::BARE_ENTER],
        (ProbeRole::ReuseBlock, true) => &[names::BARE_EXIT],
        (ProbeRole::ReuseHolder, false) => &[names::REUSE_HOLDER_EXIT, names::REUSE_HOLDER_ENTER],
        (ProbeRole::ReuseHolder, true) => &[names::BARE_EXIT, names::BARE_ENTER],
    }
}

/// Whether uprobe program `name` runs at the function's return.
fn is_return(name: &str) -> bool {
    UPROBE_PROGRAMS.iter().any(|&(n, ret)| n == name && ret)
}
