//! The fastest-growing stacks while recording (`pyleak top`, `--snapshots`): a pure
//! function of the growth samples and a way to name a stack's frames.

use std::collections::HashSet;

use pyleak_common::Layer;
use serde::Serialize;

use super::growth::{self, Growth, Timeline, Trend};
use crate::collect::StackSlot;

/// One stack's growth, by (process, layer, frames).
#[derive(Debug, Clone, Serialize)]
pub struct GrowingStack {
    /// Process id.
    pub pid: u32,
    /// Layer name.
    pub layer: &'static str,
    /// Frames, root first.
    pub frames: Vec<String>,
    /// Live bytes at the last sample.
    pub live_bytes: u64,
    /// Recent growth, bytes per second.
    pub growth_bytes_per_s: f64,
    /// The shape of the series.
    pub trend: Trend,
}

/// The `n` stacks whose live bytes grow fastest, by (process, layer, frames). Frames are
/// asked of `frames_of` only for the stacks that grow fastest on their own (a few times
/// more than shown, as stacks with the same frames are summed).
pub fn top_growing(
    timeline: &Timeline<StackSlot>,
    noise: u64,
    n: usize,
    mut frames_of: impl FnMut(u32, u64) -> Vec<String>,
) -> Vec<GrowingStack> {
    let mut candidates: Vec<(StackSlot, f64)> = timeline
        .grouped(|&k| Some(k))
        .into_iter()
        .map(|(k, v)| (k, growth::assess(timeline.times(), &v, noise).bytes_per_s))
        .filter(|&(_, rate)| rate > 0.0)
        .collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    candidates.truncate(n * 8);
    let candidates: HashSet<(u32, Layer, u64)> = candidates.into_iter().map(|(k, _)| k).collect();
    let series = timeline.grouped(|&(pid, layer, id)| {
        candidates
            .contains(&(pid, layer, id))
            .then(|| (pid, layer, frames_of(pid, id)))
    });
    let mut out: Vec<GrowingStack> = series
        .into_iter()
        .filter_map(|((pid, layer, frames), v)| {
            let g: Growth = growth::assess(timeline.times(), &v, noise);
            (g.bytes_per_s > 0.0).then(|| GrowingStack {
                pid,
                layer: layer.name(),
                frames,
                live_bytes: v.last().copied().unwrap_or(0),
                growth_bytes_per_s: g.bytes_per_s,
                trend: g.trend,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        b.growth_bytes_per_s
            .total_cmp(&a.growth_bytes_per_s)
            .then(a.frames.cmp(&b.frames))
    });
    out.truncate(n);
    out
}
