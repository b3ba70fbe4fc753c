//! Growth over time: live bytes per key sampled every interval, kept in a bounded timeline,
//! and judged as a leak (keeps rising), a cache (rose, then levelled off) or neither.

use std::{collections::HashMap, hash::Hash};

use serde::{Deserialize, Serialize};

/// Samples kept per key; when full, every other one is dropped (the interval doubles), so
/// a run of days costs the same memory as a run of minutes.
pub const MAX_SAMPLES: usize = 128;

/// Live bytes per key at a series of moments, all keys on one timeline.
#[derive(Debug)]
pub struct Timeline<K> {
    /// Seconds since the start, one per sample.
    times: Vec<f64>,
    /// Per key, live bytes at each sample (0 before the key was first seen).
    series: HashMap<K, Vec<u64>>,
}

impl<K> Default for Timeline<K> {
    fn default() -> Self {
        Timeline {
            times: Vec::new(),
            series: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> Timeline<K> {
    /// Adds one sample taken `t` seconds into the recording.
    pub fn record(&mut self, t: f64, live: impl IntoIterator<Item = (K, u64)>) {
        if self.times.len() == MAX_SAMPLES {
            self.halve();
        }
        let n = self.times.len();
        self.times.push(t);
        for v in self.series.values_mut() {
            v.push(0);
        }
        for (k, bytes) in live {
            let v = self.series.entry(k).or_insert_with(|| vec![0; n + 1]);
            v[n] += bytes;
        }
        // Keys that are empty in every kept sample carry no information.
        self.series.retain(|_, v| v.iter().any(|&b| b > 0));
    }

    fn halve(&mut self) {
        let keep = |i: usize| i % 2 == 1 || i == 0;
        self.times = std::mem::take(&mut self.times)
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| keep(i))
            .map(|(_, t)| t)
            .collect();
        for v in self.series.values_mut() {
            *v = std::mem::take(v)
                .into_iter()
                .enumerate()
                .filter(|&(i, _)| keep(i))
                .map(|(_, b)| b)
                .collect();
        }
    }

    /// Samples taken (at most [`MAX_SAMPLES`]).
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Keys with a series.
    pub fn keys(&self) -> usize {
        self.series.len()
    }

    /// Drops the series of the keys `gone` says (a retired process's).
    pub fn forget(&mut self, mut gone: impl FnMut(&K) -> bool) {
        self.series.retain(|k, _| !gone(k));
    }

    /// Sums the series of keys that map to the same group (stacks with the same frames).
    pub fn grouped<G: Eq + Hash>(
        &self,
        mut group: impl FnMut(&K) -> Option<G>,
    ) -> HashMap<G, Vec<u64>> {
        let mut out: HashMap<G, Vec<u64>> = HashMap::new();
        for (k, v) in &self.series {
            let Some(g) = group(k) else { continue };
            let sum = out.entry(g).or_insert_with(|| vec![0; v.len()]);
            for (s, b) in sum.iter_mut().zip(v) {
                *s += b;
            }
        }
        out
    }

    /// The sample times.
    pub fn times(&self) -> &[f64] {
        &self.times
    }
}

/// How a series of live bytes moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trend {
    /// Still rising in the recent half of the recording, most steps up: a leak's shape.
    Growing,
    /// Rose earlier, flat (or falling) in the recent half: a cache filling up.
    Plateau,
    /// Neither rising nor falling much.
    Flat,
    /// Falling.
    Shrinking,
    /// Too few samples to say.
    Unknown,
}

/// The verdict on one series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Growth {
    /// Least-squares slope over the recent half of the samples, bytes per second.
    pub bytes_per_s: f64,
    /// Slope over the whole recording, bytes per second.
    pub overall_bytes_per_s: f64,
    /// Share of the recent half's steps that went up (1.0: every interval).
    pub steadiness: f64,
    /// The shape.
    pub trend: Trend,
}

/// Samples needed before a trend is named.
pub const MIN_SAMPLES: usize = 4;

/// Judges one series sampled at `times`. `noise` is the byte change below which a slope
/// counts as flat (over the recent window).
pub fn assess(times: &[f64], bytes: &[u64], noise: u64) -> Growth {
    let n = times.len().min(bytes.len());
    if n < MIN_SAMPLES {
        return Growth {
            bytes_per_s: 0.0,
            overall_bytes_per_s: 0.0,
            steadiness: 0.0,
            trend: Trend::Unknown,
        };
    }
    let (times, bytes) = (&times[..n], &bytes[..n]);
    let half = n / 2;
    let overall = slope(times, bytes);
    let recent = slope(&times[half..], &bytes[half..]);
    let steps = &bytes[half..];
    let ups = steps.windows(2).filter(|w| w[1] > w[0]).count();
    let steadiness = ups as f64 / (steps.len() - 1).max(1) as f64;
    let span = times[n - 1] - times[half];
    let recent_change = recent * span;
    let quarter = n - n / 4 - 1;
    let last_quarter_change = bytes[n - 1] as f64 - bytes[quarter] as f64;
    let total_change = bytes[n - 1] as f64 - bytes[0] as f64;
    let noise = noise as f64;
    let trend = if recent_change > noise && steadiness >= 0.5 {
        Trend::Growing
    } else if recent_change < -noise {
        Trend::Shrinking
    } else if total_change > noise && last_quarter_change <= noise {
        // Rose (perhaps in a burst), then levelled off.
        Trend::Plateau
    } else {
        Trend::Flat
    };
    Growth {
        bytes_per_s: recent,
        overall_bytes_per_s: overall,
        steadiness,
        trend,
    }
}

/// Least-squares slope of `ys` over `xs`.
fn slope(xs: &[f64], ys: &[u64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return 0.0;
    }
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().map(|&y| y as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (&x, &y) in xs.iter().zip(ys) {
        num += (x - mx) * (y as f64 - my);
        den += (x - mx) * (x - mx);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_key_loses_its_series_and_the_others_keep_theirs() {
        let mut t: Timeline<(u32, u64)> = Timeline::default();
        for i in 0..3 {
            t.record(i as f64, [((1, 7), 100 * (i + 1)), ((2, 7), 50)]);
        }
        t.forget(|&(pid, _)| pid == 1);
        assert_eq!(t.keys(), 1);
        assert_eq!(t.len(), 3);
        let g = t.grouped(|&(pid, id)| Some((pid, id)));
        assert_eq!(g[&(2, 7)], vec![50, 50, 50]);
        assert!(!g.contains_key(&(1, 7)));
    }

    fn times(n: usize) -> Vec<f64> {
        (0..n).map(|i| i as f64).collect()
    }

    #[test]
    fn a_steady_leak_is_growing_at_its_rate() {
        let bytes: Vec<u64> = (0..20).map(|i| 1000 + i * 4096).collect();
        let g = assess(&times(20), &bytes, 1024);
        assert_eq!(g.trend, Trend::Growing);
        assert!((g.bytes_per_s - 4096.0).abs() < 1e-6, "{g:?}");
        assert!((g.overall_bytes_per_s - 4096.0).abs() < 1e-6, "{g:?}");
        assert_eq!(g.steadiness, 1.0);
    }

    #[test]
    fn a_cache_that_filled_is_a_plateau() {
        let bytes: Vec<u64> = (0..20).map(|i| (i.min(6) * 100_000) as u64).collect();
        let g = assess(&times(20), &bytes, 1024);
        assert_eq!(g.trend, Trend::Plateau, "{g:?}");
        assert_eq!(g.bytes_per_s, 0.0);
        assert!(g.overall_bytes_per_s > 0.0);
    }

    #[test]
    fn a_cache_filled_in_a_burst_late_is_a_plateau_not_growth() {
        // Nothing for 12 samples, a burst over 3, then flat: rose in the recent half, but
        // in few of its steps.
        let bytes: Vec<u64> = (0..30)
            .map(|i: u64| i.saturating_sub(12).min(3) * 300_000)
            .collect();
        let g = assess(&times(30), &bytes, 1024);
        assert_eq!(g.trend, Trend::Plateau, "{g:?}");
    }

    #[test]
    fn churn_around_a_level_is_flat() {
        let bytes: Vec<u64> = (0..20).map(|i| 50_000 + (i % 3) * 300).collect();
        let g = assess(&times(20), &bytes, 4096);
        assert_eq!(g.trend, Trend::Flat, "{g:?}");
    }

    #[test]
    fn freeing_is_shrinking_and_few_samples_are_unknown() {
        let bytes: Vec<u64> = (0..10).map(|i| 1_000_000 - i * 50_000).collect();
        assert_eq!(assess(&times(10), &bytes, 1024).trend, Trend::Shrinking);
        assert_eq!(assess(&times(3), &[1, 2, 3], 0).trend, Trend::Unknown);
    }

    #[test]
    fn the_timeline_stays_bounded_and_keeps_the_slope() {
        let mut tl: Timeline<u32> = Timeline::default();
        for i in 0..1000u64 {
            tl.record(i as f64, [(1, i * 10), (2, 5)]);
        }
        assert!(tl.len() <= MAX_SAMPLES);
        let g = tl.grouped(|&k| Some(k));
        let leak = assess(tl.times(), &g[&1], 0);
        assert!((leak.bytes_per_s - 10.0).abs() < 1e-6, "{leak:?}");
        assert_eq!(assess(tl.times(), &g[&2], 0).trend, Trend::Flat);
        // The first sample is kept across halvings.
        assert_eq!(tl.times()[0], 0.0);
    }

    #[test]
    fn keys_seen_late_start_from_zero_and_groups_sum() {
        let mut tl: Timeline<u32> = Timeline::default();
        tl.record(0.0, [(1, 10)]);
        tl.record(1.0, [(1, 10), (2, 7)]);
        let g = tl.grouped(|_| Some(()));
        assert_eq!(g[&()], vec![10, 17]);
        let per = tl.grouped(|&k| Some(k));
        assert_eq!(per[&2], vec![0, 7]);
    }
}
