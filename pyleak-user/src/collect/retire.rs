//! Exited processes retired: with group targets a service may start and end thousands of
//! workers, and what pyleak keeps of each one (its live blocks in the kernel, its per-stack
//! totals, its pages in the vm model, its growth series, its memory map) would grow
//! without end. Past the last [`EXITED_KEPT`] exited processes, the oldest is retired:
//! what it left live is summed per layer into [`Retired`], and everything else of it is
//! dropped, in the kernel and here. The report says how many were retired and what they
//! left, by layer.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context as _;
use aya::maps::HashMap as BpfHashMap;
use pyleak_common::{names, AllocKey, Layer, LiveAlloc, StackAgg, StackKey};

use super::{table, Recorder};

/// Exited processes whose state is kept whole for the report (group targets); older ones
/// are retired. Each costs pyleak ~0.3 MiB here (a Python worker of `cargo xtask soak`:
/// ~260 growth series, ~500 resident pages, ~250 stacks of the vm model).
pub const EXITED_KEPT: usize = 64;

/// Test-only: `PYLEAK_TEST_EXITED_KEPT=N` keeps N exited processes instead of
/// [`EXITED_KEPT`], so that a test retires some without starting dozens. Not for users.
pub const EXITED_KEPT_ENV: &str = "PYLEAK_TEST_EXITED_KEPT";

/// How many exited processes to keep whole: [`EXITED_KEPT`], or the test-only setting.
pub fn exited_kept() -> usize {
    std::env::var(EXITED_KEPT_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(EXITED_KEPT)
}

/// Exited processes retired so far, and what they left live.
#[derive(Debug, Clone, Default)]
pub struct Retired {
    /// Their pids (a pid traced again, reused by a new process, leaves the set).
    pub pids: HashSet<u32>,
    /// How many were retired.
    pub processes: u64,
    /// What they left live when retired, per layer: (bytes, count: blocks, mappings or
    /// pages).
    /// Sampled pymalloc: the blocks its windows saw, not an estimate.
    pub live: BTreeMap<Layer, (u64, u64)>,
}

impl Recorder {
    /// Retires exited processes `pids` (their last events are read): sums what each left
    /// live into the recorder's [`Retired`] summary, then drops their live blocks (table and overflow
    /// map), per-stack totals and vm model. Processes retired earlier whose totals the
    /// kernel wrote back since (a CPU's pending slot) lose them again.
    pub fn retire(&mut self, pids: &[u32]) -> anyhow::Result<()> {
        if pids.is_empty() {
            return Ok(());
        }
        let gone: HashSet<u32> = pids.iter().copied().collect();
        let mut live: BTreeMap<Layer, (u64, u64)> = BTreeMap::new();
        for ((pid, layer, _), agg) in self.stack_stats()? {
            if gone.contains(&pid) {
                let e = live.entry(layer).or_default();
                e.0 += agg.alloc_bytes.saturating_sub(agg.freed_bytes);
                e.1 += agg.allocs.saturating_sub(agg.frees);
            }
        }
        for (layer, per_stack) in [
            (Layer::Vm, self.model.live_regions()),
            (Layer::Pages, self.model.live_pages()),
        ] {
            for (&(pid, _), &(bytes, n)) in &per_stack {
                if gone.contains(&pid) {
                    let e = live.entry(layer).or_default();
                    e.0 += bytes;
                    e.1 += n;
                }
            }
        }
        for (layer, (bytes, n)) in live {
            let e = self.retired.live.entry(layer).or_default();
            e.0 += bytes;
            e.1 += n;
        }
        self.retired.processes += gone.len() as u64;
        self.retired.pids.extend(&gone);
        let all = self.retired.pids.clone();
        self.drop_kernel_state(&all)?;
        for pid in &gone {
            self.page_table.forget(*pid);
            self.comms.remove(pid);
            self.cgroups.remove(pid);
            self.pythons.remove(pid);
            self.book.forget(*pid);
        }
        self.model.forget(&gone);
        self.targets.retain(|pid| !gone.contains(pid));
        Ok(())
    }

    /// Removes every live block and per-stack total of `pids` from the kernel's maps.
    fn drop_kernel_state(&mut self, pids: &HashSet<u32>) -> anyhow::Result<()> {
        let mut slots: Vec<(usize, u64)> = Vec::new();
        table::for_each_live_slot(
            self.ebpf
                .map(names::LIVE_KEYS)
                .context(concat!("map ", "LIVE_KEYS", " missing"))?,
            self.ebpf
                .map(names::LIVE_VALS)
                .context(concat!("map ", "LIVE_VALS", " missing"))?,
            |key, _, slot, raw| {
                if pids.contains(&key.tgid) {
                    slots.push((slot, raw));
                }
            },
        )?;
        table::clear_slots(
            self.ebpf
                .map(names::LIVE_KEYS)
                .context(concat!("map ", "LIVE_KEYS", " missing"))?,
            &slots,
        )?;
        let mut overflow: BpfHashMap<_, AllocKey, LiveAlloc> =
            BpfHashMap::try_from(self.ebpf.map_mut(names::LIVE_ALLOCS).context(concat!(
                "map ",
                "LIVE_ALLOCS",
                " missing"
            ))?)?;
        let keys: Vec<AllocKey> = overflow
            .keys()
            .map_while(Result::ok)
            .filter(|k| pids.contains(&k.tgid))
            .collect();
        for k in keys {
            let _ = overflow.remove(&k);
        }
        let mut stats: BpfHashMap<_, StackKey, StackAgg> =
            BpfHashMap::try_from(self.ebpf.map_mut(names::STACK_STATS).context(concat!(
                "map ",
                "STACK_STATS",
                " missing"
            ))?)?;
        let keys: Vec<StackKey> = stats
            .keys()
            .map_while(Result::ok)
            .filter(|k| pids.contains(&k.tgid))
            .collect();
        for k in keys {
            let _ = stats.remove(&k);
        }
        Ok(())
    }
}

impl Retired {
    /// The summary the report gives.
    pub fn summary(&self) -> super::RetiredSummary {
        super::RetiredSummary {
            processes: self.processes,
            kept: exited_kept(),
            live: self.live.clone(),
        }
    }
}
