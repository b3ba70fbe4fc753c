//! Rendering an [`Analysis`]: the text summary, folded stacks, flamegraphs and JSON (one
//! module per format). Nothing here computes; it only writes what the analysis found.

pub mod folded;
#[cfg(test)]
mod tests;
pub mod text;

use crate::{analysis::Analysis, cli::ReportArgs, errors::UserError};

/// Writes the flamegraph `-o` asks for: an SVG when the path ends in `.svg`, else folded.
pub fn write_flamegraph(
    report: &Analysis,
    metric: folded::Metric,
    per_process: bool,
    path: &std::path::Path,
    f: &mut std::fs::File,
) -> Result<(), UserError> {
    use std::io::Write as _;
    let svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    let mut out = std::io::BufWriter::new(f);
    if svg {
        folded::write_svg(report, metric, per_process, &mut out)
    } else {
        folded::write(report, metric, per_process, &mut out)
    }
    .and_then(|()| out.flush())
    .map_err(|e| UserError::Output {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// `pyleak report FILE.json`: the text summary again, and a flamegraph with `-o`.
pub fn rerender(args: &ReportArgs) -> anyhow::Result<i32> {
    let bad = |reason: String| UserError::BadReport {
        path: args.input.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&args.input).map_err(|e| bad(e.to_string()))?;
    let report: Analysis = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let mut out = args
        .output
        .as_deref()
        .map(|p| {
            std::fs::File::create(p).map_err(|e| UserError::Output {
                path: p.to_owned(),
                reason: e.to_string(),
            })
        })
        .transpose()?;
    text::write(&report, &mut std::io::stdout().lock())?;
    if let (Some(f), Some(path)) = (out.as_mut(), args.output.as_deref()) {
        write_flamegraph(&report, args.metric, args.per_process, path, f)?;
    }
    Ok(0)
}

/// `12.3 MiB` and friends.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
