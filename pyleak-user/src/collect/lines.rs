//! When the kernel may take a code object's first line from its per-CPU cache instead of
//! reading it per frame (`PyProc::line_cache`): only for a process whose runtime file has
//! its `code_dealloc` probe in place for it (pid-scoped) or for every process mapping the
//! file (file-wide). That probe bumps the kernel's code epoch before a code object is
//! freed, which is what keeps a cached line true; without it the cache could name a code
//! object that was freed and replaced at the same address.

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use aya::maps::HashMap as BpfHashMap;
use pyleak_common::{names, PyProc, PY_EPOCH_USER};

use super::Recorder;
use crate::attach::{plan::file_key, ProbeRole, ProbeSpec};

/// A file's (device, inode).
pub type FileKey = (u64, u64);

/// Which runtime files have their `code_dealloc` probe in place, and for which processes.
#[derive(Default)]
pub struct CodeWatch {
    /// (process, file) for a pid-scoped probe; (None, file) for a file-wide one.
    watched: HashSet<(Option<u32>, FileKey)>,
    /// The runtime file of each process the kernel was given a layout for.
    runtime_of: HashMap<u32, FileKey>,
}

impl CodeWatch {
    /// Whether `pid`'s runtime file `key` has its `code_dealloc` probed for it.
    pub fn covers(&self, pid: u32, key: Option<FileKey>) -> bool {
        key.is_some_and(|k| {
            self.watched.contains(&(None, k)) || self.watched.contains(&(Some(pid), k))
        })
    }
}

impl Recorder {
    /// Tells the kernel how to walk the Python frames of `pid`, whose runtime is in the
    /// file `runtime` (device, inode; `None` if unknown): the first-line cache is allowed
    /// only when that file's `code_dealloc` is probed for `pid`.
    pub fn set_python(
        &mut self,
        pid: u32,
        layout: &PyProc,
        runtime: Option<FileKey>,
    ) -> anyhow::Result<()> {
        let mut layout = *layout;
        layout.line_cache = u32::from(self.code_watch.covers(pid, runtime));
        match runtime {
            Some(k) => self.code_watch.runtime_of.insert(pid, k),
            None => self.code_watch.runtime_of.remove(&pid),
        };
        let mut procs: BpfHashMap<_, u32, PyProc> = BpfHashMap::try_from(
            self.ebpf
                .map_mut(names::PY_PROCS)
                .context(concat!("map ", "PY_PROCS", " missing"))?,
        )?;
        procs.insert(pid, layout, 0)?;
        self.py_procs_changed()
    }

    /// Counts a change userspace made to the kernel's `PY_PROCS` (`PY_EPOCH_USER`), so no
    /// CPU walks with its copy of the layout from before.
    pub(super) fn py_procs_changed(&mut self) -> anyhow::Result<()> {
        let mut epoch: aya::maps::Array<_, u64> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut(names::PY_EPOCH)
                .context(concat!("map ", "PY_EPOCH", " missing"))?,
        )?;
        let n = epoch.get(&PY_EPOCH_USER, 0)?;
        epoch.set(PY_EPOCH_USER, n.wrapping_add(1), 0)?;
        Ok(())
    }

    /// Stores the layout template `index` the kernel applies to processes of a group
    /// that start the runtime in file `runtime` later: with the first-line cache when
    /// that file's `code_dealloc` is probed file-wide.
    pub fn set_template(
        &mut self,
        index: u32,
        layout: &PyProc,
        runtime: Option<FileKey>,
    ) -> anyhow::Result<()> {
        let mut layout = *layout;
        layout.line_cache =
            u32::from(runtime.is_some_and(|k| self.code_watch.watched.contains(&(None, k))));
        let mut t: aya::maps::Array<_, PyProc> = aya::maps::Array::try_from(
            self.ebpf.map_mut(names::PY_TEMPLATES).context(concat!(
                "map ",
                "PY_TEMPLATES",
                " missing"
            ))?,
        )?;
        t.set(index, layout, 0)?;
        Ok(())
    }

    /// `probes` are in place for process `pid` (or every process, `None`): notes their
    /// `code_dealloc` probes and allows the cache for the processes they now cover.
    pub(super) fn note_code_watch(&mut self, probes: &[ProbeSpec], pid: Option<u32>) {
        let mut new = Vec::new();
        for p in probes.iter().filter(|p| p.role == ProbeRole::CodeDealloc) {
            if let Some(k) = file_key(&p.path) {
                if self.code_watch.watched.insert((pid, k)) {
                    new.push(k);
                }
            }
        }
        if new.is_empty() {
            return;
        }
        let covered: Vec<u32> = self
            .code_watch
            .runtime_of
            .iter()
            .filter(|(p, k)| new.contains(k) && pid.is_none_or(|pid| pid == **p))
            .map(|(p, _)| *p)
            .collect();
        let Some(map) = self.ebpf.map_mut(names::PY_PROCS) else {
            return;
        };
        let Ok(mut procs) = BpfHashMap::<_, u32, PyProc>::try_from(map) else {
            return;
        };
        for pid in covered {
            // Only the flag changes; the kernel fills nothing else in a layout once the
            // process runs its interpreter (`py_init_enter` fires once, at its start, and
            // a launched command is still stopped when its probes go in).
            if let Ok(mut layout) = procs.get(&pid, 0) {
                layout.line_cache = 1;
                let _ = procs.insert(pid, layout, 0);
            }
        }
        // A CPU's older copy only reads first lines the slow way until then.
        let _ = self.py_procs_changed();
    }

    /// `pid` is a new process (a fork: a pid may be used again): nothing probed for an
    /// earlier process of that number covers it.
    pub fn forget_code_watch(&mut self, pid: u32) {
        self.code_watch.watched.retain(|(p, _)| *p != Some(pid));
        self.code_watch.runtime_of.remove(&pid);
    }
}
