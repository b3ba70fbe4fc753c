//! pprof: a gzipped `profile.proto` (the format of Go's `pprof`, read by `go tool pprof`,
//! Pyroscope and Grafana). Four sample types, as Go's heap profiles have them: live
//! (`inuse_`) and allocated (`alloc_`) bytes and counts; the default is the one `--metric`
//! names. Python frames are functions with their file and line; native frames are
//! functions with their module as the file. The message set is the part of
//! `profile.proto` pyleak writes, by hand with prost.

use std::{collections::HashMap, io::Write};

use flate2::{write::GzEncoder, Compression};
use prost::Message;

use super::{
    drawn::{drawn, split_frame},
    Metric, Render,
};
use crate::analysis::Analysis;

/// `perftools.profiles.Profile`.
#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    /// What each sample value counts.
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    /// The samples: one per stack.
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    /// Locations, by id (1-based).
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    /// Functions, by id (1-based).
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    /// Every string, by index; index 0 is "".
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    /// Length of the recording.
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    /// Notes (string indexes).
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    /// The sample type shown by default (a string index).
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `perftools.profiles.ValueType`.
#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    /// String index of the type (`inuse_space`).
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    /// String index of the unit (`bytes`).
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `perftools.profiles.Sample`.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    /// One value per sample type.
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    /// Layer and process.
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `perftools.profiles.Label`.
#[derive(Clone, PartialEq, Message)]
pub struct Label {
    /// String index of the key.
    #[prost(int64, tag = "1")]
    pub key: i64,
    /// String index of a string value.
    #[prost(int64, tag = "2")]
    pub str: i64,
    /// A numeric value.
    #[prost(int64, tag = "3")]
    pub num: i64,
}

/// `perftools.profiles.Location`.
#[derive(Clone, PartialEq, Message)]
pub struct Location {
    /// Its id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// The function and line there.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

/// `perftools.profiles.Line`.
#[derive(Clone, PartialEq, Message)]
pub struct Line {
    /// The function's id.
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    /// The line number (0: unknown).
    #[prost(int64, tag = "2")]
    pub line: i64,
}

/// `perftools.profiles.Function`.
#[derive(Clone, PartialEq, Message)]
pub struct Function {
    /// Its id.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// String index of its name.
    #[prost(int64, tag = "2")]
    pub name: i64,
    /// String index of its name as the system knows it.
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    /// String index of its file (Python) or module (native).
    #[prost(int64, tag = "4")]
    pub filename: i64,
}

/// Interned strings.
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn get(&mut self, s: &str) -> i64 {
        if self.table.is_empty() {
            self.table.push(String::new());
            self.index.insert(String::new(), 0);
        }
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_owned());
        self.index.insert(s.to_owned(), i);
        i
    }
}

/// The sample types, in order, and which one `metric` shows by default.
const SAMPLE_TYPES: [(&str, &str); 4] = [
    ("inuse_space", "bytes"),
    ("inuse_objects", "count"),
    ("alloc_space", "bytes"),
    ("alloc_objects", "count"),
];

/// The profile of what `render` draws (its layers; every sample type whatever the metric).
pub fn profile(analysis: &Analysis, render: &Render) -> Profile {
    let d = drawn(analysis, render);
    let mut strings = Strings::default();
    strings.get("");
    let sample_type = SAMPLE_TYPES
        .iter()
        .map(|(t, u)| ValueType {
            r#type: strings.get(t),
            unit: strings.get(u),
        })
        .collect();
    let default_sample_type = strings.get(match render.metric {
        Metric::LiveBytes | Metric::Resident => "inuse_space",
        Metric::AllocBytes => "alloc_space",
        Metric::Allocs => "alloc_objects",
    });
    let comment = vec![strings.get(&d.title)];
    let comms: HashMap<u32, &str> = analysis
        .processes
        .iter()
        .map(|p| (p.pid, p.comm.as_str()))
        .collect();
    let mut functions: Vec<Function> = Vec::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut location_of: HashMap<String, u64> = HashMap::new();
    let mut location = |name: &str, strings: &mut Strings| -> u64 {
        if let Some(&id) = location_of.get(name) {
            return id;
        }
        let parts = split_frame(name);
        let id = functions.len() as u64 + 1;
        functions.push(Function {
            id,
            name: strings.get(parts.function),
            system_name: strings.get(parts.function),
            filename: parts.file.map_or(0, |f| strings.get(f)),
        });
        locations.push(Location {
            id,
            line: vec![Line {
                function_id: id,
                line: parts.line.unwrap_or(0) as i64,
            }],
        });
        location_of.insert(name.to_owned(), id);
        id
    };
    let mut samples = Vec::new();
    for (s, _) in &d.rows {
        let mut frames: Vec<String> = Vec::new();
        if render.per_process {
            frames.push(format!(
                "{} (pid {})",
                comms.get(&s.pid).copied().unwrap_or("?"),
                s.pid
            ));
        }
        if d.all {
            frames.push(format!("[{}]", s.layer));
        }
        frames.extend(s.frames.iter().cloned());
        let location_id = frames
            .iter()
            .rev()
            .map(|f| location(f, &mut strings))
            .collect();
        let live_bytes = if render.metric == Metric::Resident && s.layer != "pages" {
            0
        } else {
            s.live_bytes
        };
        samples.push(Sample {
            location_id,
            value: vec![
                live_bytes as i64,
                s.live_count as i64,
                s.alloc_bytes as i64,
                s.allocs as i64,
            ],
            label: vec![
                Label {
                    key: strings.get("layer"),
                    str: strings.get(&s.layer),
                    num: 0,
                },
                Label {
                    key: strings.get("pid"),
                    str: 0,
                    num: s.pid as i64,
                },
            ],
        });
    }
    Profile {
        sample_type,
        sample: samples,
        location: locations,
        function: functions,
        string_table: strings.table,
        duration_nanos: (analysis.duration_s * 1e9) as i64,
        comment,
        default_sample_type,
    }
}

/// Writes the profile, gzipped.
pub fn write(analysis: &Analysis, render: &Render, out: &mut dyn Write) -> std::io::Result<()> {
    let bytes = profile(analysis, render).encode_to_vec();
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&bytes)?;
    gz.finish()?;
    Ok(())
}
