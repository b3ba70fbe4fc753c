//! Reading the kernel's maps: counters now (status line, growth samples) and everything at
//! the end (the [`Snapshot`]).

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, PerCpuArray};
use pyleak_common::{
    names, AllocKey, Drop, Layer, LayerStats, LiveAlloc, StackAgg, StackAggSlot, StackKey,
    StackTrace, CALL_LAYERS, FLAG_FOR_PYMALLOC, FLAG_FOR_PYMEM_RAW, HIST_BUCKETS, NUM_DROPS,
    NUM_LAYERS,
};

use super::{monotonic_ns, table, vm, Ages, Recorder, Snapshot, StackSlot, PYMALLOC_SMALL_REQUEST};

/// (blocks, requested bytes) per (process, stack, key): see `Recorder::live_blocks_by`.
pub type BlocksBy<K> = HashMap<(u32, u64, K), (u64, u64)>;

/// The error of a map missing from the object.
fn missing(name: &str) -> String {
    format!("map {name} missing")
}

impl Recorder {
    /// Per-layer counters right now (for the status line).
    pub fn layer_stats(&self) -> anyhow::Result<[LayerStats; NUM_LAYERS]> {
        let stats: PerCpuArray<_, LayerStats> = PerCpuArray::try_from(
            self.ebpf
                .map(names::LAYER_STATS)
                .context(missing(names::LAYER_STATS))?,
        )?;
        let mut out = [LayerStats::default(); NUM_LAYERS];
        for (i, slot) in out.iter_mut().enumerate() {
            for cpu in stats.get(&(i as u32), 0)?.iter() {
                slot.allocs += cpu.allocs;
                slot.alloc_bytes += cpu.alloc_bytes;
                slot.frees += cpu.frees;
                slot.freed_bytes += cpu.freed_bytes;
                slot.unmatched_frees += cpu.unmatched_frees;
                slot.failed_allocs += cpu.failed_allocs;
                slot.reused += cpu.reused;
            }
        }
        Ok(out)
    }

    /// Live bytes per (pid, layer, stack) right now, every layer: one sample for growth.
    /// `None` once every target is frozen: its memory no longer moves, and flat samples
    /// after the end would read as a leak that stopped.
    /// Call right after [`Recorder::drain`], so the vm model is current.
    pub fn sample(&mut self) -> anyhow::Result<Option<HashMap<StackSlot, u64>>> {
        if !self.targets.is_empty() && self.targets.iter().all(|&p| self.is_frozen(p)) {
            return Ok(None);
        }
        let mut out = HashMap::new();
        for (key, agg) in self.stack_stats()? {
            let live = agg.alloc_bytes.saturating_sub(agg.freed_bytes);
            if live > 0 {
                out.insert(key, live);
            }
        }
        for (&key, agg) in &self.model.stacks {
            let live = agg.alloc_bytes.saturating_sub(agg.freed_bytes);
            if live > 0 {
                out.insert(key, live);
            }
        }
        self.sampled_live(&mut out);
        Ok(Some(out))
    }

    /// Per (pid, layer, stack) totals of the uprobe layers, summed over CPUs.
    pub(super) fn stack_stats(&self) -> anyhow::Result<HashMap<(u32, Layer, u64), StackAgg>> {
        let stats: BpfHashMap<_, StackKey, StackAgg> = BpfHashMap::try_from(
            self.ebpf
                .map(names::STACK_STATS)
                .context(missing(names::STACK_STATS))?,
        )?;
        let mut stacks: HashMap<(u32, Layer, u64), StackAgg> = HashMap::new();
        for entry in stats.iter() {
            let (key, value) = entry?;
            let Some(layer) = Layer::from_u32(key.layer) else {
                continue;
            };
            if self.retired.pids.contains(&key.tgid) {
                continue;
            }
            stacks
                .entry((key.tgid, layer, key.stack_id))
                .or_default()
                .add(&value);
        }
        // What each CPU's write-back slot holds has not reached the map yet.
        let slots: PerCpuArray<_, StackAggSlot> = PerCpuArray::try_from(
            self.ebpf
                .map(names::STACK_AGG_SLOT)
                .context(missing(names::STACK_AGG_SLOT))?,
        )?;
        for slot in slots.get(&0, 0)?.iter() {
            let Some(layer) = Layer::from_u32(slot.key.layer) else {
                continue;
            };
            if slot.key.stack_id == 0 || self.retired.pids.contains(&slot.key.tgid) {
                continue;
            }
            stacks
                .entry((slot.key.tgid, layer, slot.key.stack_id))
                .or_default()
                .add(&slot.agg);
        }
        Ok(stacks)
    }

    /// A per-layer histogram map of the uprobe layers: `[layer][bucket]` counts over CPUs.
    fn histograms(&self, name: &str) -> anyhow::Result<Vec<Vec<u64>>> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(name)
                .with_context(|| format!("map {name} missing"))?,
        )?;
        let mut out = vec![vec![0u64; HIST_BUCKETS]; NUM_LAYERS];
        for (layer, buckets) in out.iter_mut().enumerate().take(CALL_LAYERS) {
            for (b, slot) in buckets.iter_mut().enumerate() {
                let idx = (layer * HIST_BUCKETS + b) as u32;
                *slot = map.get(&idx, 0)?.iter().sum();
            }
        }
        Ok(out)
    }

    /// The moment a process's state was last counted: when it froze, else now.
    fn end_ns(&self, pid: u32, now: u64) -> u64 {
        self.model
            .procs
            .get(&pid)
            .and_then(|p| p.frozen_ns)
            .unwrap_or(now)
    }

    /// Calls `f` with every live block the kernel tracks: the live-block table's, then
    /// the overflow map's.
    fn for_each_live_block(&self, f: &mut impl FnMut(AllocKey, LiveAlloc)) -> anyhow::Result<()> {
        // A retired process's blocks are cleared when it is retired; one claimed by a
        // probe in flight then is skipped here.
        let retired = &self.retired.pids;
        let f = &mut |k: AllocKey, b: LiveAlloc| {
            if !retired.contains(&k.tgid) {
                f(k, b)
            }
        };
        table::for_each_live(
            self.ebpf
                .map(names::LIVE_KEYS)
                .context(missing(names::LIVE_KEYS))?,
            self.ebpf
                .map(names::LIVE_VALS)
                .context(missing(names::LIVE_VALS))?,
            &mut *f,
        )?;
        let overflow: BpfHashMap<_, AllocKey, LiveAlloc> = BpfHashMap::try_from(
            self.ebpf
                .map(names::LIVE_ALLOCS)
                .context(missing(names::LIVE_ALLOCS))?,
        )?;
        for entry in overflow.iter() {
            let Ok((key, block)) = entry else { break };
            f(key, block);
        }
        Ok(())
    }

    /// Live blocks of `layer` that `key` knows by (process, address), counted and summed
    /// (requested bytes) per (process, stack, key). Read when the targets are frozen.
    pub fn live_blocks_by<K: std::hash::Hash + Eq>(
        &self,
        layer: Layer,
        mut key: impl FnMut(u32, u64) -> Option<K>,
    ) -> anyhow::Result<BlocksBy<K>> {
        let mut out: BlocksBy<K> = HashMap::new();
        let mut add = |k: AllocKey, block: LiveAlloc| {
            if Layer::from_u32(k.layer) != Some(layer) {
                return;
            }
            if let Some(h) = key(k.tgid, k.addr) {
                let e = out.entry((k.tgid, block.stack_id, h)).or_default();
                e.0 += 1;
                e.1 += block.size;
            }
        };
        self.for_each_live_block(&mut add)?;
        Ok(out)
    }

    /// Reads everything the kernel gathered; blocks younger than `min_age_ns` at the end
    /// are live but not aged.
    pub fn snapshot(&mut self, min_age_ns: u64) -> anyhow::Result<Snapshot> {
        self.drain();
        self.settle_bulk_pages();
        let now = monotonic_ns();
        let layer_stats = self.layer_stats()?;
        let size_hist = self.histograms(names::SIZE_HIST)?;
        let lifetime_hist = self.histograms(names::LIFETIME_HIST)?;
        let mut ages: HashMap<(u32, Layer, u64), Ages> = HashMap::new();
        let (mut pymalloc_small_live, mut libc_for_python_live) = (0, 0);
        let mut ends: HashMap<u32, u64> = HashMap::new();
        // Blocks that sit in memory their allocator mapped itself: malloc's, and pymalloc's
        // small ones (in its arenas). A PyMem_Raw block or a big pymalloc request is the
        // malloc block under it, counted once as malloc's.
        let mut held: Vec<(u32, u64, u64)> = Vec::new();
        let mut add = |key: AllocKey, block: LiveAlloc| {
            let Some(layer) = Layer::from_u32(key.layer) else {
                return;
            };
            if layer == Layer::Libc
                || (layer == Layer::Pymalloc && block.size <= PYMALLOC_SMALL_REQUEST)
            {
                held.push((key.tgid, key.addr, block.size));
            }
            let end = *ends
                .entry(key.tgid)
                .or_insert_with(|| self.end_ns(key.tgid, now));
            ages.entry((key.tgid, layer, block.stack_id))
                .or_default()
                .add(block.size, end.saturating_sub(block.ts_ns), min_age_ns);
            match layer {
                Layer::Pymalloc if block.size <= PYMALLOC_SMALL_REQUEST => {
                    pymalloc_small_live += block.size
                }
                Layer::Libc if block.flags & (FLAG_FOR_PYMALLOC | FLAG_FOR_PYMEM_RAW) != 0 => {
                    libc_for_python_live += block.size
                }
                _ => {}
            }
        };
        // Every target is frozen by now, so nothing is removed under the walks.
        self.for_each_live_block(&mut add)?;
        // Without the pymalloc layer, its arenas are the only trace of Python objects:
        // they can be vm suspects, at the Python stacks that made them.
        let arenas_judged = !self.opts.layers.contains(Layer::Pymalloc);
        for (&pid, p) in &self.model.procs {
            let end = self.end_ns(pid, now);
            for (&start, r) in &p.regions {
                // Only memory no probed allocator accounts for can be a vm or pages
                // suspect: a library's mapping holds no leak, and what malloc or pymalloc
                // mapped (and keep after the blocks in it are freed) is their layers'
                // business, where a leak shows as live blocks.
                let arena = r.kind() == vm::MappingKind::PymallocArena && arenas_judged;
                if r.kind() != vm::MappingKind::Anonymous && !arena {
                    continue;
                }
                ages.entry((pid, Layer::Vm, r.stack_id)).or_default().add(
                    r.end - start,
                    end.saturating_sub(r.ts_ns),
                    min_age_ns,
                );
            }
            for (&addr, page) in &p.pages {
                if p.region_at(addr)
                    .is_none_or(|r| r.kind() != vm::MappingKind::Anonymous)
                {
                    continue;
                }
                ages.entry((pid, Layer::Pages, page.stack_id))
                    .or_default()
                    .add(vm::PAGE, end.saturating_sub(page.ts_ns), min_age_ns);
            }
        }
        let used_on_pages = used_on_pages(&self.model, &held);
        let mut stacks = self.stack_stats()?;
        for (&key, agg) in &self.model.stacks {
            stacks.insert(key, *agg);
        }
        let drops_map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(names::DROPS).context(missing(names::DROPS))?)?;
        let mut drops = BTreeMap::new();
        for (i, reason) in Drop::ALL.iter().enumerate().take(NUM_DROPS) {
            let n: u64 = drops_map.get(&(i as u32), 0)?.iter().sum();
            drops.insert(reason.name(), n);
        }
        let mut snap = Snapshot {
            traced: self.opts.layers,
            layer_stats,
            size_hist,
            stacks,
            drops,
            lifetime_hist,
            ages,
            pymalloc_small_live,
            libc_for_python_live,
            used_on_pages,
            sampled: None,
            retired: self.retired.summary(),
        };
        self.apply_estimates(&mut snap);
        Ok(snap)
    }

    /// How many events the kernel has lost to `reason` so far, on every CPU (0 when the
    /// counters cannot be read).
    pub fn drop_count(&self, reason: Drop) -> u64 {
        let Some(map) = self.ebpf.map(names::DROPS) else {
            return 0;
        };
        let Ok(drops) = PerCpuArray::<_, u64>::try_from(map) else {
            return 0;
        };
        drops
            .get(&(reason as u32), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Reads an interned stack.
    pub fn stack(&self, id: u64) -> Option<StackTrace> {
        let stacks: BpfHashMap<_, u64, StackTrace> =
            BpfHashMap::try_from(self.ebpf.map(names::STACKS)?).ok()?;
        stacks.get(&id, 0).ok()
    }
}

/// Bytes of the live blocks `held` (pid, address, size) that lie on each page the vm model
/// counts resident, by (pid, page address): what of a resident page an allocator's live
/// blocks account for.
pub fn used_on_pages(model: &vm::VmModel, held: &[(u32, u64, u64)]) -> HashMap<(u32, u64), u64> {
    let mut out: HashMap<(u32, u64), u64> = HashMap::new();
    for &(pid, addr, size) in held {
        let Some(p) = model.procs.get(&pid) else {
            continue;
        };
        let end = addr.saturating_add(size);
        let first = addr & !(vm::PAGE - 1);
        for (&page, _) in p.pages.range(first..end) {
            let used = end.min(page + vm::PAGE) - addr.max(page);
            *out.entry((pid, page)).or_default() += used;
        }
    }
    out
}
