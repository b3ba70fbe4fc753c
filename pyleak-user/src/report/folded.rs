//! Folded stacks (`frame;frame;frame value`, root first), as inferno and flamegraph.pl read
//! them. The layer is the root frame (`[libc];…`), under the process with `--per-process`.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write,
};

use super::{drawn::drawn, Render};
use crate::analysis::Analysis;

/// The folded lines of what `render` draws, with their values; stacks of several processes
/// with the same frames are summed, unless `per_process` puts each process
/// (`comm (pid N)`) at the root, above the layer.
pub fn lines(analysis: &Analysis, render: &Render) -> BTreeMap<String, u64> {
    let comms: HashMap<u32, &str> = analysis
        .processes
        .iter()
        .map(|p| (p.pid, p.comm.as_str()))
        .collect();
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for (s, value) in drawn(analysis, render).rows {
        let mut key = String::new();
        if render.per_process {
            let comm = comms.get(&s.pid).copied().unwrap_or("?").replace(';', ":");
            key.push_str(&format!("{comm} (pid {});", s.pid));
        }
        key.push_str(&format!("[{}]", s.layer));
        for f in &s.frames {
            key.push(';');
            // ';' separates frames; keep it out of names.
            key.push_str(&f.replace(';', ":"));
        }
        *lines.entry(key).or_default() += value;
    }
    lines
}

/// Writes one line per stack drawn with a non-zero value.
pub fn write(analysis: &Analysis, render: &Render, out: &mut dyn Write) -> std::io::Result<()> {
    for (k, v) in lines(analysis, render) {
        writeln!(out, "{k} {v}")?;
    }
    Ok(())
}
