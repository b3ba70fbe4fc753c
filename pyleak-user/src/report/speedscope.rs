//! speedscope's file format (<https://www.speedscope.app/file-format-schema.json>): one
//! sampled profile whose samples are the stacks drawn, weighted by the metric. Frames are
//! shared, with file and line for Python frames.

use std::{collections::HashMap, io::Write};

use serde::Serialize;

use super::{
    drawn::{drawn, split_frame},
    folded, Render,
};
use crate::analysis::Analysis;

/// The schema every speedscope file names.
pub const SCHEMA: &str = "https://www.speedscope.app/file-format-schema.json";

/// A speedscope file.
#[derive(Debug, Serialize)]
pub struct File {
    /// [`SCHEMA`].
    #[serde(rename = "$schema")]
    pub schema: &'static str,
    /// Frames the profiles index.
    pub shared: Shared,
    /// The profiles (one).
    pub profiles: Vec<Profile>,
    /// The file's name in speedscope.
    pub name: String,
    /// The profile shown first.
    #[serde(rename = "activeProfileIndex")]
    pub active_profile_index: usize,
    /// Who wrote it.
    pub exporter: String,
}

/// Data the profiles share.
#[derive(Debug, Serialize)]
pub struct Shared {
    /// Every frame.
    pub frames: Vec<Frame>,
}

/// One frame.
#[derive(Debug, Serialize)]
pub struct Frame {
    /// The function (or pseudo-frame).
    pub name: String,
    /// Its file (Python) or module (native).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Its line (Python).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

/// A sampled profile.
#[derive(Debug, Serialize)]
pub struct Profile {
    /// Always `sampled`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Its name: what is counted.
    pub name: String,
    /// `bytes` or `none` (allocations).
    pub unit: &'static str,
    /// 0.
    #[serde(rename = "startValue")]
    pub start_value: u64,
    /// The sum of the weights.
    #[serde(rename = "endValue")]
    pub end_value: u64,
    /// Per stack, frame indexes, root first.
    pub samples: Vec<Vec<usize>>,
    /// Per stack, its value.
    pub weights: Vec<u64>,
}

/// The file for what `render` draws.
pub fn file(analysis: &Analysis, render: &Render) -> File {
    let d = drawn(analysis, render);
    let mut frames: Vec<Frame> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let (mut samples, mut weights) = (Vec::new(), Vec::new());
    // The folded lines: the same stacks (summed alike) as the other flamegraph formats.
    for (line, value) in folded::lines(analysis, render) {
        let stack = line
            .split(';')
            .map(|f| {
                *index.entry(f.to_owned()).or_insert_with(|| {
                    let p = split_frame(f);
                    frames.push(Frame {
                        name: p.function.to_owned(),
                        file: p.file.map(str::to_owned),
                        line: p.line,
                    });
                    frames.len() - 1
                })
            })
            .collect();
        samples.push(stack);
        weights.push(value);
    }
    File {
        schema: SCHEMA,
        shared: Shared { frames },
        profiles: vec![Profile {
            kind: "sampled",
            name: d.title.clone(),
            unit: if d.unit == "bytes" { "bytes" } else { "none" },
            start_value: 0,
            end_value: weights.iter().sum(),
            samples,
            weights,
        }],
        name: d.title,
        active_profile_index: 0,
        exporter: format!("pyleak {}", env!("CARGO_PKG_VERSION")),
    }
}

/// Writes the speedscope JSON.
pub fn write(analysis: &Analysis, render: &Render, out: &mut dyn Write) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, &file(analysis, render)).map_err(std::io::Error::from)?;
    writeln!(out)
}
