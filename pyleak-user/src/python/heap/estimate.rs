//! Live bytes per Python stack from the surviving samples of the sampled pymalloc mode.
//!
//! Two sampling designs, each with a Horvitz–Thompson estimate (each live sample's size
//! weighted by one over its inclusion probability: unbiased whatever the sizes) and the
//! standard error that fits it:
//! - [`Design::Windows`]: every block allocated while a window is open is sampled; an
//!   allocation lands in a window with the duty cycle's probability (window length over
//!   period, see [`window_inclusion`]). Blocks of one window are sampled together, and the
//!   number of windows is fixed, not random: the windows are treated as a simple random
//!   sample of the time slices of their length, so the variance is that of the per-window
//!   totals (windows where a stack has no live sample count as zeros):
//!   `n (1 - p) s² / p²`, with `n` windows and `s²` the variance of the totals.
//! - [`Design::Bytes`]: each block sampled on its own with `p = 1 - exp(-size / mean)`, as
//!   jemalloc's and Go's heap profiles do (see [`byte_inclusion`]); variance
//!   `Σ (1 - p) / p² · size²`.

use std::collections::HashMap;
use std::hash::Hash;

/// A sample still live, as the estimator needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveSample<K> {
    /// What it is counted under (a Python stack).
    pub stack: K,
    /// Its requested size.
    pub size: u64,
    /// The window it was sampled in (ignored by [`Design::Bytes`]).
    pub window: u64,
}

/// How the samples were drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Design {
    /// Windows of equal length: `opened` windows so far, each allocation sampled with
    /// probability `duty` (0 < duty ≤ 1).
    Windows {
        /// Windows opened (including those in which nothing was sampled).
        opened: u64,
        /// The duty cycle, see [`window_inclusion`].
        duty: f64,
    },
    /// One sample every `mean` allocated bytes on average, see [`byte_inclusion`].
    Bytes {
        /// The mean sampling interval in bytes.
        mean: f64,
    },
}

/// One stack's estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StackEstimate {
    /// Estimated live bytes.
    pub live_bytes_estimate: f64,
    /// Standard error of that estimate.
    pub live_bytes_stderr: f64,
    /// Estimated live blocks: each live sample counted with the same weight as its bytes
    /// (one over its inclusion probability), so count and bytes agree on the stack's
    /// sampling odds.
    pub live_count_estimate: f64,
    /// Live samples it rests on.
    pub samples: u64,
}

/// The inclusion probability of windows `window_s` long opened every `period_s`: the
/// duty cycle (an allocation's time is independent of the windows' phase).
pub fn window_inclusion(window_s: f64, period_s: f64) -> f64 {
    if period_s <= 0.0 {
        return 1.0;
    }
    (window_s / period_s).clamp(0.0, 1.0)
}

/// The inclusion probability of a block of `size` bytes when one is sampled every `mean`
/// bytes on average (a Poisson process over allocated bytes, as in Go's and jemalloc's
/// heap profiles).
pub fn byte_inclusion(size: u64, mean: f64) -> f64 {
    if mean <= 0.0 {
        return 1.0;
    }
    1.0 - (-(size as f64) / mean).exp()
}

/// Live bytes per stack, with standard errors, from the live samples drawn by `design`.
/// A design that cannot have drawn them (a duty cycle outside (0, 1], no windows) gives
/// nothing.
pub fn estimate<K: Hash + Eq + Clone>(
    live: impl IntoIterator<Item = LiveSample<K>>,
    design: Design,
) -> HashMap<K, StackEstimate> {
    let mut out: HashMap<K, StackEstimate> = HashMap::new();
    match design {
        Design::Windows { opened, duty } => {
            if !(duty > 0.0 && duty <= 1.0) || opened == 0 {
                return out;
            }
            // Per stack, per window: live bytes.
            let mut windows: HashMap<K, HashMap<u64, f64>> = HashMap::new();
            for s in live {
                let e = out.entry(s.stack.clone()).or_default();
                e.live_bytes_estimate += s.size as f64 / duty;
                e.live_count_estimate += 1.0 / duty;
                e.samples += 1;
                *windows
                    .entry(s.stack)
                    .or_default()
                    .entry(s.window)
                    .or_default() += s.size as f64;
            }
            let n = opened as f64;
            for (stack, e) in out.iter_mut() {
                let totals = &windows[stack];
                let sum: f64 = totals.values().sum();
                let sum_sq: f64 = totals.values().map(|t| t * t).sum();
                // Sample variance of the n window totals, zeros included.
                let s2 = if opened > 1 {
                    ((sum_sq - sum * sum / n) / (n - 1.0)).max(0.0)
                } else {
                    0.0
                };
                e.live_bytes_stderr = (n * (1.0 - duty) * s2).sqrt() / duty;
            }
        }
        Design::Bytes { mean } => {
            let mut var: HashMap<K, f64> = HashMap::new();
            for s in live {
                let p = byte_inclusion(s.size, mean);
                if p <= 0.0 {
                    continue;
                }
                let e = out.entry(s.stack.clone()).or_default();
                e.live_bytes_estimate += s.size as f64 / p;
                e.live_count_estimate += 1.0 / p;
                e.samples += 1;
                *var.entry(s.stack).or_default() += (1.0 - p) / (p * p) * (s.size as f64).powi(2);
            }
            for (stack, e) in out.iter_mut() {
                e.live_bytes_stderr = var[stack].sqrt();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64: a small deterministic generator for the simulations.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn sample(stack: &'static str, size: u64, window: u64) -> LiveSample<&'static str> {
        LiveSample {
            stack,
            size,
            window,
        }
    }

    #[test]
    fn windows_weight_by_the_duty_cycle() {
        let live = [sample("a", 100, 1), sample("a", 50, 2), sample("b", 64, 1)];
        let design = Design::Windows {
            opened: 4,
            duty: 0.01,
        };
        let est = estimate(live.clone(), design);
        let a = est["a"];
        assert!((a.live_bytes_estimate - 15_000.0).abs() < 1e-6);
        assert!((a.live_count_estimate - 200.0).abs() < 1e-6);
        assert_eq!(a.samples, 2);
        // Totals 100, 50, 0, 0: mean 37.5, variance (100² + 50² - 4 · 37.5²) / 3.
        let s2: f64 = (10_000.0 + 2_500.0 - 4.0 * 37.5 * 37.5) / 3.0;
        let want = (4.0 * 0.99 * s2).sqrt() / 0.01;
        assert!((a.live_bytes_stderr - want).abs() < 1e-6, "{a:?} {want}");
        // Every window sampled (duty 1): exact, no error.
        let all = estimate(
            live.clone(),
            Design::Windows {
                opened: 4,
                duty: 1.0,
            },
        );
        assert_eq!(all["b"].live_bytes_estimate, 64.0);
        assert_eq!(all["b"].live_bytes_stderr, 0.0);
        // A design that cannot be.
        assert!(estimate(
            live,
            Design::Windows {
                opened: 0,
                duty: 0.5
            }
        )
        .is_empty());
    }

    #[test]
    fn bytes_weight_each_block_by_its_own_probability() {
        let mean = 1024.0;
        let est = estimate(
            [sample("a", 1024, 0), sample("a", 64, 0)],
            Design::Bytes { mean },
        );
        let (p1, p2) = (byte_inclusion(1024, mean), byte_inclusion(64, mean));
        assert!((est["a"].live_bytes_estimate - (1024.0 / p1 + 64.0 / p2)).abs() < 1e-6);
        assert!((est["a"].live_count_estimate - (1.0 / p1 + 1.0 / p2)).abs() < 1e-6);
        let var = (1.0 - p1) / (p1 * p1) * 1024f64.powi(2) + (1.0 - p2) / (p2 * p2) * 64f64.powi(2);
        assert!((est["a"].live_bytes_stderr - var.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn inclusion_probabilities() {
        assert_eq!(window_inclusion(0.005, 1.0), 0.005);
        assert_eq!(window_inclusion(2.0, 1.0), 1.0);
        assert_eq!(window_inclusion(1.0, 0.0), 1.0);
        let p = byte_inclusion(512 * 1024, 512.0 * 1024.0);
        assert!((p - (1.0 - (-1.0f64).exp())).abs() < 1e-12);
        assert!(byte_inclusion(64, 512.0 * 1024.0) < 0.001);
    }

    /// One simulated run: a service allocating `rate` blocks a second for `secs`, leaking
    /// one in ten (the rest are freed before the end), sampled by windows of `window`
    /// seconds every `period` at a random phase, or by bytes. Returns (true leaked bytes,
    /// estimate).
    fn simulate(
        seed: u64,
        rate: f64,
        windows: Option<(f64, f64)>,
        mean: f64,
    ) -> (f64, StackEstimate) {
        let (secs, mut rng) = (60.0, Rng(seed));
        let (window, period) = windows.unwrap_or((1.0, 1.0));
        let phase = rng.unit() * period;
        let (mut t, mut truth, mut live) = (0.0, 0.0, Vec::new());
        while t < secs {
            t += -(1.0 - rng.unit()).ln() / rate;
            let size = 16 + rng.next() % 497;
            let leaked = rng.next() % 10 == 0;
            truth += if leaked { size as f64 } else { 0.0 };
            let k = ((t - phase) / period).floor();
            let sampled = match windows {
                Some(_) => t - phase - k * period < window,
                None => rng.unit() < byte_inclusion(size, mean),
            };
            if sampled && leaked {
                live.push(sample("leak", size, k as i64 as u64));
            }
        }
        let design = match windows {
            Some((w, p)) => Design::Windows {
                opened: (secs / p) as u64,
                duty: window_inclusion(w, p),
            },
            None => Design::Bytes { mean },
        };
        (
            truth,
            estimate(live, design).remove("leak").unwrap_or_default(),
        )
    }

    /// Runs `runs` simulations: the estimates fall within two standard errors about 95% of
    /// the time, and the standard error neither under- nor overstates the spread.
    fn check_calibration(runs: u64, mut run: impl FnMut(u64) -> (f64, StackEstimate)) {
        let (mut within, mut sq_err, mut se) = (0, 0.0, 0.0);
        for seed in 0..runs {
            let (truth, e) = run(seed);
            assert!(e.samples > 50, "seed {seed}: {e:?}");
            let err = e.live_bytes_estimate - truth;
            assert!(
                err.abs() < 4.0 * e.live_bytes_stderr,
                "seed {seed}: truth {truth}, {e:?}"
            );
            within += u64::from(err.abs() < 2.0 * e.live_bytes_stderr);
            sq_err += err * err;
            se += e.live_bytes_stderr;
        }
        let (spread, mean_se) = ((sq_err / runs as f64).sqrt(), se / runs as f64);
        assert!(within >= runs * 85 / 100, "{within}/{runs} within 2 SE");
        let ratio = spread / mean_se;
        eprintln!("{within}/{runs} within 2 SE; actual spread / stated error = {ratio:.2}");
        assert!(
            (0.6..1.6).contains(&ratio),
            "actual spread / stated error = {ratio}"
        );
    }

    #[test]
    fn simulated_leak_is_estimated_within_its_error() {
        // 20k allocations/s for 60 s, 10% leaked (~32 MB), 5 ms windows every second:
        // ~600 live samples, a standard error of ~4%.
        check_calibration(40, |seed| {
            let (truth, e) = simulate(seed, 20_000.0, Some((0.005, 1.0)), 0.0);
            assert!(e.live_bytes_stderr / truth < 0.08, "seed {seed}: {e:?}");
            (truth, e)
        });
        // The same service sampled every 256 KiB allocated.
        check_calibration(40, |seed| simulate(seed, 20_000.0, None, 256.0 * 1024.0));
    }
}
