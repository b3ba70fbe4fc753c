//! What is shown while recording: the full-screen view of `pyleak top` and the
//! `--snapshots` stream (one JSON line per growth sample). Renderers of plain data, like
//! `report`; the recording loop hands them what to show.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
};

use pyleak_common::Layer;
use serde::Serialize;

use crate::{analysis::growing::GrowingStack, report::human_bytes};

/// One `--snapshots` line.
#[derive(Debug, Serialize)]
pub struct SnapshotLine<'a> {
    /// Seconds since the recording started.
    pub t_s: f64,
    /// Live bytes per layer.
    pub layers: BTreeMap<&'static str, u64>,
    /// The fastest-growing stacks.
    pub top_growing: &'a [GrowingStack],
}

/// Writes one `--snapshots` line.
pub fn write_snapshot_line(
    line: &SnapshotLine<'_>,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, line).map_err(std::io::Error::from)?;
    writeln!(out)?;
    out.flush()
}

/// What one frame of the live view shows.
#[derive(Debug)]
pub struct TopView<'a> {
    /// Seconds since the recording started.
    pub elapsed_s: f64,
    /// Traced processes: (pid, command name).
    pub processes: Vec<(u32, String)>,
    /// Per layer: bytes allocated and freed so far.
    pub layers: Vec<(Layer, u64, u64)>,
    /// Seconds between growth samples.
    pub interval_s: f64,
    /// Samples taken so far.
    pub samples: usize,
    /// The fastest-growing stacks.
    pub growing: &'a [GrowingStack],
    /// With `--census`: the growing types and their holders, one line each.
    pub census: Vec<String>,
}

/// Redraws the live view: layer totals and the fastest-growing stacks. On a terminal the
/// frame is cut to the window's size (rows and columns from `TIOCGWINSZ`), so that it
/// never scrolls its first line away; on a standard output that is not a terminal (a pipe,
/// a log file) each frame is plain lines, appended, with no screen-clearing escapes.
pub fn draw(view: &TopView<'_>) {
    let tty = std::io::stdout().is_terminal();
    let s = if tty {
        format!("\x1b[H\x1b[2J{}", fit(&frame_lines(view), window_size()))
    } else {
        let mut s = String::from("\n");
        for line in frame_lines(view) {
            s.push_str(&line);
            s.push('\n');
        }
        s
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

/// The terminal's size on standard output as (rows, columns), `None` when it has none.
fn window_size() -> Option<(usize, usize)> {
    // SAFETY: TIOCGWINSZ fills a `winsize` we own.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row as usize, ws.ws_col as usize))
}

/// A frame for a terminal of `size` (rows, columns): at most `rows` lines of at most
/// `columns` characters, joined by CR LF with none after the last, so that drawing it
/// from the top-left corner never scrolls. Everything, when the size is unknown.
fn fit(lines: &[String], size: Option<(usize, usize)>) -> String {
    let (rows, cols) = size.unwrap_or((usize::MAX, usize::MAX));
    lines
        .iter()
        .take(rows)
        .map(|l| l.chars().take(cols).collect::<String>())
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The lines of one frame, first the header, without line ends.
fn frame_lines(view: &TopView<'_>) -> Vec<String> {
    let procs: Vec<String> = view
        .processes
        .iter()
        .map(|(p, comm)| format!("{p} ({comm})"))
        .collect();
    let mut lines = vec![
        format!(
            "pyleak top  {:.0} s  process {}  (q to quit)",
            view.elapsed_s,
            procs.join(", ")
        ),
        String::new(),
        format!(
            "{:<10} {:>12} {:>12} {:>12}",
            "layer", "live", "allocated", "freed"
        ),
    ];
    for &(layer, alloc, freed) in &view.layers {
        lines.push(format!(
            "{:<10} {:>12} {:>12} {:>12}",
            layer.name(),
            human_bytes(alloc.saturating_sub(freed)),
            human_bytes(alloc),
            human_bytes(freed)
        ));
    }
    lines.push(String::new());
    lines.push(format!(
        "top growing stacks (a sample every {:.1} s, {} so far):",
        view.interval_s, view.samples
    ));
    if view.growing.is_empty() {
        lines.push("  (none growing yet)".to_string());
    }
    for g in view.growing {
        lines.push(format!(
            "  {:>12}/s {:>10} live  {:<9} pid {}  {:?}",
            format!("+{}", human_bytes(g.growth_bytes_per_s as u64)),
            human_bytes(g.live_bytes),
            g.layer,
            g.pid,
            g.trend
        ));
        for f in g.frames.iter().rev().take(3) {
            lines.push(format!("      {f}"));
        }
    }
    if !view.census.is_empty() {
        lines.push(String::new());
    }
    lines.extend(view.census.iter().cloned());
    lines
}

/// Keys pressed in the live view, with the terminal in raw mode until the returned guard
/// is dropped; `None` when stdin is not a terminal.
pub fn keys() -> Option<(RawTerminal, tokio::sync::mpsc::UnboundedReceiver<u8>)> {
    let term = RawTerminal::enter()?;
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
    Some((term, rx))
}

/// The terminal in raw mode on the alternate screen, restored on drop.
pub struct RawTerminal {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame taller and wider than the terminal keeps its header: at most `rows` lines,
    /// none longer than the width, and no line end after the last (which would scroll the
    /// header away; a 50-row terminal lost it with ten growing stacks).
    #[test]
    fn a_frame_fits_the_terminal_and_keeps_its_header() {
        let lines: Vec<String> = (0..60)
            .map(|i| format!("line {i} {}", "x".repeat(i)))
            .collect();
        let drawn = fit(&lines, Some((50, 20)));
        let rows: Vec<&str> = drawn.split("\r\n").collect();
        assert_eq!(rows.len(), 50);
        assert_eq!(rows[0], "line 0 ");
        assert!(rows.iter().all(|r| r.chars().count() <= 20), "{rows:?}");
        assert!(!drawn.ends_with('\n'));
        assert_eq!(fit(&lines, None).split("\r\n").count(), 60);
    }
}
