//! `cargo xtask soak [--minutes N]`: pyleak on a leaking service with process churn
//! (tests/workloads/soak_service.py: a worker pool replacing its workers), traced by
//! cgroup for N minutes. Samples pyleak's resident memory and CPU every 10 s and prints
//! them; then stops the service (every worker exits and writes what it kept), stops pyleak
//! and checks: every worker's leak against its truth, nothing lost, pyleak's anonymous
//! memory flat once its growth timeline is full, nothing of pyleak left in the kernel.
//! Its default length is [`CI_MINUTES`] (CI does not run it yet: docs/soak.md); its
//! figures go in docs/soak.md.

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;

use crate::root;

/// How long `cargo xtask test` soaks.
pub const CI_MINUTES: u64 = 5;

/// From here on pyleak's anonymous memory must be flat: its growth timeline is full (128
/// samples 2 s apart, `MAX_SAMPLES` in pyleak-user/src/analysis/growth.rs: past that every
/// other sample is dropped, so no series grows) at 256 s, and the 64 exited processes kept
/// whole are reached within the first minute. docs/soak.md's 6-minute run: 86.1 MiB at
/// 240 s, 89.5 MiB at 260 s and at every sample up to 360 s.
const FLAT_FROM_S: f64 = 270.0;

/// How much pyleak's anonymous memory may grow from [`FLAT_FROM_S`] to the end: allocator
/// slack (the 6-minute run moved 0.0 MiB in those 100 s), far below what one more minute
/// of unbounded per-worker state cost before the fixes (~15 MiB a minute).
const FLAT_SLACK: u64 = 4 << 20;

/// What some workers leave less than others besides their leak, (bytes, blocks): two
/// 32-byte locks that `threading` makes again after a fork for each `Condition` alive then
/// (`Condition._at_fork_reinit`, threading.py:268 in 3.11), absent in ~3% of workers (4
/// of 127 in a 1-minute run with none retired: every worker kept whole left 4480 B in 13
/// blocks besides its leak, or 4416 B in 11). A run's kept workers may all be of the
/// common kind.
const AFTER_FORK_VARIANT: (u64, u64) = (64, 2);

/// `cargo xtask soak`'s arguments.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the service runs traced.
    #[arg(long, default_value_t = CI_MINUTES)]
    pub minutes: u64,
    /// The CPython running the service (default: pyenv's 3.11.7, else `python3`).
    #[arg(long)]
    pub python: Option<PathBuf>,
}

/// One sample of pyleak's usage.
struct Usage {
    /// Seconds since pyleak started.
    t: f64,
    /// Resident bytes.
    rss: u64,
    /// Anonymous resident bytes (its heap: the resident total also counts the kernel's
    /// live-block table while pyleak has it mapped for a walk, up to 80 MiB for a moment).
    anon: u64,
    /// CPU seconds (user + system) so far.
    cpu: f64,
}

/// pyleak's resident bytes, anonymous resident bytes and CPU seconds, from /proc.
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

/// BPF program and link ids process `pid` holds, from its descriptors' fdinfo (`prog_id:`,
/// `link_id:`: `bpf_prog_show_fdinfo`, `bpf_link_show_fdinfo` in kernel/bpf/syscall.c).
fn held_ids(pid: u32) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let (mut progs, mut links) = (BTreeSet::new(), BTreeSet::new());
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (progs, links);
    };
    for fd in fds.flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        if target != "anon_inode:bpf-prog" && target != "anon_inode:bpf_link" {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        for l in info.lines() {
            let id = |key: &str| l.strip_prefix(key).and_then(|v| v.trim().parse().ok());
            if let Some(id) = id("prog_id:") {
                progs.insert(id);
            }
            if let Some(id) = id("link_id:") {
                links.insert(id);
            }
        }
    }
    (progs, links)
}

/// `bpftool -j OBJECT show`'s ids (`prog`, `link`).
fn kernel_ids(object: &str) -> anyhow::Result<BTreeSet<u64>> {
    let out = Command::new("bpftool")
        .args(["-j", object, "show"])
        .output()
        .context("running bpftool")?;
    let list: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool -j {object} show: not JSON"))?;
    Ok(list
        .as_array()
        .context("bpftool: not a list")?
        .iter()
        .filter_map(|v| v["id"].as_u64())
        .collect())
}

/// What each worker kept, as it wrote at exit, in the order they exited: (pid, objects,
/// bytes). A pid may come twice (pids wrap at `kernel.pid_max`, 32768 here, within an hour
/// of churn on a busy host).
type Truth = Vec<(u64, u64, u64)>;

fn read_truth(path: &Path) -> anyhow::Result<Truth> {
    let text = std::fs::read_to_string(path).context("reading the workers' truth")?;
    let mut out = Truth::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).context("a truth line")?;
        let field = |k: &str| v[k].as_u64().with_context(|| format!("{k} in {line}"));
        out.push((field("pid")?, field("kept")?, field("bytes")?));
    }
    Ok(out)
}

/// Runs the soak, prints its table and fails if a check fails.
pub fn run(bin: &Path, args: &SoakArgs) -> anyhow::Result<()> {
    let python = args.python.clone().unwrap_or_else(|| {
        let pyenv = std::env::var_os("PYENV_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root/.pyenv"));
        let p = pyenv.join("versions/3.11.7/bin/python3");
        if p.exists() {
            p
        } else {
            PathBuf::from("python3")
        }
    });
    let group = PathBuf::from(format!(
        "/sys/fs/cgroup/unified/pyleak-soak-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&group).context("making the soak's cgroup")?;
    let script = root().join("tests/workloads/soak_service.py");
    // Per run (two soaks may run at once, e.g. the hour and a short one).
    let id = std::process::id();
    let (truth, stop) = (
        root().join(format!("target/soak-{id}-truth.jsonl")),
        root().join(format!("target/soak-{id}-stop")),
    );
    let go = root().join(format!("target/soak-{id}-stop.go"));
    for f in [&truth, &stop, &go] {
        let _ = std::fs::remove_file(f);
    }
    let mut service = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
        .arg(&group)
        .arg(&python)
        .arg(&script)
        .arg(&truth)
        .arg(&stop)
        .stdout(Stdio::null())
        .spawn()?;
    let json = root().join(format!("target/soak-{id}.json"));
    let mut pyleak = Command::new(bin)
        .args(["record", "-q", "--cgroup"])
        .arg(&group)
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    // The pool starts once pyleak traces: every worker is forked under its probes.
    let mut lines = BufReader::new(pyleak.stderr.take().context("pyleak's stderr")?).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("pyleak: tracing") => break,
            Some(Ok(l)) => eprintln!("{l}"),
            _ => bail!("pyleak exited before tracing: {:?}", pyleak.wait()?),
        }
    }
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));
    std::fs::write(&go, b"")?;
    let started = Instant::now();
    let seconds = args.minutes as f64 * 60.0;
    eprintln!(
        "xtask: soak: {} min, {}; t_s, pyleak RSS MiB, of it anonymous MiB, CPU s, CPU % since last",
        args.minutes,
        python.display()
    );
    let mut samples: Vec<Usage> = Vec::new();
    let (mut progs, mut links) = (BTreeSet::new(), BTreeSet::new());
    while started.elapsed().as_secs_f64() < seconds {
        std::thread::sleep(Duration::from_secs(10));
        if pyleak.try_wait()?.is_some() {
            break;
        }
        let (p, l) = held_ids(pyleak.id());
        progs.extend(p);
        links.extend(l);
        if let Some((rss, anon, cpu)) = usage(pyleak.id()) {
            let t = started.elapsed().as_secs_f64();
            let (t0, c0) = samples.last().map_or((0.0, 0.0), |u| (u.t, u.cpu));
            eprintln!(
                "soak {t:6.0} {:8.1} {:8.1} {cpu:8.2} {:6.1}",
                rss as f64 / 1048576.0,
                anon as f64 / 1048576.0,
                100.0 * (cpu - c0) / (t - t0)
            );
            samples.push(Usage { t, rss, anon, cpu });
        }
    }
    // Stop the service: its workers finish their tasks, exit and write their truth; the
    // parent stays (idle) until pyleak has stopped.
    std::fs::write(&stop, b"")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let only_parent = || {
        std::fs::read_to_string(group.join("cgroup.procs"))
            .is_ok_and(|p| p.trim() == service.id().to_string())
    };
    while !only_parent() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let service_ended = only_parent();
    // A few of pyleak's 1 s ticks see the last workers reaped, and a growth sample (2 s
    // apart) names their stacks.
    std::thread::sleep(Duration::from_secs(5));
    // SAFETY: signalling the pyleak we started.
    unsafe { libc::kill(pyleak.id() as libc::pid_t, libc::SIGINT) };
    let stopping = Instant::now();
    let (status, peak_kib) = wait_with_peak(pyleak.id())?;
    eprintln!(
        "xtask: soak: pyleak wrote its report and exited {:.1} s after SIGINT; its peak resident memory over the run (mostly the report's) {:.1} MiB",
        stopping.elapsed().as_secs_f64(),
        peak_kib as f64 / 1024.0
    );
    let _ = std::fs::write(group.join("cgroup.kill"), "1");
    let _ = service.kill();
    let _ = service.wait();
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::fs::remove_dir(&group);
    ensure!(status.success(), "pyleak failed: {status}");
    ensure!(
        service_ended,
        "the service's workers did not stop within 60 s"
    );

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let truth = read_truth(&truth)?;
    let mut failures = Vec::new();
    check_workers(&report, &truth, &script, &mut failures);
    check_lost(&report, &mut failures);
    check_flat(&samples, &mut failures);
    // Nothing pyleak held is left in the kernel (other people's programs may be).
    let left_progs: Vec<u64> = kernel_ids("prog")?.intersection(&progs).copied().collect();
    let left_links: Vec<u64> = kernel_ids("link")?.intersection(&links).copied().collect();
    let events = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    eprintln!(
        "xtask: soak: pyleak held {} programs and {} links; left after its exit: {left_progs:?}, {left_links:?}",
        progs.len(),
        links.len()
    );
    if progs.is_empty() || links.is_empty() {
        failures.push("pyleak was never seen holding programs and links".to_owned());
    }
    if !left_progs.is_empty() || !left_links.is_empty() || !events.trim().is_empty() {
        failures.push(format!(
            "left in the kernel: programs {left_progs:?}, links {left_links:?}, uprobe_events {events:?}"
        ));
    }
    if !failures.is_empty() {
        bail!("soak failed:\n  {}", failures.join("\n  "));
    }
    eprintln!("xtask: soak: every check passed");
    Ok(())
}

/// Every worker's leak against the truth it wrote: workers kept whole in the report have
/// exactly their bytes and blocks at task()'s keeping line in the libc layer; the retired
/// ones' libc total is their truths' sum plus, each, what a kept worker left besides its
/// leak (between the least and the most of that).
fn check_workers(report: &Value, truth: &Truth, script: &Path, failures: &mut Vec<String>) {
    let text = std::fs::read_to_string(script).unwrap_or_default();
    let line = text
        .lines()
        .position(|l| l.contains("= bytes(1000)"))
        .map_or(0, |i| i + 1);
    let leaf = format!("task ({}:{line})", script.display());
    let in_report: BTreeSet<u64> = report["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    // Per pid, libc live (bytes, blocks): at the leaf, elsewhere, at an unnamed Python leaf.
    let mut libc: HashMap<u64, [(u64, u64); 3]> = HashMap::new();
    for s in report["stacks"].as_array().into_iter().flatten() {
        let (Some(pid), true) = (s["pid"].as_u64(), s["layer"] == "libc") else {
            continue;
        };
        let last = s["frames"]
            .as_array()
            .and_then(|f| f.last())
            .and_then(|f| f.as_str())
            .unwrap_or("");
        let slot = if last == leaf {
            0
        } else if last.starts_with("[python code") {
            2
        } else {
            1
        };
        let e = &mut libc.entry(pid).or_default()[slot];
        e.0 += s["live_bytes"].as_u64().unwrap_or(0);
        e.1 += s["live_count"].as_u64().unwrap_or(0);
    }
    // What a kept-whole exact worker left besides its leak, (bytes, blocks): least, most.
    let (mut exact, mut wrong) = (0, Vec::new());
    let (mut other_min, mut other_max) = ((u64::MAX, u64::MAX), (0u64, 0u64));
    let (mut retired_n, mut retired_bytes, mut retired_kept) = (0u64, 0u64, 0u64);
    // Of a pid that came twice, only the last process can be in the report.
    let last: HashMap<u64, usize> = truth.iter().enumerate().map(|(i, t)| (t.0, i)).collect();
    for (i, &(pid, kept, bytes)) in truth.iter().enumerate() {
        if !in_report.contains(&pid) || last[&pid] != i {
            retired_n += 1;
            retired_bytes += bytes;
            retired_kept += kept;
            continue;
        }
        let [at, other, unnamed] = libc.get(&pid).copied().unwrap_or_default();
        if at == (bytes, kept) {
            exact += 1;
            let o = (other.0 + unnamed.0, other.1 + unnamed.1);
            other_min = (other_min.0.min(o.0), other_min.1.min(o.1));
            other_max = (other_max.0.max(o.0), other_max.1.max(o.1));
        } else {
            wrong.push(format!(
                "pid {pid}: {} B in {} blocks at {leaf}, truth {bytes} B in {kept} (unnamed Python leaf: {} B)",
                at.0, at.1, unnamed.0
            ));
        }
    }
    let kept_whole = truth.len() as u64 - retired_n;
    eprintln!(
        "xtask: soak: {} processes seen ({} in the report, {} retired); {} workers wrote their truth: {kept_whole} kept whole, {exact} of them exact at {leaf}; {retired_n} retired",
        in_report.len() as u64 + report["retired"]["processes"].as_u64().unwrap_or(0),
        in_report.len(),
        report["retired"]["processes"],
        truth.len()
    );
    if truth.is_empty() || kept_whole == 0 {
        failures.push("no worker's truth to check".to_owned());
    }
    if !wrong.is_empty() {
        failures.push(format!(
            "{} of {kept_whole} workers kept whole are not exact:\n    {}",
            wrong.len(),
            wrong.join("\n    ")
        ));
    }
    // Retired: every process of the group but the dispatching parent is a worker.
    let retired = &report["retired"];
    let processes = retired["processes"].as_u64().unwrap_or(0);
    if processes != retired_n {
        failures.push(format!(
            "{processes} processes retired, {retired_n} workers not in the report"
        ));
    }
    let (bytes, blocks) = (
        retired["live_bytes"]["libc"].as_u64().unwrap_or(0),
        retired["live_count"]["libc"].as_u64().unwrap_or(0),
    );
    // Each retired worker left its truth and what a kept one leaves besides (the pool's
    // bootstrap: 4480 B in 13 blocks of `multiprocessing` and `threading`, or
    // [`AFTER_FORK_VARIANT`] less), so the sum is bounded by the least and the most.
    let n = retired_n;
    let least = (
        other_min
            .0
            .min(other_max.0)
            .saturating_sub(AFTER_FORK_VARIANT.0),
        other_min
            .1
            .min(other_max.1)
            .saturating_sub(AFTER_FORK_VARIANT.1),
    );
    let (lo, hi) = (
        (retired_bytes + n * least.0, retired_kept + n * least.1),
        (
            retired_bytes + n * other_max.0,
            retired_kept + n * other_max.1,
        ),
    );
    eprintln!(
        "xtask: soak: retired libc {bytes} B in {blocks} blocks; their truths {retired_bytes} B in {retired_kept}; a worker's other libc {}-{} B in {}-{} blocks",
        least.0, other_max.0, least.1, other_max.1
    );
    if !(lo.0..=hi.0).contains(&bytes) || !(lo.1..=hi.1).contains(&blocks) {
        failures.push(format!(
            "retired libc {bytes} B in {blocks} blocks, expected {}-{} B in {}-{} blocks (their truths {retired_bytes} B in {retired_kept} and what a kept worker leaves besides)",
            lo.0, hi.0, lo.1, hi.1
        ));
    }
}

/// Nothing lost, but returns of calls in flight when a sampled-pymalloc window's probes
/// went in (`unmatched_return`, at most one per window: docs/soak.md).
fn check_lost(report: &Value, failures: &mut Vec<String>) {
    let windows = report["sampled_pymalloc"]["windows"].as_u64().unwrap_or(0);
    eprintln!(
        "xtask: soak: lost {} in {windows} sampled-pymalloc windows",
        report["lost"]
    );
    let Some(lost) = report["lost"].as_object() else {
        failures.push("the report has no `lost`".to_owned());
        return;
    };
    for (reason, n) in lost {
        let n = n.as_u64().unwrap_or(0);
        let allowed = if reason == "unmatched_return" {
            windows
        } else {
            0
        };
        if n > allowed {
            failures.push(format!("lost {n} to {reason} ({windows} windows opened)"));
        }
    }
}

/// Waits for `pid` (a child of ours) and returns its exit status and its peak resident
/// memory in KiB (`ru_maxrss` of wait4(2): the high-water mark over its whole life, which
/// the sampling every 10 s misses when it is the final report's).
fn wait_with_peak(pid: u32) -> anyhow::Result<(std::process::ExitStatus, i64)> {
    use std::os::unix::process::ExitStatusExt as _;
    let mut status = 0;
    // SAFETY: rusage is plain old data, filled by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child with valid out-pointers.
        let got = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
        if got == pid as libc::pid_t {
            return Ok((std::process::ExitStatus::from_raw(status), usage.ru_maxrss));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("waiting for pyleak");
        }
    }
}

/// pyleak's anonymous memory grows at most [`FLAT_SLACK`] from [`FLAT_FROM_S`] (or the
/// run's half, if later) on.
fn check_flat(samples: &[Usage], failures: &mut Vec<String>) {
    // A long run is judged on its second half: the hour's curve stepped up twice more
    // (+5.6 and +11.2 MiB at 350-400 s, about the timeline's second halving) and was flat
    // from then on.
    let half = samples.last().map_or(0.0, |u| u.t / 2.0);
    let Some(from) = samples.iter().find(|u| u.t >= FLAT_FROM_S.max(half)) else {
        eprintln!("xtask: soak: shorter than {FLAT_FROM_S} s: flatness not checked");
        return;
    };
    let end = samples.last().expect("a sample past FLAT_FROM_S");
    let grew = end.anon as i64 - from.anon as i64;
    let cpu = 100.0 * (end.cpu - from.cpu) / (end.t - from.t).max(1.0);
    eprintln!(
        "xtask: soak: from {:.0} s to {:.0} s: anonymous {:.1} -> {:.1} MiB (RSS {:.1} -> {:.1}), CPU {cpu:.1}% of one core",
        from.t,
        end.t,
        from.anon as f64 / 1048576.0,
        end.anon as f64 / 1048576.0,
        from.rss as f64 / 1048576.0,
        end.rss as f64 / 1048576.0,
    );
    if grew > FLAT_SLACK as i64 {
        failures.push(format!(
            "pyleak's anonymous memory grew {:.1} MiB after {:.0} s (at most {} MiB)",
            grew as f64 / 1048576.0,
            from.t,
            FLAT_SLACK >> 20
        ));
    }
}
