//! `pyleak census`: live Python objects by type, from outside, and what holds the growing
//! ones. Takes `--count` censuses `--interval` seconds apart (`python::census::take`:
//! the target is stopped while its memory is copied, then parsed while it runs), then
//! prints per type count, bytes and growth, and the holders that grow fastest
//! (`report`). Needs no eBPF; needs the right to read the target's memory (root).

mod report;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::Args;

use crate::{
    attach,
    errors::UserError,
    python::{self, census::CensusError},
    targets,
};

pub use report::Report;

/// `pyleak census`.
#[derive(Debug, Args)]
pub struct CensusArgs {
    /// The Python process to count.
    #[arg(short, long, value_name = "PID")]
    pub pid: u32,
    /// Seconds between censuses.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub interval: f64,
    /// How many censuses to take (growth needs two or more).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub count: u32,
    /// Write the censuses, growth and holders as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Types and holders shown.
    #[arg(long, default_value_t = 15, value_name = "K")]
    pub top: usize,
    /// Do not stop the target while its memory is copied (a census may then see objects
    /// half-made, counted as unreadable).
    #[arg(long)]
    pub no_pause: bool,
}

/// Runs `pyleak census`; the exit status.
pub fn run(args: &CensusArgs) -> anyhow::Result<i32> {
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err(UserError::BadInterval(args.interval).into());
    }
    if args.count == 0 {
        return Err(UserError::BadCount(args.count).into());
    }
    let pid = args.pid;
    if !targets::alive(pid) {
        return Err(UserError::NoSuchPid(pid).into());
    }
    let files = attach::mapped_files(pid).map_err(|_| UserError::MemoryUnreadable(pid))?;
    let rt = match python::detect(&files) {
        None => {
            let deleted = attach::deleted_runtime_files(pid);
            return Err(
                match deleted.iter().find(|f| !attach::is_libc(Path::new(f))) {
                    Some(f) => UserError::RuntimeDeleted(pid, f.clone()),
                    None => UserError::NotPython(pid),
                }
                .into(),
            );
        }
        Some(python::Detected::Unsupported { version, .. }) => {
            return Err(UserError::CensusUnsupported { pid, version }.into())
        }
        Some(python::Detected::Supported(rt)) => rt,
    };
    let version = python::version_name(rt.cpython.version());
    if rt.cpython.heap_layout().is_none() {
        return Err(UserError::CensusUnsupported { pid, version }.into());
    }
    let bias = python::load_bias(pid, &rt).ok_or(UserError::ProcessGone(pid))?;
    let mut report = Report::new(pid, version);
    let start = Instant::now();
    for i in 0..args.count {
        if i > 0 {
            let due = start + Duration::from_secs_f64(args.interval * f64::from(i));
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let time_s = start.elapsed().as_secs_f64();
        let exited = || UserError::ExitedDuringCensus {
            pid,
            at: i + 1,
            count: args.count,
        };
        let census = match python::census::take(pid, &rt, bias, !args.no_pause) {
            Ok(c) => c,
            Err(_) if !targets::alive(pid) => return Err(exited().into()),
            Err(CensusError::Gone(e)) if e.raw_os_error() == Some(libc::EPERM) => {
                return Err(UserError::MemoryUnreadable(pid).into())
            }
            Err(CensusError::Gone(_)) => return Err(exited().into()),
            Err(CensusError::NoInterpreter(what)) => {
                let what = what.to_owned();
                return Err(UserError::NoInterpreter { pid, what }.into());
            }
        };
        log::info!(
            "census {}: {} objects, copied {} bytes, paused {:.1} ms, parsed in {:.0} ms",
            i + 1,
            census.objects,
            census.copy.bytes,
            census.copy.paused_ms,
            census.parse_ms
        );
        let time_s = census
            .copy
            .read_at
            .map_or(time_s, |at| at.duration_since(start).as_secs_f64());
        report.add(time_s, census);
    }
    let out = report.finish(args.top);
    print!("{}", out.text(args.top));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&out.json()).expect("plain JSON values");
        // Written whole or not at all, mode 0600, never through a planted symlink.
        crate::report::file::OutputFile::create(path, 0o600)?
            .commit(|w| w.write_all((json + "\n").as_bytes()))?;
    }
    Ok(0)
}
