//! What a flamegraph draws: the stacks of one layer (by default the topmost with data, so
//! that each byte counts once), or of every layer side by side, and a title that says so.

use pyleak_common::Layer;

use super::{Metric, Render};
use crate::{
    analysis::{Analysis, StackReport},
    errors::UserError,
};

/// Which layers a flamegraph draws.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerChoice {
    /// The topmost layer with data for the metric (pages for `resident`).
    Default,
    /// One layer.
    One(Layer),
    /// Every layer, each under its own root frame.
    All,
}

impl LayerChoice {
    /// `--layer`: a layer name, `all`, or nothing for the default.
    pub fn parse(s: Option<&str>) -> Result<LayerChoice, UserError> {
        match s.map(str::trim) {
            None => Ok(LayerChoice::Default),
            Some("all") => Ok(LayerChoice::All),
            Some(name) => Layer::named(name)
                .map(LayerChoice::One)
                .ok_or_else(|| UserError::BadLayer(name.to_owned())),
        }
    }
}

/// The stacks drawn and their values.
#[derive(Debug)]
pub struct Drawn<'a> {
    /// Whether several layers may be drawn (each under a `[layer]` root).
    pub all: bool,
    /// Each stack drawn with its non-zero value.
    pub rows: Vec<(&'a StackReport, u64)>,
    /// What one unit of value is: `bytes` or `allocations`.
    pub unit: &'static str,
    /// The title: the metric, the layers, and what is counted.
    pub title: String,
}

/// The value of one stack for `metric`.
pub fn value(s: &StackReport, metric: Metric) -> u64 {
    match metric {
        Metric::LiveBytes => s.live_bytes,
        Metric::AllocBytes => s.alloc_bytes,
        Metric::Allocs => s.allocs,
        Metric::Resident if s.layer == "pages" => s.live_bytes,
        Metric::Resident => 0,
    }
}

/// Picks the stacks `render` asks for.
pub fn drawn<'a>(analysis: &'a Analysis, render: &Render) -> Drawn<'a> {
    let metric = render.metric;
    let has_data = |layer: Layer| {
        analysis
            .stacks
            .iter()
            .any(|s| s.layer == layer.name() && value(s, metric) > 0)
    };
    let chosen: Option<Layer> = match render.layer {
        LayerChoice::All => None,
        LayerChoice::One(l) => Some(l),
        LayerChoice::Default if metric == Metric::Resident => Some(Layer::Pages),
        LayerChoice::Default => Some(
            Layer::ALL
                .into_iter()
                .find(|&l| has_data(l))
                .unwrap_or(Layer::Pymalloc),
        ),
    };
    let rows: Vec<(&StackReport, u64)> = analysis
        .stacks
        .iter()
        .filter(|s| chosen.is_none_or(|l| s.layer == l.name()))
        .map(|s| (s, value(s, metric)))
        .filter(|&(_, v)| v > 0)
        .collect();
    let layers: Vec<&'static str> = Layer::ALL
        .into_iter()
        .map(Layer::name)
        .filter(|name| rows.iter().any(|(s, _)| s.layer == *name))
        .collect();
    let shown = match chosen {
        Some(l) => l.name().to_owned(),
        None if layers.is_empty() => "no data".to_owned(),
        None => layers.join(", "),
    };
    let what = match chosen {
        Some(l) if metric == Metric::Allocs => format!("{}, each once", l.info().counts),
        Some(l) => format!("{}, each byte once", l.info().counts),
        None => {
            "every layer side by side: a byte shows once per layer it passes through".to_owned()
        }
    };
    Drawn {
        title: format!("pyleak: {} by stack ({shown}) - {what}", metric.name()),
        all: chosen.is_none(),
        rows,
        unit: match metric {
            Metric::Allocs => "allocations",
            _ => "bytes",
        },
    }
}

/// A frame name taken apart: `qualname (path:line)` (Python), `symbol (module)` (native),
/// either with ` [native]` (a native frame under Python ones), or `[truncated]` and such.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameParts<'a> {
    /// The function (or the whole name when it has no place).
    pub function: &'a str,
    /// The source file (Python) or the module (native).
    pub file: Option<&'a str>,
    /// The line, for Python frames.
    pub line: Option<u64>,
}

/// Takes a frame name apart.
pub fn split_frame(name: &str) -> FrameParts<'_> {
    let name = name
        .strip_suffix(crate::collect::frames::NATIVE_MARK)
        .unwrap_or(name);
    let whole = FrameParts {
        function: name,
        file: None,
        line: None,
    };
    let Some((function, place)) = name.strip_suffix(')').and_then(|n| n.rsplit_once(" (")) else {
        return whole;
    };
    match place.rsplit_once(':') {
        Some((file, line)) if !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) => {
            FrameParts {
                function,
                file: Some(file),
                line: line.parse().ok(),
            }
        }
        _ => FrameParts {
            function,
            file: Some(place),
            line: None,
        },
    }
}
