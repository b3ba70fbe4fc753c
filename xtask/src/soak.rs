//! `cargo xtask soak [--minutes N]`: pyleak on a leaking service with process churn
//! (tests/workloads/soak_service.py: a worker pool replacing its workers), traced by
//! cgroup for N minutes. Samples pyleak's resident memory and CPU every 10 s and prints
//! them; at the end checks that no event was lost (but returns of calls in flight when a
//! sampled-pymalloc window's probes went in, at most one per window) and nothing of
//! pyleak is left in the kernel. Not in CI (it runs minutes; `tests/tests/churn.rs` is its
//! short form); its figures go in docs/soak.md.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::root;

/// `cargo xtask soak`'s arguments.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long pyleak records.
    #[arg(long, default_value_t = 5)]
    minutes: u64,
}

/// pyleak's resident bytes, its anonymous resident bytes (its heap: the resident total
/// also counts the kernel's live-block table while pyleak has it mapped for a walk, up to
/// 80 MiB for a moment) and CPU seconds (user + system) so far, from /proc.
fn usage(pid: u32) -> Option<(u64, u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |field: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let (rss_kib, anon_kib) = (kib("VmRSS:")?, kib("RssAnon:")?);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15: 11 and 12 after the command.
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((rss_kib * 1024, anon_kib * 1024, ticks as f64 / hz))
}

/// Runs the soak and prints its table.
pub fn run(bin: &std::path::Path, args: &SoakArgs) -> anyhow::Result<()> {
    let group = PathBuf::from(format!(
        "/sys/fs/cgroup/unified/pyleak-soak-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&group).context("making the soak's cgroup")?;
    let script = root().join("tests/workloads/soak_service.py");
    let mut service = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec python3 {}",
            group.display(),
            script.display()
        ))
        .stdout(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    let json = root().join("target/soak.json");
    let seconds = args.minutes * 60;
    let mut pyleak = Command::new(bin)
        .args(["record", "-q", "--cgroup"])
        .arg(&group)
        .args(["-d", &seconds.to_string(), "--json"])
        .arg(&json)
        .stdout(Stdio::null())
        .spawn()?;
    let started = Instant::now();
    eprintln!(
        "xtask: soak: {} min; t_s, pyleak RSS MiB, of it anonymous MiB, CPU s, CPU % since last",
        args.minutes
    );
    let mut last = (0.0, 0.0);
    while pyleak.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_secs(10));
        if let Some((rss, anon, cpu)) = usage(pyleak.id()) {
            let t = started.elapsed().as_secs_f64();
            let pct = 100.0 * (cpu - last.1) / (t - last.0);
            eprintln!(
                "soak {t:6.0} {:8.1} {:8.1} {cpu:8.2} {pct:6.1}",
                rss as f64 / 1048576.0,
                anon as f64 / 1048576.0
            );
            last = (t, cpu);
        }
    }
    let status = pyleak.wait()?;
    let _ = service.kill();
    let _ = service.wait();
    // The pool's workers: end them with the group.
    let _ = std::fs::write(group.join("cgroup.kill"), "1");
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::fs::remove_dir(&group);
    if !status.success() {
        bail!("pyleak failed: {status}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let processes = report["processes"].as_array().map_or(0, Vec::len);
    let retired = report["retired"]["processes"].as_u64().unwrap_or(0);
    eprintln!(
        "xtask: soak: {} processes seen ({processes} in the report, {retired} retired: {}), lost events {}, {}",
        processes as u64 + retired,
        report["retired"]["live_bytes"],
        report["lost_events"],
        report["lost"]
    );
    // Each worker keeps a 1000-byte bytes object per task at task()'s first line: a
    // malloc block under its Python frame, in the libc layer (exact).
    let pids: Vec<u64> = report["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    let named = |pid: u64, prefix: &str| {
        report["stacks"].as_array().into_iter().flatten().any(|s| {
            s["pid"] == pid
                && s["layer"] == "libc"
                && s["frames"]
                    .as_array()
                    .and_then(|f| f.last())
                    .and_then(|f| f.as_str())
                    .is_some_and(|f| f.starts_with(prefix))
        })
    };
    let leaking = pids.iter().filter(|&&p| named(p, "task (")).count();
    let unnamed = pids.iter().filter(|&&p| named(p, "[python code")).count();
    eprintln!(
        "xtask: soak: processes in the report with live bytes at task(): {leaking}; with unnamed Python frames: {unnamed}"
    );
    let left = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()?;
    let links: serde_json::Value = serde_json::from_slice(&left.stdout)?;
    eprintln!(
        "xtask: soak: BPF links on the host after pyleak's exit: {}",
        links.as_array().map_or(0, Vec::len)
    );
    // A return whose call began before its probe went in is counted (`unmatched_return`):
    // sampled pymalloc's windows attach probes every ~2 s, and a call in flight then can
    // return unmatched. Anything else lost, or more of those than windows opened, fails.
    let lost = report["lost"].as_object().cloned().unwrap_or_default();
    let windows = report["sampled_pymalloc"]["windows"].as_u64().unwrap_or(0);
    for (reason, n) in &lost {
        let n = n.as_u64().unwrap_or(0);
        let allowed = if reason == "unmatched_return" {
            windows
        } else {
            0
        };
        if n > allowed {
            bail!("events were lost: {n} {reason} ({windows} windows opened)");
        }
    }
    Ok(())
}
