//! The order of leak suspects, and the noise floor of growth.

use pyleak_common::Layer;

use super::{growth::Trend, Suspect};

/// A change of live bytes below this (over the recent half of a recording) is noise: the
/// objects of requests in flight come and go by a few KiB.
pub const GROWTH_NOISE_BYTES: u64 = 64 << 10;

/// The noise floor for samples `interval_s` apart.
pub fn growth_noise(_interval_s: f64) -> u64 {
    GROWTH_NOISE_BYTES
}

/// The layer with this report name.
pub fn layer_named(name: &str) -> Option<Layer> {
    Layer::named(name)
}

/// Orders suspects most likely leak first: memory still growing (fastest first), then what
/// merely outlived `--min-age` (most bytes first). One Python stack shows at several layers
/// (the request, the malloc block under it, its pages): those stay together, ranked by
/// their strongest layer, the upper layer first, where the Python code's own request is —
/// unless that layer's figure is a sampled estimate (pymalloc's small objects only: its
/// requests above 512 bytes are the layers below's), then the most live bytes first.
pub fn rank(suspects: &mut [Suspect]) {
    use std::collections::HashMap;
    let growing = |s: &Suspect| s.trend == Trend::Growing;
    // Per (pid, frames): (any growing, fastest growth, most aged bytes).
    let mut groups: HashMap<(u32, Vec<String>), (bool, f64, u64)> = HashMap::new();
    for s in suspects.iter() {
        let g = groups
            .entry((s.pid, s.frames.clone()))
            .or_insert((false, 0.0, 0));
        if growing(s) {
            g.0 = true;
            g.1 = g.1.max(s.growth_bytes_per_s);
        }
        g.2 = g.2.max(s.aged_live_bytes);
    }
    let score = |s: &Suspect| groups[&(s.pid, s.frames.clone())];
    let order = |s: &Suspect| layer_named(&s.layer).map_or(u32::MAX, |l| l as u32);
    suspects.sort_by(|a, b| {
        let (ga, gb) = (score(a), score(b));
        gb.0.cmp(&ga.0)
            .then_with(|| gb.1.total_cmp(&ga.1))
            .then(gb.2.cmp(&ga.2))
            .then(a.pid.cmp(&b.pid))
            .then(a.frames.cmp(&b.frames))
            .then_with(|| {
                if a.estimate.is_some() || b.estimate.is_some() {
                    b.live_bytes.cmp(&a.live_bytes)
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .then(order(a).cmp(&order(b)))
    });
}
