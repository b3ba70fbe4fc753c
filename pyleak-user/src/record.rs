//! `pyleak record`: attach, trace until the end, report.

use std::{
    collections::HashMap,
    fs::File,
    io::{IsTerminal as _, Write as _},
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use pyleak_common::{Layer, PyProc, MAX_NATIVE_FRAMES};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    allocwatch::AllocWatch,
    analysis::sampler::Sampler,
    attach::{
        self, elf::ElfFile, tables::Domain, ProbeSpec, LIBC_FUNCTIONS, PYMALLOC_FUNCTIONS,
        PYMALLOC_TABLE_FUNCTIONS, PYMEM_RAW_FUNCTIONS, PYMEM_RAW_TABLE_FUNCTIONS,
    },
    cli::{PymallocMode, RecordArgs},
    collect::{Filter, Recorder, RecorderOptions},
    errors::UserError,
    follow::Group,
    group, launch,
    layers::LayerSet,
    python,
    report::{self, human_bytes},
    symbolize::Symbolizer,
};

/// How often the status line and the memory-map snapshots refresh.
const TICK: Duration = Duration::from_secs(1);
/// Memory maps are re-read at most this often while events flow (new libraries).
const MAPS_REFRESH: Duration = Duration::from_millis(20);
/// How long a launched command gets to exit after pyleak forwards Ctrl-C/SIGTERM.
const CHILD_GRACE: Duration = Duration::from_secs(2);

/// Why a recording ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Duration,
    Signal,
    TargetsExited,
}

/// How the recording is shown while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// A status line on stderr (`pyleak record`).
    StatusLine,
    /// A full-screen live view (`pyleak top`).
    Top,
}

/// Runs `pyleak record` (or `top`); returns the exit code.
pub fn run(args: RecordArgs, view: View) -> anyhow::Result<i32> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(UserError::NotRoot.into());
    }
    // Launching: every layer. Attaching: pymalloc when it is sampled (a few percent of
    // CPU), not pymem_raw; not pymalloc at all when every call would trap.
    let sampled = args.pymalloc == PymallocMode::Sampled && !args.bare;
    let layers = match &args.layers {
        Some(l) => LayerSet::parse(l)?,
        None if args.command.is_empty() && sampled => LayerSet::parse("pymalloc,libc,vm,pages")?,
        None if args.command.is_empty() => LayerSet::parse("libc,vm,pages")?,
        None => LayerSet::ALL,
    };
    if sampled
        && !(args.pymalloc_window > 0.0
            && args.pymalloc_period > args.pymalloc_window
            && args.pymalloc_period.is_finite())
    {
        return Err(UserError::BadWindow {
            window: args.pymalloc_window,
            period: args.pymalloc_period,
        }
        .into());
    }
    if !args.pids.is_empty() && !args.command.is_empty() {
        return Err(UserError::PidAndCommand.into());
    }
    let kinds = [
        !args.pids.is_empty(),
        !args.command.is_empty(),
        args.cgroup.is_some(),
        args.container.is_some(),
        args.all,
    ];
    if kinds.iter().filter(|k| **k).count() > 1 {
        return Err(UserError::TooManyTargets.into());
    }
    let cgroup = match (&args.cgroup, &args.container) {
        (Some(path), _) => Some(group::resolve(path)?),
        (_, Some(id)) => Some(group::resolve_container(id)?),
        _ => None,
    };
    let group_mode = cgroup.is_some() || args.all;
    for &pid in &args.pids {
        if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(UserError::NoSuchPid(pid).into());
        }
    }
    let program = match args.command.first() {
        Some(cmd) if cmd.is_empty() => return Err(UserError::EmptyCommand.into()),
        Some(cmd) => Some(
            attach::resolve_command(cmd).ok_or_else(|| UserError::CommandNotFound(cmd.clone()))?,
        ),
        None if args.pids.is_empty() && !group_mode => {
            return Err(if std::env::args().any(|a| a == "--") {
                UserError::EmptyCommand
            } else {
                UserError::NoTarget
            }
            .into())
        }
        None => None,
    };
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err(UserError::BadInterval(args.interval).into());
    }
    if !(args.min_age >= 0.0 && args.min_age.is_finite()) {
        return Err(UserError::BadMinAge(args.min_age).into());
    }
    // Open outputs first: a bad path fails before anything is traced.
    let folded_out = args.output.as_deref().map(create_output).transpose()?;
    let json_out = args.json.as_deref().map(create_output).transpose()?;
    let snapshots_out = args.snapshots.as_deref().map(create_output).transpose()?;

    let syms = Arc::new(Mutex::new(Symbolizer::default()));
    let mut child = match &program {
        Some(p) => {
            let syms = Arc::clone(&syms);
            let on_exit = move |pid| lock(&syms).snapshot(pid);
            Some(launch::spawn_paused(p, &args.command, on_exit)?)
        }
        None => None,
    };
    let filter = match (&cgroup, args.all) {
        (Some(cg), _) => Filter::Cgroup {
            id: cg.id,
            level: cg.level,
        },
        (None, true) => Filter::PidSet,
        (None, false) => Filter::Pids,
    };
    let opts = RecorderOptions {
        layers,
        native_depth: args.native_depth.clamp(1, MAX_NATIVE_FRAMES as u32),
        bare: args.bare,
        filter,
        pymalloc_sampled: sampled && layers.contains(Layer::Pymalloc),
    };
    let mut rec = Recorder::load(opts)?;
    let mut planner = Planner::new(layers);
    let mut resolver = python::Resolver::default();
    let mut unplaced: HashMap<u32, (python::PythonRuntime, PyProc)> = HashMap::new();
    let mut group = group_mode.then(|| Group::new(cgroup.clone(), layers, !args.no_python_stacks));
    if let Some(g) = group.as_mut() {
        g.scan(&mut rec, &mut resolver, &syms);
        if g.probed.is_empty() {
            // No process to learn a libc from yet: the host's (pyleak's own) is the likely
            // one, and attaching a file-wide probe takes long enough (a breakpoint in every
            // process mapping it) that a process starting later would run ahead of it.
            g.probe_own_libc(&mut rec);
        }
    }
    let mut watches: Vec<AllocWatch> = Vec::new();
    match (&program, &child) {
        (Some(p), Some(c)) => {
            let files = attach::libraries_of(&attach::program_of(p));
            watches.extend(watch(c.pid, &files));
            let mut probes = planner.plan(&files);
            warn_missing(&probes, layers, &p.display().to_string());
            if let Some(rt) = python_runtime(
                &mut rec,
                c.pid,
                &files,
                &p.display().to_string(),
                !args.no_python_stacks,
            ) {
                // Where the runtime lands is known once the command runs: a probe at
                // interpreter start-up tells the kernel.
                let layout = rt.walk;
                rec.set_python(
                    c.pid,
                    &PyProc {
                        runtime_vaddr: rt.runtime_vaddr,
                        bias: 0,
                        ..layout
                    },
                )?;
                if let Ok(elf) = ElfFile::open(&rt.file) {
                    probes.extend(attach::plan_py_init(&elf));
                }
                resolver.add_process(c.pid, &rt);
                // ...or pyleak reads it from the memory map first (an LTO build may have
                // inlined the probed function away).
                unplaced.insert(c.pid, (rt.clone(), layout));
            }
            rec.add_target(c.pid, &probes)?;
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            rec.set_comm(c.pid, &name);
        }
        _ => {
            for &pid in &args.pids {
                let files = attach::mapped_files(pid).map_err(|_| UserError::ProcessGone(pid))?;
                watches.extend(watch(pid, &files));
                let probes = planner.plan(&files);
                warn_missing(&probes, layers, &format!("process {pid}"));
                if let Some(rt) = python_runtime(
                    &mut rec,
                    pid,
                    &files,
                    &format!("process {pid}"),
                    !args.no_python_stacks,
                ) {
                    let bias = python::load_bias(pid, &rt).ok_or(UserError::ProcessGone(pid))?;
                    rec.set_python(pid, &placed(pid, &rt, bias, rt.walk))?;
                    resolver.add_process(pid, &rt);
                }
                rec.add_target(pid, &probes)?;
            }
        }
    }
    for p in rec.probes.iter().filter(|p| !p.emulated) {
        log::info!(
            "{}: {} probed at a single-stepped instruction (slower)",
            p.path.display(),
            p.symbol
        );
    }
    let what = match (&program, &group) {
        (_, Some(g)) => {
            eprintln!("pyleak: note: probes sit on whole files (libc, libpython): every process on this host that maps them traps on each call, and only the traced ones are counted");
            let n = g.tracked();
            match &g.cgroup {
                Some(cg) => format!(
                    "cgroup {} ({n} process{} now, and any started in it later)",
                    cg.path,
                    if n == 1 { "" } else { "es" }
                ),
                None => format!("every Python process ({n} now, and any started later)"),
            }
        }
        (Some(p), _) => format!(
            "{} (pid {})",
            p.display(),
            child.as_ref().map_or(0, |c| c.pid)
        ),
        (None, None) => format!(
            "pid {}",
            args.pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    // Always said (even with -q): scripts wait for this line before starting the work.
    eprintln!(
        "pyleak: tracing {what}, layers {}, {} uprobes attached in {:.2} s ({}){}; Ctrl-C to stop",
        layers.names(),
        rec.probes.len(),
        rec.attach_s,
        if rec.multi_links() {
            "multi-uprobe links"
        } else {
            "one perf event each"
        },
        if rec.samples_pymalloc() {
            " (pymalloc sampled in windows: live bytes are estimates; --pymalloc exact traps every call, 10-25x CPU on allocation-heavy code)"
        } else if args.layers.is_none() && args.command.is_empty() && !args.bare {
            " (add the Python allocator layers with --layers all: a trap per Python allocation)"
        } else {
            ""
        }
    );
    if let Some(c) = child.as_mut() {
        c.start()?;
    }
    let launched = child.as_mut().and_then(|c| Some((c.pid, c.exited.take()?)));
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut sampler = Sampler::new(
        &args,
        view,
        started,
        snapshots_out.map(|f| (f, args.snapshots.clone().unwrap_or_default())),
    );
    let mut runtimes = Runtimes {
        unplaced: &mut unplaced,
        watches: &mut watches,
    };
    let end = runtime.block_on(trace_loop(
        &mut rec,
        &syms,
        &mut resolver,
        match group.as_mut() {
            Some(g) => Follow::Group(g),
            None => Follow::Pids(&mut runtimes),
        },
        &args,
        launched,
        &mut sampler,
    ));
    sampler.close_view();
    let end = end?;
    let duration_s = started.elapsed().as_secs_f64();
    log::debug!("recording ended: {end:?}");

    if let Some(g) = group.as_mut() {
        // Processes that started while the recording ended are part of it too.
        rec.drain();
        g.poll(&mut rec, &mut resolver, &syms);
        g.scan(&mut rec, &mut resolver, &syms);
    }
    rec.freeze_all()?;
    let snap = rec.snapshot((args.min_age * 1e9) as u64)?;
    learn_new_stacks(&mut rec, &mut resolver);
    if args.bare {
        return Ok(0);
    }
    sampler.error?;
    let syms = lock(&syms);
    let mut report = report::build(
        &rec,
        &snap,
        &syms,
        &resolver,
        &sampler.timeline,
        report::BuildOptions {
            native: args.native,
            duration_s,
            min_age_s: args.min_age,
            interval_s: args.interval,
        },
    );
    // The targets are frozen in the kernel: let the command go, take the uprobes out (one
    // grace period per multi-uprobe link; ~0.1 s per probe with perf events), then write
    // the report.
    drop(child);
    report.probes_detach_s = rec.detach_probes();
    log::info!("probes detached in {:.3} s", report.probes_detach_s);

    let stdout = std::io::stdout();
    report::text::write(&report, &mut stdout.lock())?;
    if let (Some(mut f), Some(path)) = (folded_out, args.output.as_deref()) {
        report::write_flamegraph(&report, args.metric, args.per_process, path, &mut f)?;
    }
    if let (Some(mut f), Some(path)) = (json_out, args.json.as_deref()) {
        serde_json::to_writer_pretty(&mut f, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(f))
            .and_then(|()| f.flush())
            .map_err(|e| UserError::Output {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
    }
    std::io::stdout().flush()?;
    drop(rec);
    Ok(0)
}

/// Plans probes per file, once per file.
struct Planner {
    layers: LayerSet,
    cache: HashMap<PathBuf, Vec<ProbeSpec>>,
}

impl Planner {
    fn new(layers: LayerSet) -> Planner {
        Planner {
            layers,
            cache: HashMap::new(),
        }
    }

    /// Probes for the files a process maps (or will map).
    fn plan(&mut self, files: &[PathBuf]) -> Vec<ProbeSpec> {
        let mut out = Vec::new();
        for f in files {
            let layers = self.layers;
            let probes = self
                .cache
                .entry(f.clone())
                .or_insert_with(|| plan_file(layers, f, f));
            out.extend(probes.iter().cloned());
        }
        out
    }
}

/// Probes for one file (named `file`, read through `via`): its libc functions, its
/// Python allocator functions and interpreter shutdown.
pub(crate) fn plan_file(layers: LayerSet, file: &Path, via: &Path) -> Vec<ProbeSpec> {
    let Ok(elf) = ElfFile::open(via) else {
        return Vec::new();
    };
    let mut probes = Vec::new();
    if attach::is_libc(file) && layers.contains(Layer::Libc) {
        probes.extend(attach::plan_layer(&elf, Layer::Libc, &LIBC_FUNCTIONS));
    }
    if attach::may_hold_python(file) {
        probes.extend(attach::plan_finalize(&elf));
        if layers.contains(Layer::Pymalloc) {
            probes.extend(attach::plan_python_domain(
                &elf,
                Layer::Pymalloc,
                &[Domain::Obj, Domain::Mem],
                &PYMALLOC_TABLE_FUNCTIONS,
                &PYMALLOC_FUNCTIONS,
            ));
        }
        if layers.contains(Layer::PymemRaw) {
            probes.extend(attach::plan_python_domain(
                &elf,
                Layer::PymemRaw,
                &[Domain::Raw],
                &PYMEM_RAW_TABLE_FUNCTIONS,
                &PYMEM_RAW_FUNCTIONS,
            ));
        }
    }
    probes
}

/// A watch on the allocator tables of the Python runtime among `files`, if any.
fn watch(pid: u32, files: &[PathBuf]) -> Option<AllocWatch> {
    let file = match python::detect(files)? {
        python::Detected::Supported(rt) => rt.file,
        python::Detected::Unsupported { file, .. } => file,
    };
    AllocWatch::new(pid, &file)
}

/// Says once what will not be seen.
fn warn_missing(probes: &[ProbeSpec], layers: LayerSet, what: &str) {
    if layers.contains(Layer::Libc) && !probes.iter().any(|p| p.symbol == "malloc") {
        eprintln!("pyleak: warning: no libc malloc found for {what} (statically linked?): the libc layer sees nothing");
    }
}

fn create_output(path: &Path) -> Result<File, UserError> {
    File::create(path).map_err(|e| UserError::Output {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// How targets are followed while recording.
enum Follow<'a> {
    /// `--pid`, a command: the targets' Python runtimes (placement, allocator tables).
    Pids(&'a mut Runtimes<'a>),
    /// `--cgroup`, `--container`, `--all`: processes come and go.
    Group(&'a mut Group),
}

/// The ring buffer's fd, for tokio to wait on.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The targets' Python runtimes: those whose load address the kernel does not know yet, and
/// the watches on their allocator tables.
struct Runtimes<'a> {
    unplaced: &'a mut HashMap<u32, (python::PythonRuntime, PyProc)>,
    watches: &'a mut [AllocWatch],
}

/// Reads events until the recording ends; returns why it ended.
async fn trace_loop(
    rec: &mut Recorder,
    syms: &Mutex<Symbolizer>,
    resolver: &mut python::Resolver,
    mut follow: Follow<'_>,
    args: &RecordArgs,
    launched: Option<(u32, tokio::sync::oneshot::Receiver<i32>)>,
    sampler: &mut Sampler,
) -> anyhow::Result<End> {
    let started = sampler.started;
    let child = launched.as_ref().map(|(pid, _)| *pid);
    let mut child_exit = launched.map(|(_, exit)| exit);
    // SAFETY: the ring buffer's fd belongs to `rec`, which outlives this function and so
    // this AsyncFd; it is not closed while registered.
    let ring = unsafe { AsyncFd::register(RingFd(rec.ring_fd().as_raw_fd())) }
        .map_err(|_| anyhow::anyhow!("cannot poll the ring buffer"))?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(TICK);
    let mut sample_tick = tokio::time::interval(sampler.interval);
    let mut keys = sampler.keys()?;
    let deadline = args
        .duration
        .map(|d| started + Duration::from_secs_f64(d.max(0.0)));
    let status_tty = std::io::stderr().is_terminal();
    let mut last_maps = Instant::now() - MAPS_REFRESH;
    let mut last_events = (0u64, Instant::now());
    if let Follow::Pids(runtimes) = &mut follow {
        snapshot_all(rec, syms, runtimes);
    }
    let window = Duration::from_secs_f64(args.pymalloc_window);
    let period = Duration::from_secs_f64(args.pymalloc_period);
    // The first window, like every other, opens after a random wait: a window pinned to the
    // start would always see the interpreter's start-up, whose mix of events is its own.
    let mut window_at = tokio::time::Instant::now() + next_gap(period, window);
    let end = loop {
        let sleep_until = deadline.map(tokio::time::Instant::from_std);
        tokio::select! {
            guard = ring.readable() => {
                // Readiness is cleared before draining: an event submitted while draining
                // wakes the loop again instead of waiting for the next tick.
                let mut guard = guard?;
                guard.clear_ready();
                let n = rec.drain();
                if let Follow::Group(g) = &mut follow {
                    g.poll(rec, resolver, syms);
                }
                learn_new_stacks(rec, resolver);
                if n > 0 && last_maps.elapsed() >= MAPS_REFRESH {
                    last_maps = Instant::now();
                    match &mut follow {
                        Follow::Group(g) => g.refresh(rec, resolver, syms),
                        Follow::Pids(runtimes) => snapshot_all(rec, syms, runtimes),
                    }
                }
            }
            _ = tick.tick() => {
                rec.drain();
                if let Follow::Group(g) = &mut follow {
                    g.poll(rec, resolver, syms);
                    learn_new_stacks(rec, resolver);
                    g.scan(rec, resolver, syms);
                    g.refresh(rec, resolver, syms);
                    g.reap(rec);
                    if let Some(cg) = g.cgroup.as_ref().filter(|cg| !cg.dir.exists()) {
                        eprintln!("pyleak: cgroup {} was removed: ending the recording", cg.path);
                        break End::TargetsExited;
                    }
                } else if let Follow::Pids(runtimes) = &mut follow {
                    learn_new_stacks(rec, resolver);
                    snapshot_all(rec, syms, runtimes);
                    if child.is_none() && rec.targets.iter().all(|&pid| !alive(pid) || rec.is_frozen(pid)) {
                        break End::TargetsExited;
                    }
                }
                if sampler.view == View::Top {
                    sampler.draw(rec);
                } else if !args.quiet && started.elapsed() >= TICK {
                    status_line(rec, started, &mut last_events, status_tty);
                }
            }
            _ = sample_tick.tick() => {
                rec.drain();
                if let Follow::Group(g) = &mut follow {
                    g.poll(rec, resolver, syms);
                }
                learn_new_stacks(rec, resolver);
                sampler.sample(rec, &lock(syms), resolver);
                if sampler.error.is_err() {
                    break End::Signal;
                }
            }
            key = async { keys.as_mut().expect("guarded").recv().await }, if keys.is_some() => {
                match key {
                    Some(b'q' | b'Q' | 3) => break End::Signal,
                    Some(_) => {}
                    None => keys = None,
                }
            }
            _ = async { tokio::time::sleep_until(sleep_until.unwrap_or_else(tokio::time::Instant::now)).await }, if sleep_until.is_some() => {
                break End::Duration;
            }
            _ = tokio::time::sleep_until(window_at), if rec.samples_pymalloc() => {
                if rec.windows().is_some_and(|w| w.is_open()) {
                    rec.close_window()?;
                    // The window's page faults count before its samples are weighed.
                    rec.drain();
                    if let Err(e) = rec.sweep() {
                        log::warn!("judging pymalloc samples: {e}");
                    }
                    window_at = tokio::time::Instant::now() + next_gap(period, window);
                } else if rec.book().full {
                    window_at = tokio::time::Instant::now() + period;
                } else {
                    rec.open_window()?;
                    window_at = tokio::time::Instant::now() + window;
                }
            }
            _ = sigint.recv() => break End::Signal,
            _ = sigterm.recv() => break End::Signal,
            code = async { child_exit.as_mut().expect("guarded").await }, if child_exit.is_some() => {
                child_exit = None;
                if let Ok(code) = code {
                    log::info!("command exited with {code}");
                }
                break End::TargetsExited;
            }
        }
    };
    if status_tty && !args.quiet && sampler.view == View::StatusLine {
        eprintln!();
    }
    // The last window closes, and every sample is judged once more while the targets live.
    rec.close_window()?;
    rec.drain();
    if let Err(e) = rec.sweep() {
        log::warn!("judging pymalloc samples: {e}");
    }
    // The last moment counts for growth too.
    rec.drain();
    if let Follow::Group(g) = &mut follow {
        g.poll(rec, resolver, syms);
    }
    learn_new_stacks(rec, resolver);
    sampler.sample(rec, &lock(syms), resolver);
    if let (Some(pid), Some(wait)) = (child, child_exit) {
        if end == End::Signal {
            // Forward Ctrl-C/SIGTERM to the command and give it a moment to shut down,
            // so its interpreter's teardown freezes its state as in a normal exit.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let _ = tokio::time::timeout(CHILD_GRACE, wait).await;
    }
    rec.drain();
    Ok(end)
}

/// The wait from one window's close to the next window's opening: exponential, so window
/// starts form a Poisson process of mean interval `period` (no beat with the program's own
/// period), less the window itself.
fn next_gap(period: Duration, window: Duration) -> Duration {
    let u = loop {
        // SAFETY: libc's generator, seeded by nothing: no secret is drawn here.
        let r = unsafe { libc::rand() } as f64 / (libc::RAND_MAX as f64 + 1.0);
        if r > 0.0 {
            break r;
        }
    };
    let mean = period.saturating_sub(window).as_secs_f64();
    Duration::from_secs_f64((-u.ln() * mean).min(mean * 20.0))
}

/// Reads the code objects of stacks the kernel announced (while their process lives).
/// A stack of a process whose runtime is not placed yet (a group member pyleak is still
/// examining) waits for it while the process lives.
fn learn_new_stacks(rec: &mut Recorder, resolver: &mut python::Resolver) {
    if rec.new_stacks.is_empty() {
        return;
    }
    resolver.next_batch();
    let mut waiting = Vec::new();
    for (pid, id) in std::mem::take(&mut rec.new_stacks) {
        if !resolver.knows(pid) {
            if alive(pid) {
                waiting.push((pid, id));
            }
            continue;
        }
        if let Some(st) = rec.stack(id) {
            let n = (st.py_len as usize).min(st.py.len());
            resolver.learn(pid, id, &st.py[..n]);
        }
    }
    rec.new_stacks = waiting;
}

/// The supported Python runtime among `files` (when Python stacks are `enabled`), warning
/// once about an unsupported one; the version found is kept for process `pid`'s report.
fn python_runtime(
    rec: &mut Recorder,
    pid: u32,
    files: &[PathBuf],
    what: &str,
    enabled: bool,
) -> Option<python::PythonRuntime> {
    match python::detect(files)? {
        python::Detected::Supported(rt) => {
            rec.pythons
                .insert(pid, python::version_name(rt.cpython.version()));
            if !enabled {
                return None;
            }
            log::info!("{what}: {}", python::describe(&rt));
            if let Some(w) = &rt.warning {
                eprintln!("pyleak: warning: {w}");
            }
            Some(*rt)
        }
        python::Detected::Unsupported { file, version } => {
            rec.pythons.insert(pid, version.clone());
            if !enabled {
                return None;
            }
            eprintln!(
                "pyleak: warning: {what} runs CPython {version} ({}), which pyleak cannot walk (3.8 and newer): native stacks only",
                file.display()
            );
            None
        }
    }
}

/// The layout of a runtime loaded `bias` bytes above its link-time address. A bias of 0
/// means "not known yet" to the kernel, so a python at its link-time address (not PIE)
/// is described as one page higher with a page less of bias.
pub(crate) fn placed(pid: u32, rt: &python::PythonRuntime, bias: u64, layout: PyProc) -> PyProc {
    let (pidns_dev, pidns_ino) = python::pid_namespace(pid).unwrap_or((0, 0));
    PyProc {
        runtime_vaddr: rt.runtime_vaddr.wrapping_sub(4096),
        bias: bias.wrapping_add(4096),
        pidns_dev,
        pidns_ino,
        ..layout
    }
}

/// Tells the kernel where launched commands' Python runtimes landed, once their memory
/// maps show it.
fn place_runtimes(
    rec: &mut Recorder,
    unplaced: &mut HashMap<u32, (python::PythonRuntime, PyProc)>,
) {
    unplaced.retain(|&pid, (rt, layout)| {
        let Some(bias) = python::load_bias(pid, rt) else {
            return true;
        };
        if let Err(e) = rec.set_python(pid, &placed(pid, rt, bias, *layout)) {
            log::warn!("process {pid}: {e}");
        }
        false
    });
}

/// Re-reads the memory maps (for symbols) and names of the targets still alive.
fn snapshot_all(rec: &mut Recorder, syms: &Mutex<Symbolizer>, runtimes: &mut Runtimes<'_>) {
    place_runtimes(rec, runtimes.unplaced);
    for w in runtimes.watches.iter_mut() {
        w.check();
    }
    let mut syms = lock(syms);
    for pid in rec.targets.clone() {
        syms.snapshot(pid);
        rec.refresh_comm(pid);
    }
}

/// Locks the symbolizer; a panic elsewhere cannot leave it half-updated in a way that
/// matters, so a poisoned lock is used as is.
pub(crate) fn lock(syms: &Mutex<Symbolizer>) -> std::sync::MutexGuard<'_, Symbolizer> {
    syms.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next()),
            Some("Z" | "X")
        ),
        Err(_) => false,
    }
}

/// One line on stderr: elapsed, events per second, live bytes per layer.
fn status_line(rec: &Recorder, started: Instant, last: &mut (u64, Instant), tty: bool) {
    let Ok(stats) = rec.layer_stats() else { return };
    let events: u64 = stats
        .iter()
        .map(|s| s.allocs + s.frees + s.unmatched_frees)
        .sum::<u64>()
        + rec.model.events;
    let rate = (events - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-3);
    *last = (events, Instant::now());
    let mut parts = Vec::new();
    for layer in [Layer::Pymalloc, Layer::PymemRaw, Layer::Libc] {
        let s = stats[layer as usize];
        if s.allocs > 0 {
            parts.push(format!(
                "{} {}",
                layer.name(),
                human_bytes(s.alloc_bytes.saturating_sub(s.freed_bytes))
            ));
        }
    }
    let vm: u64 = rec.model.live_regions().values().map(|v| v.0).sum();
    let pages: u64 = rec.model.live_pages().values().map(|v| v.0).sum();
    parts.push(format!("vm {}", human_bytes(vm)));
    parts.push(format!("pages {}", human_bytes(pages)));
    let line = format!(
        "pyleak: {:.0}s  {:.0} events/s  live: {}",
        started.elapsed().as_secs_f64(),
        rate,
        parts.join(", ")
    );
    if tty {
        eprint!("\r\x1b[K{line}");
    } else {
        eprintln!("{line}");
    }
}
