//! Growth samples while recording: live bytes per stack every `--interval`, kept in the
//! timeline the analysis reads, streamed with `--snapshots` and shown by `pyleak top`.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    path::PathBuf,
    time::{Duration, Instant},
};

use pyleak_common::Layer;

use super::census::Censuses;
use super::View;
use crate::{
    analysis::{
        growing::{top_growing, GrowingStack},
        growth::Timeline,
        growth_noise,
        peak::Peaks,
    },
    collect::{frames::frames_of, Recorder, StackSlot},
    errors::UserError,
    live::{self, RawTerminal, SnapshotLine, TopView},
    python::Resolver,
    symbolize::Symbolizer,
};

/// Growing types and holders drawn per process in `pyleak top --census`.
const LIVE_CENSUS_ROWS: usize = 5;

/// Growing stacks a snapshot line and the live view list.
const TOP_GROWING: usize = 10;

/// Takes the growth samples and shows them.
pub struct Sampler {
    /// Every sample so far (bounded).
    pub timeline: Timeline<StackSlot>,
    /// Each layer's highest sample so far.
    pub peaks: Peaks,
    /// Time between samples.
    pub interval: Duration,
    /// How the recording is shown.
    pub view: View,
    /// When the recording started.
    pub started: Instant,
    /// The first error writing `--snapshots` (the recording stops on it).
    pub error: Result<(), UserError>,
    out: Option<(File, PathBuf)>,
    native: bool,
    frames: HashMap<(u32, u64), Vec<String>>,
    growing: Vec<GrowingStack>,
    term: Option<RawTerminal>,
    /// Heap censuses taken with each sample (`--census`).
    pub censuses: Option<Censuses>,
}

impl Sampler {
    /// A sampler taking a sample every `interval`, streaming to `out` if given.
    pub fn new(
        interval: Duration,
        native: bool,
        view: View,
        started: Instant,
        out: Option<(File, PathBuf)>,
    ) -> Sampler {
        Sampler {
            started,
            timeline: Timeline::default(),
            peaks: Peaks::default(),
            interval,
            view,
            error: Ok(()),
            out,
            native,
            frames: HashMap::new(),
            growing: Vec::new(),
            term: None,
            censuses: None,
        }
    }

    /// In the live view, keys pressed (the terminal in raw mode, restored by
    /// [`Sampler::close_view`]); `None` otherwise or when stdin is not a terminal.
    pub fn keys(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<u8>> {
        if self.view != View::Top {
            return None;
        }
        let (term, rx) = live::keys()?;
        self.term = Some(term);
        Some(rx)
    }

    /// Takes one sample, and writes it as a line when streaming. A process the kernel has
    /// frozen (its interpreter shutting down) gets no census: its teardown is under way
    /// (a launched command's last census is taken at its freeze, see [`Sampler::hold`]).
    pub fn sample(&mut self, rec: &mut Recorder, syms: &Symbolizer, py: &mut Resolver) {
        if let Some(c) = self.censuses.as_mut() {
            c.take(self.started, |pid| rec.frozen_in_kernel(pid));
        }
        self.sample_growth(rec, syms, py);
    }

    /// The sample taken while a launched command is held at its interpreter's shutdown: its census
    /// (frozen, but its heap as it was before teardown) and the growth sample.
    pub fn hold(&mut self, rec: &mut Recorder, syms: &Symbolizer, py: &mut Resolver) {
        if let Some(c) = self.censuses.as_mut() {
            c.take(self.started, |_| false);
        }
        self.sample_growth(rec, syms, py);
    }

    fn sample_growth(&mut self, rec: &mut Recorder, syms: &Symbolizer, py: &mut Resolver) {
        let live = match rec.sample() {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                log::warn!("growth sample: {e}");
                return;
            }
        };
        super::runtimes::learn_used_stacks(rec, py, live.keys().map(|&(pid, _, id)| (pid, id)));
        let py = &*py;
        let t = self.started.elapsed().as_secs_f64();
        let mut layers: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (&(_, layer, _), &bytes) in &live {
            *layers.entry(layer.name()).or_default() += bytes;
        }
        self.peaks.record(t, &live);
        self.timeline.record(t, live);
        if self.view == View::Top || self.out.is_some() {
            let (native, cache) = (self.native, &mut self.frames);
            let noise = growth_noise(self.interval.as_secs_f64());
            self.growing = top_growing(&self.timeline, noise, TOP_GROWING, |pid, id| {
                if let Some(f) = cache.get(&(pid, id)) {
                    return f.clone();
                }
                let f = frames_of(rec, syms, py, native, pid, id).names;
                // Kept once every Python frame is named (the resolver may learn it later).
                if !f.iter().any(|name| name.starts_with("[python code")) {
                    cache.insert((pid, id), f.clone());
                }
                f
            });
        }
        if let Some((f, path)) = self.out.as_mut() {
            let line = SnapshotLine {
                t_s: t,
                layers,
                top_growing: &self.growing,
            };
            if let Err(e) = live::write_snapshot_line(&line, f) {
                self.error = Err(UserError::Output {
                    path: path.clone(),
                    cause: e,
                });
                self.out = None;
            }
        }
    }

    /// Forgets retired processes `gone`: their growth series and frame names.
    pub fn forget(&mut self, gone: &std::collections::HashSet<u32>) {
        self.timeline.forget(|(pid, _, _)| gone.contains(pid));
        self.frames.retain(|(pid, _), _| !gone.contains(pid));
        self.peaks.forget(gone);
    }

    /// Redraws the live view: layer totals, the fastest-growing stacks and, with
    /// `--census`, the growing types and their holders.
    pub fn draw(&self, rec: &Recorder) {
        // (layer, allocated, freed): the uprobe layers from the kernel, vm and pages from
        // the model.
        let mut layers: Vec<(Layer, u64, u64)> = Vec::new();
        if let Ok(stats) = rec.layer_stats() {
            for layer in Layer::UPROBED {
                let l = stats[layer as usize];
                layers.push((layer, l.alloc_bytes, l.freed_bytes));
            }
        }
        for (layer, t) in [(Layer::Vm, rec.model.vm), (Layer::Pages, rec.model.pages)] {
            layers.push((layer, t.alloc_bytes, t.freed_bytes));
        }
        live::draw(&TopView {
            elapsed_s: self.started.elapsed().as_secs_f64(),
            processes: rec.targets.iter().map(|&p| (p, rec.comm(p))).collect(),
            layers,
            interval_s: self.interval.as_secs_f64(),
            samples: self.timeline.len(),
            growing: &self.growing,
            census: self
                .censuses
                .as_ref()
                .map(|c| c.live_lines(LIVE_CENSUS_ROWS))
                .unwrap_or_default(),
        });
    }

    /// Leaves the live view: the terminal as it was.
    pub fn close_view(&mut self) {
        self.term = None;
    }
}
