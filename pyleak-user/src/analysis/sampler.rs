//! Growth samples while recording: live bytes per stack every `--interval`, streamed as
//! JSON lines with `--snapshots`, and drawn by `pyleak top`.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use pyleak_common::Layer;
use serde::Serialize;

use super::growth::{self, Growth, Timeline, Trend};
use crate::{
    cli::RecordArgs,
    collect::Recorder,
    errors::UserError,
    python::Resolver,
    record::View,
    report::{frames_of, human_bytes},
    symbolize::Symbolizer,
};

/// Growing stacks a snapshot line and the live view list.
const TOP_GROWING: usize = 10;

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

/// One `--snapshots` line.
#[derive(Debug, Serialize)]
struct SnapshotLine<'a> {
    /// Seconds since the recording started.
    t_s: f64,
    /// Live bytes per layer.
    layers: BTreeMap<&'static str, u64>,
    /// The fastest-growing stacks.
    top_growing: &'a [GrowingStack],
}

/// Takes the growth samples and shows them.
pub struct Sampler {
    /// Every sample so far (bounded).
    pub timeline: Timeline<(u32, Layer, u64)>,
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
}

impl Sampler {
    /// A sampler for `args`, streaming to `out` if given.
    pub fn new(
        args: &RecordArgs,
        view: View,
        started: Instant,
        out: Option<(File, PathBuf)>,
    ) -> Sampler {
        Sampler {
            started,
            timeline: Timeline::default(),
            interval: Duration::from_secs_f64(args.interval),
            view,
            error: Ok(()),
            out,
            native: args.native,
            frames: HashMap::new(),
            growing: Vec::new(),
            term: None,
        }
    }

    /// In the live view, keys pressed (the terminal in raw mode, restored by
    /// [`Sampler::close_view`]); `None` otherwise or when stdin is not a terminal.
    pub fn keys(&mut self) -> anyhow::Result<Option<tokio::sync::mpsc::UnboundedReceiver<u8>>> {
        if self.view != View::Top {
            return Ok(None);
        }
        let Some(term) = RawTerminal::enter() else {
            return Ok(None);
        };
        self.term = Some(term);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::Read as _;
            let mut stdin = std::io::stdin();
            let mut b = [0u8; 1];
            while let Ok(1) = stdin.read(&mut b) {
                if tx.send(b[0]).is_err() {
                    break;
                }
            }
        });
        Ok(Some(rx))
    }

    /// Takes one sample, and writes it as a line when streaming.
    pub fn sample(&mut self, rec: &mut Recorder, syms: &Symbolizer, py: &Resolver) {
        let live = match rec.sample() {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                log::warn!("growth sample: {e}");
                return;
            }
        };
        let t = self.started.elapsed().as_secs_f64();
        let mut layers: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (&(_, layer, _), &bytes) in &live {
            *layers.entry(layer.name()).or_default() += bytes;
        }
        self.timeline.record(t, live);
        if self.view == View::Top || self.out.is_some() {
            self.growing = self.top_growing(rec, syms, py);
        }
        if let Some((f, path)) = self.out.as_mut() {
            let line = SnapshotLine {
                t_s: t,
                layers,
                top_growing: &self.growing,
            };
            let written = serde_json::to_writer(&mut *f, &line)
                .map_err(std::io::Error::from)
                .and_then(|()| writeln!(f))
                .and_then(|()| f.flush());
            if let Err(e) = written {
                self.error = Err(UserError::Output {
                    path: path.clone(),
                    reason: e.to_string(),
                });
                self.out = None;
            }
        }
    }

    /// The stacks whose live bytes grow fastest, by (process, layer, frames).
    fn top_growing(
        &mut self,
        rec: &Recorder,
        syms: &Symbolizer,
        py: &Resolver,
    ) -> Vec<GrowingStack> {
        let native = self.native;
        let noise = super::growth_noise(self.interval.as_secs_f64());
        // Frames are resolved only for the stacks that grow fastest on their own (a few
        // times more than shown, as stacks with the same frames are summed).
        let mut candidates: Vec<((u32, Layer, u64), f64)> = self
            .timeline
            .grouped(|&k| Some(k))
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    growth::assess(self.timeline.times(), &v, noise).bytes_per_s,
                )
            })
            .filter(|&(_, rate)| rate > 0.0)
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        candidates.truncate(TOP_GROWING * 8);
        let candidates: std::collections::HashSet<(u32, Layer, u64)> =
            candidates.into_iter().map(|(k, _)| k).collect();
        let frames = &mut self.frames;
        let series = self.timeline.grouped(|&(pid, layer, id)| {
            if !candidates.contains(&(pid, layer, id)) {
                return None;
            }
            if let Some(f) = frames.get(&(pid, id)) {
                return Some((pid, layer, f.clone()));
            }
            let f = frames_of(rec, syms, py, native, pid, id).names;
            // Kept once every Python frame is named (the resolver may learn it later).
            if !f.iter().any(|name| name.starts_with("[python code")) {
                frames.insert((pid, id), f.clone());
            }
            Some((pid, layer, f))
        });
        let mut out: Vec<GrowingStack> = series
            .into_iter()
            .filter_map(|((pid, layer, frames), v)| {
                let g: Growth = growth::assess(self.timeline.times(), &v, noise);
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
        out.truncate(TOP_GROWING);
        out
    }

    /// Redraws the live view: layer totals and the fastest-growing stacks.
    pub fn draw(&self, rec: &Recorder) {
        let mut s = String::new();
        s.push_str("\x1b[H\x1b[2J");
        let procs: Vec<String> = rec
            .targets
            .iter()
            .map(|&p| format!("{p} ({})", rec.comm(p)))
            .collect();
        s.push_str(&format!(
            "pyleak top  {:.0} s  process {}  (q to quit)\r\n\r\n",
            self.started.elapsed().as_secs_f64(),
            procs.join(", ")
        ));
        s.push_str(&format!(
            "{:<10} {:>12} {:>12} {:>12}\r\n",
            "layer", "live", "allocated", "freed"
        ));
        // (layer, allocated, freed): the uprobe layers from the kernel, vm and pages from
        // the model.
        let mut rows: Vec<(Layer, u64, u64)> = Vec::new();
        if let Ok(stats) = rec.layer_stats() {
            for layer in [Layer::Pymalloc, Layer::PymemRaw, Layer::Libc] {
                let l = stats[layer as usize];
                rows.push((layer, l.alloc_bytes, l.freed_bytes));
            }
        }
        for (layer, t) in [(Layer::Vm, rec.model.vm), (Layer::Pages, rec.model.pages)] {
            rows.push((layer, t.alloc_bytes, t.freed_bytes));
        }
        for (layer, alloc, freed) in rows {
            s.push_str(&format!(
                "{:<10} {:>12} {:>12} {:>12}\r\n",
                layer.name(),
                human_bytes(alloc.saturating_sub(freed)),
                human_bytes(alloc),
                human_bytes(freed)
            ));
        }
        s.push_str(&format!(
            "\r\ntop growing stacks (a sample every {:.1} s, {} so far):\r\n",
            self.interval.as_secs_f64(),
            self.timeline.len()
        ));
        if self.growing.is_empty() {
            s.push_str("  (none growing yet)\r\n");
        }
        for g in &self.growing {
            s.push_str(&format!(
                "  {:>12}/s {:>10} live  {:<9} pid {}  {:?}\r\n",
                format!("+{}", human_bytes(g.growth_bytes_per_s as u64)),
                human_bytes(g.live_bytes),
                g.layer,
                g.pid,
                g.trend
            ));
            for f in g.frames.iter().rev().take(3) {
                s.push_str(&format!("      {f}\r\n"));
            }
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(s.as_bytes());
        let _ = out.flush();
    }

    /// Leaves the live view: the terminal as it was.
    pub fn close_view(&mut self) {
        self.term = None;
    }
}

/// The terminal in raw mode on the alternate screen, restored on drop.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a valid termios buffer.
        unsafe {
            if libc::isatty(0) == 0 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            raw.c_lflag &= !(libc::ICANON | libc::ECHO);
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            print!("\x1b[?1049h\x1b[?25l");
            let _ = std::io::stdout().flush();
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        // SAFETY: restores the settings read in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}
