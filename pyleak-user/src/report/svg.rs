//! An SVG flamegraph of the folded stacks (drawn by inferno), titled with the metric, the
//! layer drawn and what is counted.

use std::io::Write;

use super::{drawn::drawn, folded, Render};
use crate::analysis::Analysis;

/// Draws the stacks `render` picks.
pub fn write(analysis: &Analysis, render: &Render, out: &mut dyn Write) -> std::io::Result<()> {
    let d = drawn(analysis, render);
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = d.title;
    opts.count_name = d.unit.to_owned();
    // Colours from the frames' names: the same picture for the same report.
    opts.deterministic = true;
    let lines: Vec<String> = folded::lines(analysis, render)
        .into_iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if lines.is_empty() {
        // inferno refuses an empty input; say so in the picture instead.
        return write!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="600" height="40"><text x="10" y="25">{}: nothing to draw</text></svg>"#,
            opts.title
        );
    }
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), out)
        .map_err(|e| std::io::Error::other(e.to_string()))
}
