//! Peaks: per layer, the growth sample at which the most was live, what the other layers
//! held then and the stacks that held the most of it (memray's high-water mark, at the
//! growth samples' resolution).

use std::collections::{BTreeMap, HashMap};

use pyleak_common::Layer;

use super::{Facts, Peak, PeakStack};
use crate::collect::StackSlot;

/// Stacks (by id) kept per layer's peak, before those with the same frames merge.
const STACKS_KEPT: usize = 32;
/// Stacks listed per peak.
const STACKS_SHOWN: usize = 5;

/// The sample at which one layer's live bytes were highest.
#[derive(Debug, Clone, Default)]
pub struct PeakSample {
    /// Seconds into the recording.
    pub t_s: f64,
    /// The layer's live bytes then.
    pub bytes: u64,
    /// Every layer's live bytes then.
    pub layers: BTreeMap<Layer, u64>,
    /// The layer's biggest (pid, stack id, live bytes) then, most first.
    pub stacks: Vec<(u32, u64, u64)>,
}

/// The highest sample so far of each layer, updated with every growth sample.
#[derive(Debug, Clone, Default)]
pub struct Peaks {
    /// By layer.
    pub by_layer: BTreeMap<Layer, PeakSample>,
}

impl Peaks {
    /// Leaves the stacks of processes `gone` (retired) out of every peak's list; the
    /// peaks' totals keep them.
    pub fn forget(&mut self, gone: &std::collections::HashSet<u32>) {
        for p in self.by_layer.values_mut() {
            p.stacks.retain(|(pid, _, _)| !gone.contains(pid));
        }
    }

    /// Takes one growth sample (live bytes per (pid, layer, stack), `t_s` seconds in).
    pub fn record(&mut self, t_s: f64, live: &HashMap<StackSlot, u64>) {
        let mut layers: BTreeMap<Layer, u64> = BTreeMap::new();
        for (&(_, layer, _), &bytes) in live {
            *layers.entry(layer).or_default() += bytes;
        }
        for (&layer, &bytes) in &layers {
            let best = self.by_layer.get(&layer).map_or(0, |p| p.bytes);
            if bytes <= best {
                continue;
            }
            let mut stacks: Vec<(u32, u64, u64)> = live
                .iter()
                .filter(|(&(_, l, _), _)| l == layer)
                .map(|(&(pid, _, id), &b)| (pid, id, b))
                .collect();
            stacks.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
            stacks.truncate(STACKS_KEPT);
            self.by_layer.insert(
                layer,
                PeakSample {
                    t_s,
                    bytes,
                    layers: layers.clone(),
                    stacks,
                },
            );
        }
    }

    /// Every (pid, stack id) a peak names, to have their frames read.
    pub fn stack_keys(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.by_layer
            .values()
            .flat_map(|p| p.stacks.iter().map(|&(pid, id, _)| (pid, id)))
    }
}

/// The peaks as reported: one per layer in layer order, its stacks merged by frames and
/// most bytes first.
pub fn peaks(facts: &Facts) -> Vec<Peak> {
    facts
        .peaks
        .by_layer
        .iter()
        .map(|(&layer, p)| {
            let mut merged: HashMap<(u32, Vec<String>), (usize, u64)> = HashMap::new();
            for &(pid, id, bytes) in &p.stacks {
                let f = facts.frames_of(pid, id);
                merged.entry((pid, f.names)).or_insert((f.native, 0)).1 += bytes;
            }
            let mut stacks: Vec<PeakStack> = merged
                .into_iter()
                .map(|((pid, frames), (native_frames, live_bytes))| PeakStack {
                    pid,
                    frames,
                    native_frames,
                    live_bytes,
                })
                .collect();
            stacks.sort_by(|a, b| {
                b.live_bytes
                    .cmp(&a.live_bytes)
                    .then(a.pid.cmp(&b.pid))
                    .then(a.frames.cmp(&b.frames))
            });
            stacks.truncate(STACKS_SHOWN);
            Peak {
                layer: layer.name().to_owned(),
                t_s: p.t_s,
                live_bytes: p.bytes,
                layers_then: p
                    .layers
                    .iter()
                    .map(|(l, &b)| (l.name().to_owned(), b))
                    .collect(),
                stacks,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_keeps_its_highest_sample_and_its_stacks_then() {
        let mut p = Peaks::default();
        let sample = |a: u64, b: u64, pages: u64| {
            HashMap::from([
                ((1, Layer::Libc, 10), a),
                ((1, Layer::Libc, 11), b),
                ((1, Layer::Pages, 10), pages),
            ])
        };
        p.record(0.5, &sample(10, 5, 100));
        p.record(1.0, &sample(300, 20, 50));
        p.record(1.5, &sample(1, 1, 70));
        let libc = &p.by_layer[&Layer::Libc];
        assert_eq!((libc.t_s, libc.bytes), (1.0, 320));
        assert_eq!(libc.stacks, [(1, 10, 300), (1, 11, 20)]);
        assert_eq!(libc.layers[&Layer::Pages], 50);
        let pages = &p.by_layer[&Layer::Pages];
        assert_eq!((pages.t_s, pages.bytes), (0.5, 100));
    }
}
