//! What `pyleak census` prints and writes: censuses in time order, each type's growth
//! between the first and the last (per second), and the holders ranked by how fast what
//! they retain grows (by how much they retain when there is one census).

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::python::census::Census;
use crate::report::human_bytes;

/// Censuses kept at most: past that, every other one is dropped (the first and the last
/// stay), so a recording of days costs what one of minutes does.
const MAX_KEPT: usize = 128;

/// Censuses of one process, as taken (bounded: see [`MAX_KEPT`]); only the first and the
/// last keep their holders, which growth compares.
pub struct Report {
    pid: u32,
    python: String,
    censuses: Vec<(f64, Census)>,
}

/// One type's change from the first census to the last.
#[derive(Debug, Clone, PartialEq)]
pub struct Growth {
    /// Type name.
    pub name: String,
    /// Objects per second (negative: shrinking).
    pub count_per_s: f64,
    /// Bytes per second.
    pub bytes_per_s: f64,
}

/// One holder in the last census, with its growth since the first.
#[derive(Debug, Clone, PartialEq)]
pub struct HolderRow {
    /// Names from the root.
    pub path: Vec<String>,
    /// The holding object's type.
    pub type_name: String,
    /// Its items, if a container.
    pub len: Option<u64>,
    /// Objects and bytes attributed to it.
    pub retained_count: u64,
    /// Bytes attributed to it.
    pub retained_bytes: u64,
    /// Change of `retained_bytes` per second (0 with one census).
    pub growth_bytes_per_s: f64,
    /// Its most numerous type of retained object, other than its own (what it holds).
    pub holds: Option<(String, u64)>,
}

/// The report's content.
pub struct Finished {
    report: Report,
    /// Per type, fastest-growing bytes first.
    pub growth: Vec<Growth>,
    /// The top holders.
    pub holders: Vec<HolderRow>,
}

impl Report {
    /// No censuses yet of process `pid` running CPython `python`.
    pub fn new(pid: u32, python: String) -> Report {
        Report {
            pid,
            python,
            censuses: Vec::new(),
        }
    }

    /// The holder of the allocator block at `addr` in the last census (see
    /// `Census::blocks`), as its path.
    pub fn holder_of_block(&self, addr: u64) -> Option<&[String]> {
        let (_, last) = self.censuses.last()?;
        let &i = last.blocks.get(&addr)?;
        Some(&last.holders.get(i as usize)?.path)
    }

    /// Whether no census was added.
    pub fn is_empty(&self) -> bool {
        self.censuses.is_empty()
    }

    /// Adds a census taken `time_s` seconds after the first began.
    pub fn add(&mut self, time_s: f64, census: Census) {
        if self.censuses.len() >= 2 {
            if let Some((_, previous)) = self.censuses.last_mut() {
                previous.holders = Vec::new();
                previous.blocks = Default::default();
            }
        }
        self.censuses.push((time_s, census));
        if self.censuses.len() > MAX_KEPT {
            let last = self.censuses.len() - 1;
            let mut i = 0;
            self.censuses.retain(|_| {
                i += 1;
                (i - 1) % 2 == 0 || i - 1 == last
            });
        }
    }

    /// Growth so far (first census to the last) and the `top` holders, without ending the
    /// report (the live view's); empty before two censuses.
    pub fn current(&self, top: usize) -> (Vec<Growth>, Vec<HolderRow>) {
        match (self.censuses.first(), self.censuses.last()) {
            (Some((t0, first)), Some((t1, last))) if self.censuses.len() > 1 => {
                let dt = t1 - t0;
                (
                    type_growth(first, last, dt),
                    holder_rows(first, last, dt, top),
                )
            }
            _ => (Vec::new(), Vec::new()),
        }
    }

    /// Growth and the `top` holders.
    pub fn finish(self, top: usize) -> Finished {
        let (growth, holders) = match (self.censuses.first(), self.censuses.last()) {
            (Some((t0, first)), Some((t1, last))) => {
                let dt = t1 - t0;
                (
                    type_growth(first, last, dt),
                    holder_rows(first, last, dt, top),
                )
            }
            _ => (Vec::new(), Vec::new()),
        };
        Finished {
            report: self,
            growth,
            holders,
        }
    }
}

/// Per type: (count, bytes) change per second between two censuses `dt` seconds apart,
/// fastest-growing bytes first (all zero when `dt` is 0).
pub fn type_growth(first: &Census, last: &Census, dt: f64) -> Vec<Growth> {
    let before: HashMap<&str, (u64, u64)> = first
        .types
        .iter()
        .map(|t| (t.name.as_str(), (t.count, t.bytes)))
        .collect();
    let mut names: Vec<&str> = last.types.iter().map(|t| t.name.as_str()).collect();
    names.extend(
        before
            .keys()
            .filter(|n| !last.types.iter().any(|t| t.name == **n)),
    );
    let after: HashMap<&str, (u64, u64)> = last
        .types
        .iter()
        .map(|t| (t.name.as_str(), (t.count, t.bytes)))
        .collect();
    let per_s = |a: u64, b: u64| {
        if dt > 0.0 {
            (a as f64 - b as f64) / dt
        } else {
            0.0
        }
    };
    let mut out: Vec<Growth> = names
        .into_iter()
        .map(|n| {
            let (a, b) = (after.get(n).copied(), before.get(n).copied());
            let (ac, ab) = a.unwrap_or((0, 0));
            let (bc, bb) = b.unwrap_or((0, 0));
            Growth {
                name: n.to_owned(),
                count_per_s: per_s(ac, bc),
                bytes_per_s: per_s(ab, bb),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.bytes_per_s
            .total_cmp(&a.bytes_per_s)
            .then(a.name.cmp(&b.name))
    });
    out
}

/// The `top` holders of the last census: fastest-growing first when `dt` > 0 (those not
/// growing after, by bytes retained), by bytes retained otherwise.
pub fn holder_rows(first: &Census, last: &Census, dt: f64, top: usize) -> Vec<HolderRow> {
    let before: HashMap<&[String], u64> = first
        .holders
        .iter()
        .map(|h| (h.path.as_slice(), h.retained_bytes))
        .collect();
    let mut rows: Vec<HolderRow> = last
        .holders
        .iter()
        .map(|h| {
            let growth = if dt > 0.0 {
                let b = before.get(h.path.as_slice()).copied().unwrap_or(0);
                (h.retained_bytes as f64 - b as f64) / dt
            } else {
                0.0
            };
            let holds = h
                .by_type
                .iter()
                .filter(|(t, _)| **t != h.type_name || h.by_type.len() == 1)
                .max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.0.cmp(a.0)))
                .map(|(t, (c, _))| (t.clone(), *c));
            HolderRow {
                path: h.path.clone(),
                type_name: h.type_name.clone(),
                len: h.len,
                retained_count: h.retained_count,
                retained_bytes: h.retained_bytes,
                growth_bytes_per_s: growth,
                holds,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        let key = |r: &HolderRow| r.growth_bytes_per_s.max(0.0);
        key(b)
            .total_cmp(&key(a))
            .then(b.retained_bytes.cmp(&a.retained_bytes))
            .then(a.path.cmp(&b.path))
    });
    rows.truncate(top);
    rows
}

impl Finished {
    /// The JSON document (shape of issue 14).
    pub fn json(&self) -> Value {
        let r = &self.report;
        let paused = r
            .censuses
            .iter()
            .map(|(_, c)| c.copy.paused_ms)
            .fold(0.0, f64::max);
        let censuses: Vec<Value> = r
            .censuses
            .iter()
            .map(|(t, c)| {
                let types: Vec<Value> = c
                    .types
                    .iter()
                    .map(|t| json!({"type": t.name, "count": t.count, "bytes": t.bytes}))
                    .collect();
                json!({"time_s": t, "objects": c.objects, "bytes": c.bytes, "types": types})
            })
            .collect();
        let growth: Vec<Value> = self
            .growth
            .iter()
            .map(|g| {
                json!({"type": g.name, "count_per_s": g.count_per_s, "bytes_per_s": g.bytes_per_s})
            })
            .collect();
        let holders: Vec<Value> = self
            .holders
            .iter()
            .map(|h| {
                json!({"path": h.path, "type": h.type_name, "len": h.len,
                       "retained_count": h.retained_count, "retained_bytes": h.retained_bytes,
                       "growth_bytes_per_s": h.growth_bytes_per_s})
            })
            .collect();
        json!({
            "pid": r.pid,
            "python": r.python,
            "paused_ms": paused,
            "censuses": censuses,
            "growth": growth,
            "holders": holders,
            "unreadable": r.censuses.iter().map(|(_, c)| c.unreadable).sum::<u64>(),
        })
    }

    /// The text summary: the last census's `top` types with their growth, then holders.
    pub fn text(&self, top: usize) -> String {
        use std::fmt::Write as _;
        let r = &self.report;
        let mut s = String::new();
        let Some((t_last, last)) = r.censuses.last() else {
            return s;
        };
        let paused = r
            .censuses
            .iter()
            .map(|(_, c)| c.copy.paused_ms)
            .fold(0.0, f64::max);
        let unreadable: u64 = r.censuses.iter().map(|(_, c)| c.unreadable).sum();
        let _ = writeln!(
            s,
            "pyleak census: PID {} (CPython {}), {} census{} over {:.1} s; target stopped {:.1} ms at most; {} unreadable",
            r.pid,
            r.python,
            r.censuses.len(),
            if r.censuses.len() == 1 { "" } else { "es" },
            t_last,
            paused,
            unreadable
        );
        let _ = writeln!(
            s,
            "{} live objects, {}",
            last.objects,
            human_bytes(last.bytes)
        );
        let growing = r.censuses.len() > 1;
        let _ = writeln!(
            s,
            "\n{:<40} {:>10} {:>11}{}",
            "type",
            "count",
            "bytes",
            if growing {
                "     count/s     bytes/s"
            } else {
                ""
            }
        );
        let rows: Vec<(String, u64, u64, Option<&Growth>)> = if growing {
            self.growth
                .iter()
                .take(top)
                .map(|g| {
                    let t = last.types.iter().find(|t| t.name == g.name);
                    (
                        g.name.clone(),
                        t.map_or(0, |t| t.count),
                        t.map_or(0, |t| t.bytes),
                        Some(g),
                    )
                })
                .collect()
        } else {
            last.types
                .iter()
                .take(top)
                .map(|t| (t.name.clone(), t.count, t.bytes, None))
                .collect()
        };
        for (name, count, bytes, g) in rows {
            let _ = write!(s, "{:<40} {count:>10} {:>11}", name, human_bytes(bytes));
            if let Some(g) = g {
                let _ = write!(s, " {:>+11.1} {:>+11.0}", g.count_per_s, g.bytes_per_s);
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\nholders{}:",
            if growing {
                " (fastest-growing first)"
            } else {
                " (most bytes first)"
            }
        );
        for h in &self.holders {
            let len = h.len.map_or(String::new(), |n| format!(", {n} items"));
            let holds = h
                .holds
                .as_ref()
                .map_or(String::new(), |(t, c)| format!(", {c} {t}"));
            let _ = write!(
                s,
                "  {} ({}{len}): {} objects, {}{holds}",
                h.path.join("."),
                h.type_name,
                h.retained_count,
                human_bytes(h.retained_bytes)
            );
            if growing {
                let _ = write!(s, ", {:+.0} B/s", h.growth_bytes_per_s);
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::census::{Holder, TypeCount};

    fn census(types: &[(&str, u64, u64)], holders: &[(&str, u64)]) -> Census {
        Census {
            types: types
                .iter()
                .map(|&(n, c, b)| TypeCount {
                    name: n.into(),
                    count: c,
                    bytes: b,
                })
                .collect(),
            holders: holders
                .iter()
                .map(|&(p, b)| Holder {
                    path: p.split('.').map(String::from).collect(),
                    type_name: "dict".into(),
                    len: Some(1),
                    retained_count: 1,
                    retained_bytes: b,
                    by_type: HashMap::from([("tuple".to_owned(), (3, 3 * 56))]),
                })
                .collect(),
            ..Census::default()
        }
    }

    #[test]
    fn growth_per_second_between_first_and_last() {
        let a = census(
            &[("tuple", 100, 5600), ("str", 10, 500)],
            &[("m.A", 1000), ("m.B", 50)],
        );
        let b = census(
            &[("tuple", 300, 16800), ("int", 4, 112)],
            &[("m.A", 5000), ("m.C", 60)],
        );
        let g = type_growth(&a, &b, 2.0);
        assert_eq!(g[0].name, "tuple");
        assert_eq!((g[0].count_per_s, g[0].bytes_per_s), (100.0, 5600.0));
        let str_row = g.iter().find(|g| g.name == "str").expect("gone types kept");
        assert_eq!(str_row.count_per_s, -5.0);
        let h = holder_rows(&a, &b, 2.0, 10);
        assert_eq!(h[0].path, ["m", "A"]);
        assert_eq!(h[0].growth_bytes_per_s, 2000.0);
        // A holder new in the last census grew from nothing.
        assert_eq!(h[1].path, ["m", "C"]);
        assert_eq!(h[1].holds, Some(("tuple".to_owned(), 3)));
        assert_eq!(holder_rows(&a, &b, 2.0, 1).len(), 1);
        // Only the first and the last census keep holders; at most MAX_KEPT are kept.
        let mut r = Report::new(1, "3.12".into());
        for i in 0..1000 {
            r.add(f64::from(i), census(&[("tuple", 1, 1)], &[("m.A", 1)]));
        }
        assert!(r.censuses.len() <= MAX_KEPT && r.censuses.len() > MAX_KEPT / 2);
        assert_eq!(
            (r.censuses[0].0, r.censuses.last().unwrap().0),
            (0.0, 999.0)
        );
        let with_holders = r
            .censuses
            .iter()
            .filter(|c| !c.1.holders.is_empty())
            .count();
        assert_eq!(with_holders, 2);
        // One census: no growth, most bytes first.
        let one = holder_rows(&b, &b, 0.0, 10);
        assert_eq!(
            (one[0].growth_bytes_per_s, one[0].retained_bytes),
            (0.0, 5000)
        );
    }
}
