//! Leak suspects from the rows: rows grouped by the stack they are blamed on (the
//! innermost frame of the user's own code, see `blame`), each group's ages merged and its
//! growth assessed from the summed samples; start-up memory set apart.

use std::collections::HashMap;

use pyleak_common::Layer;

use super::{
    blame::blamed,
    growth::{self, Growth, Timeline, Trend},
    layer_named, FullStack, Options, StackReport, Suspect, SuspectLinkage, STARTUP_S,
};
use crate::collect::{Ages, StackSlot};

/// Full stacks kept per grouped suspect.
const FULL_STACKS: usize = 5;

/// Adds `a`'s blocks to `into`.
pub fn merge_ages(into: &mut Ages, a: &Ages) {
    into.aged_bytes += a.aged_bytes;
    into.aged_count += a.aged_count;
    into.oldest_ns = into.oldest_ns.max(a.oldest_ns);
    if a.count > 0 {
        into.youngest_ns = if into.count == 0 {
            a.youngest_ns
        } else {
            into.youngest_ns.min(a.youngest_ns)
        };
    }
    into.bytes += a.bytes;
    into.count += a.count;
}

/// Whether a stack is the interpreter's own or an import's: no Python frame, or a frame
/// of importlib's (`<frozen importlib._bootstrap>`).
fn is_startup(frames: &[String], native: usize) -> bool {
    native >= frames.len() || frames.iter().any(|f| f.contains("<frozen importlib"))
}

/// One suspect in the making: the rows blamed on one (pid, layer, stack).
struct Group {
    pid: u32,
    layer: String,
    frames: Vec<String>,
    native: usize,
    rows: Vec<usize>,
}

/// What the rows say, besides themselves, to make suspects of them.
pub struct Inputs<'a> {
    /// Per row, the ages of its live memory.
    pub ages: &'a [Ages],
    /// The row of each (pid, layer, stack id).
    pub row_of_key: &'a HashMap<StackSlot, usize>,
    /// The growth samples.
    pub timeline: &'a Timeline<StackSlot>,
    /// The growth noise floor, bytes.
    pub noise: u64,
    /// pymalloc arenas mapped, by (pid, frames of the stack that made them).
    pub arenas_by_stack: &'a HashMap<(u32, Vec<String>), u64>,
    /// The layers probed.
    pub traced: crate::layers::LayerSet,
    /// Seconds into the recording each process traced from its start started.
    pub started_s: &'a HashMap<u32, f64>,
}

/// The suspects and the start-up memory (both unranked) of `rows`.
pub fn suspects(rows: &[StackReport], inp: &Inputs, opts: Options) -> (Vec<Suspect>, Vec<Suspect>) {
    let blame = |frames: &[String], native: usize| {
        if opts.group_libs {
            blamed(frames, native)
        } else {
            (frames.to_vec(), native)
        }
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: HashMap<(u32, String, Vec<String>), usize> = HashMap::new();
    let mut group_of_row = vec![0; rows.len()];
    for (i, r) in rows.iter().enumerate() {
        let (frames, native) = blame(&r.frames, r.native_frames);
        let g = *group_of
            .entry((r.pid, r.layer.clone(), frames.clone()))
            .or_insert_with(|| {
                groups.push(Group {
                    pid: r.pid,
                    layer: r.layer.clone(),
                    frames,
                    native,
                    rows: Vec::new(),
                });
                groups.len() - 1
            });
        groups[g].rows.push(i);
        group_of_row[i] = g;
    }
    let series = inp
        .timeline
        .grouped(|k| inp.row_of_key.get(k).map(|&i| group_of_row[i]));
    let t = inp.timeline;
    let zeros = vec![0; t.len()];
    let growth: Vec<Growth> = (0..groups.len())
        .map(|g| growth::assess(t.times(), series.get(&g).unwrap_or(&zeros), inp.noise))
        .collect();

    // The same blamed stack at every layer.
    let mut by_frames: HashMap<(u32, &[String]), SuspectLinkage> = HashMap::new();
    for g in &groups {
        let l = by_frames.entry((g.pid, &g.frames)).or_default();
        let live: u64 = g.rows.iter().map(|&i| rows[i].live_bytes).sum();
        if let Some(layer) = layer_named(&g.layer) {
            l.live[layer] += live;
        }
    }
    let mut arenas: HashMap<(u32, Vec<String>), u64> = HashMap::new();
    for ((pid, frames), &bytes) in inp.arenas_by_stack {
        // Arena frames carry no native count here: Python frames are what is compared.
        *arenas.entry((*pid, blame(frames, 0).0)).or_default() += bytes;
    }

    let mut out: Vec<(Suspect, f64, bool)> = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let mut a = Ages::default();
        for &i in &g.rows {
            merge_ages(&mut a, &inp.ages[i]);
        }
        let gr = growth[gi];
        // vm and pages rows qualify by aged memory only: their growth is mostly malloc's
        // and pymalloc's, whose own layers say whether blocks are leaking.
        let uprobe_layer = layer_named(&g.layer).is_none_or(Layer::is_uprobed);
        if a.aged_bytes == 0 && !(gr.trend == Trend::Growing && uprobe_layer) {
            continue;
        }
        let mut link = by_frames
            .get(&(g.pid, g.frames.as_slice()))
            .cloned()
            .unwrap_or_default();
        link.arena_bytes = arenas.get(&(g.pid, g.frames.clone())).copied().unwrap_or(0);
        // Arenas made at this stack while pymalloc is not probed: say which layer names
        // the objects in them.
        let arena_note = link.arena_bytes > 0 && !inp.traced.contains(Layer::Pymalloc);
        let members: Vec<&StackReport> = g.rows.iter().map(|&i| &rows[i]).collect();
        let sum = |f: fn(&StackReport) -> u64| members.iter().map(|r| f(r)).sum::<u64>();
        let estimate = members
            .iter()
            .filter_map(|r| r.estimate)
            .reduce(|x, y| x.add(y));
        // The stacks blamed on this one, when library frames were cut off.
        let mut full_stacks: Vec<FullStack> = members
            .iter()
            .filter(|r| r.frames != g.frames)
            .map(|r| FullStack {
                frames: r.frames.clone(),
                native_frames: r.native_frames,
                live_bytes: r.live_bytes,
            })
            .collect();
        full_stacks.sort_by(|x, y| {
            y.live_bytes
                .cmp(&x.live_bytes)
                .then(x.frames.cmp(&y.frames))
        });
        full_stacks.truncate(FULL_STACKS);
        let startup_like = members
            .iter()
            .all(|r| is_startup(&r.frames, r.native_frames));
        out.push((
            Suspect {
                layer: g.layer.clone(),
                pid: g.pid,
                frames: g.frames.clone(),
                native_frames: g.native,
                // Of vm and pages, the memory that can be a suspect (see `Snapshot::ages`).
                live_bytes: if uprobe_layer {
                    sum(|r| r.live_bytes)
                } else {
                    a.bytes
                },
                live_count: if uprobe_layer {
                    sum(|r| r.live_count)
                } else {
                    a.count
                },
                aged_live_bytes: a.aged_bytes,
                aged_live_count: a.aged_count,
                growth_bytes_per_s: gr.bytes_per_s,
                overall_growth_bytes_per_s: gr.overall_bytes_per_s,
                steadiness: gr.steadiness,
                trend: gr.trend,
                oldest_age_s: a.oldest_ns as f64 / 1e9,
                linkage: link,
                estimate,
                held_by: Vec::new(),
                full_stacks,
                note: arena_note.then(|| {
                    "pymalloc arenas this stack mapped: `--layers pymalloc` names the objects in them"
                        .to_owned()
                }),
            },
            a.youngest_ns as f64 / 1e9,
            startup_like,
        ));
    }
    // Interpreter start-up and imports: memory a Python process made in its first moments
    // and kept, flat, is what every run of it holds; listed apart, not ranked.
    let (startup, suspects): (Vec<_>, Vec<_>) =
        out.into_iter().partition(|(s, youngest_s, startup_like)| {
            let made_s = inp
                .started_s
                .get(&s.pid)
                .map(|&start| opts.duration_s - start - youngest_s);
            made_s.is_some_and(|t| t <= STARTUP_S) && s.trend != Trend::Growing && *startup_like
        });
    (
        suspects.into_iter().map(|x| x.0).collect(),
        startup.into_iter().map(|x| x.0).collect(),
    )
}
