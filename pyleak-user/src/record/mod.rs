//! `pyleak record` (and `top`): validate → load → plan and attach → start → loop → finish.
//! The steps are one function each; the loop is in `trace`, the group targets followed in `follow`, the
//! targets' Python runtimes in `runtimes`, the growth samples in `sampler`.

mod census;
mod children;
mod follow;
mod runtimes;
mod sampler;
mod trace;

use std::{
    collections::HashMap,
    fs::File,
    io::Write as _,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use pyleak_common::{Layer, PyProc, MAX_NATIVE_FRAMES};

use self::{
    census::Censuses,
    children::Children,
    follow::Group,
    runtimes::{learn_new_stacks, python_runtime, Runtimes, Unplaced},
    sampler::Sampler,
    trace::{trace_loop, Follow, Launch},
};
use crate::{
    analysis::{self, Analysis, Facts, HeldBy, ProbeInfo, ProcessInfo},
    attach::{self, elf::ElfFile, plan::warn_missing},
    cli::{PymallocMode, RecordArgs},
    collect::{frames::frames_of_all, Filter, Recorder, RecorderOptions, Snapshot},
    errors::UserError,
    host,
    layers::LayerSet,
    python,
    report::{self, file::OutputFile, OutputFormat},
    symbolize::{lock, Symbolizer},
    targets::{launch, Target},
};

/// How the recording is shown while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// A status line on stderr (`pyleak record`).
    StatusLine,
    /// A full-screen live view (`pyleak top`).
    Top,
}

/// What `validate` checked and opened.
struct Plan {
    target: Target,
    layers: LayerSet,
    render: report::Render,
    outputs: Outputs,
}

/// Output files, opened before anything is traced so that a bad path fails first.
struct Outputs {
    output: Option<OutputFile>,
    json: Option<OutputFile>,
    snapshots: Option<File>,
}

/// Everything attached: the loaded programs and what follows the targets.
struct Session {
    rec: Recorder,
    syms: Arc<Mutex<Symbolizer>>,
    resolver: python::Resolver,
    runtimes: Runtimes,
    group: Option<Group>,
    child: Option<launch::Launched>,
    /// The processes `--pid` and command targets start.
    children: Children,
    /// The Python runtime of each `--pid` or command target (for `--census`).
    pythons: Vec<(u32, python::PythonRuntime)>,
}

/// Runs `pyleak record` (or `top`); returns the exit code.
pub fn run(args: RecordArgs, view: View) -> anyhow::Result<i32> {
    let mut plan = validate(&args)?;
    let mut session = load(&args, &plan)?;
    attach_targets(&args, &plan, &mut session)?;
    start(&args, &plan, &mut session)?;
    let (sampler, duration_s, exit) = trace(&args, view, &mut plan, &mut session)?;
    finish(&args, plan, session, sampler, (duration_s, exit))
}

/// Traces until the recording ends (duration, signal, the targets' end), taking growth
/// samples; returns them, the seconds recorded and how a launched command ended.
fn trace(
    args: &RecordArgs,
    view: View,
    plan: &mut Plan,
    session: &mut Session,
) -> anyhow::Result<(Sampler, f64, Option<std::process::ExitStatus>)> {
    let started = Instant::now();
    let mut sampler = Sampler::new(
        Duration::from_secs_f64(args.interval()),
        args.native,
        view,
        started,
        plan.outputs
            .snapshots
            .take()
            .map(|f| (f, args.snapshots.clone().unwrap_or_default())),
    );
    if args.census {
        let mut censuses = Censuses::default();
        let launched = session.child.as_ref().map(|c| c.pid);
        for (pid, rt) in &session.pythons {
            censuses.add(*pid, rt, launched == Some(*pid));
        }
        sampler.censuses = Some(censuses);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let launched = session.child.as_mut().and_then(|c| {
        Some(Launch {
            pid: c.pid,
            exited: c.exited.take()?,
            signals_seen: Arc::clone(&c.signals_seen),
            exec_gate: Arc::clone(&c.exec_gate),
            holds: c.holds.take(),
        })
    });
    let end = runtime.block_on(trace_loop(
        &mut session.rec,
        &session.syms,
        &mut session.resolver,
        match session.group.as_mut() {
            Some(g) => Follow::Group(g),
            None => Follow::Pids(&mut session.runtimes, &mut session.children),
        },
        args,
        launched,
        &mut sampler,
    ));
    sampler.close_view();
    let (end, exit) = end?;
    log::debug!("recording ended: {end:?}, command {exit:?}");
    Ok((sampler, started.elapsed().as_secs_f64(), exit))
}

/// Checks the arguments and opens the outputs: nothing is loaded yet.
fn validate(args: &RecordArgs) -> anyhow::Result<Plan> {
    host::check_privileges()?;
    host::check_lockdown(Path::new(host::LOCKDOWN))?;
    // Launching: every layer. Attaching: not pymem_raw (its calls are malloc's, seen in
    // libc); pymalloc sampled (a few percent of CPU) or, asked for, exact.
    let sampled = args.pymalloc == PymallocMode::Sampled && !args.bare;
    let attaching = args.target.command.is_empty();
    let layers = match &args.layers {
        Some(l) => LayerSet::parse(l)?,
        None if attaching => LayerSet::parse("pymalloc,libc,vm,pages")?,
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
    let target = Target::from_args(&args.target)?;
    let render = report::Render::from_args(&args.out)?;
    // At most 1e9 s (31 years): what a `Duration` holds with room to add to an `Instant`.
    let seconds = |s: f64| s > 0.0 && s <= 1e9;
    let interval = args.interval();
    if !seconds(interval) {
        return Err(UserError::BadInterval(interval).into());
    }
    if let Some(d) = args.duration {
        if !seconds(d) {
            return Err(UserError::BadDuration(d).into());
        }
        if interval > d {
            return Err(UserError::IntervalOverDuration {
                interval,
                duration: d,
                suggest: d / 10.0,
            }
            .into());
        }
    }
    if !(1..=MAX_NATIVE_FRAMES as u32).contains(&args.native_depth) {
        return Err(UserError::BadNativeDepth(args.native_depth).into());
    }
    if !(args.min_age >= 0.0 && args.min_age.is_finite()) {
        return Err(UserError::BadMinAge(args.min_age).into());
    }
    let mode = args.out.file_mode;
    let outputs = Outputs {
        output: args
            .out
            .output
            .as_deref()
            .map(|p| report::create(p, mode))
            .transpose()?,
        json: args
            .json
            .as_deref()
            .map(|p| report::create(p, mode))
            .transpose()?,
        snapshots: args
            .snapshots
            .as_deref()
            .map(|p| OutputFile::stream(p, mode))
            .transpose()?,
    };
    Ok(Plan {
        target,
        layers,
        render,
        outputs,
    })
}

/// Starts a command held before its first instruction, and loads the programs (the
/// tracepoints attach here; they filter by process in the kernel).
fn load(args: &RecordArgs, plan: &Plan) -> anyhow::Result<Session> {
    let layers = plan.layers;
    let syms = Arc::new(Mutex::new(Symbolizer::default()));
    let child = match &plan.target {
        Target::Command { program, argv } => {
            let syms = Arc::clone(&syms);
            let on_exit = move |pid| lock(&syms).snapshot(pid);
            Some(launch::spawn_paused(program, argv, on_exit)?)
        }
        _ => None,
    };
    let follow = !args.no_follow && !matches!(plan.target, Target::Group(_));
    let filter = match &plan.target {
        Target::Group(Some(cg)) => Filter::Cgroup {
            id: cg.id,
            level: cg.level,
        },
        Target::Group(None) => Filter::PidSet,
        _ => Filter::Pids,
    };
    let pymalloc_sampled =
        args.pymalloc == PymallocMode::Sampled && !args.bare && layers.contains(Layer::Pymalloc);
    let opts = RecorderOptions {
        layers,
        native_depth: args.native_depth,
        bare: args.bare,
        filter,
        pymalloc_sampled,
        follow_children: follow,
        // The last census is read, and the pymalloc samples judged a last time, at
        // the interpreter's shutdown, its threads joined, before its teardown.
        hold_at_finalize: match &child {
            Some(c) if args.census || pymalloc_sampled => c.pid,
            _ => 0,
        },
    };
    let rec = Recorder::load(opts)?;
    let group = match &plan.target {
        Target::Group(cgroup) => Some(Group::new(cgroup.clone(), layers, !args.no_python_stacks)),
        _ => None,
    };
    Ok(Session {
        rec,
        syms,
        resolver: python::Resolver::default(),
        runtimes: Runtimes::default(),
        group,
        child,
        children: Children::new(layers, !args.no_python_stacks),
        pythons: Vec::new(),
    })
}

/// Plans the probes each target needs and attaches them; tells the kernel how to walk
/// each target's Python frames.
fn attach_targets(args: &RecordArgs, plan: &Plan, s: &mut Session) -> anyhow::Result<()> {
    let layers = plan.layers;
    let Session {
        rec,
        syms,
        resolver,
        runtimes,
        group,
        child,
        children,
        pythons,
    } = s;
    if let Some(g) = group.as_mut() {
        g.scan(rec, resolver, syms);
        if g.probed.is_empty() {
            // No process to learn a libc from yet: the host's (pyleak's own) is the likely
            // one, and attaching a file-wide probe takes long enough (a breakpoint in every
            // process mapping it) that a process starting later would run ahead of it.
            g.probe_own_libc(rec);
        }
    }
    match (&plan.target, &child) {
        (Target::Command { program: p, .. }, Some(c)) => {
            let files = attach::libraries_of(&attach::program_of(p));
            runtimes.watch(c.pid, &files);
            let mut probes = children.plan(&files);
            warn_missing(&probes, layers, &p.display().to_string(), &files);
            if let Some(rt) = python_runtime(
                rec,
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
                    rt.key,
                )?;
                if let Ok(elf) = ElfFile::open(&rt.file) {
                    probes.extend(attach::plan_py_init(&elf));
                }
                resolver.add_process(c.pid, &rt);
                pythons.push((c.pid, rt.clone()));
                // ...or pyleak reads it from the memory map first (an LTO build may have
                // inlined the probed function away).
                // Following children, the kernel drops a placed layout at the command's
                // exec: not placed before the kernel announced it (see `Unplaced`).
                runtimes.unplaced.insert(
                    c.pid,
                    Unplaced {
                        rt: rt.clone(),
                        layout,
                        exec_pending: !args.no_follow,
                    },
                );
            }
            rec.add_target(c.pid, &probes)?;
            let rt = pythons.iter().find(|p| p.0 == c.pid).map(|p| &p.1);
            children.note_target(c.pid, &files, rt, Some(Arc::clone(&c.exec_gate)));
            if args.no_follow {
                // No exec is announced to be handled: the command is never held.
                c.exec_gate.open();
            }
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            rec.set_comm(c.pid, &name);
        }
        (Target::Pids(pids), _) => {
            for &pid in pids {
                let files = attach::mapped_files(pid).map_err(|e| {
                    if crate::targets::alive(pid) {
                        UserError::MapsUnreadable(pid, e.to_string())
                    } else {
                        UserError::ProcessGone(pid)
                    }
                })?;
                runtimes.watch(pid, &files);
                let probes = children.plan(&files);
                warn_missing(&probes, layers, &format!("process {pid}"), &files);
                let deleted = attach::deleted_runtime_files(pid);
                if !deleted.is_empty() {
                    let (them, census) = (
                        if deleted.len() == 1 { "it" } else { "them" },
                        if args.census {
                            " (and --census has no runtime to read)"
                        } else {
                            ""
                        },
                    );
                    eprintln!(
                        "pyleak: warning: process {pid} maps {} deleted or replaced on disk since it started (an upgrade?): pyleak cannot open {them}, so its probes there and its Python stacks are missing{census}; restart the process to trace it fully",
                        deleted.join(", ")
                    );
                }
                if let Some(rt) = python_runtime(
                    rec,
                    pid,
                    &files,
                    &format!("process {pid}"),
                    !args.no_python_stacks,
                ) {
                    let bias = python::load_bias(pid, &rt).ok_or(UserError::ProcessGone(pid))?;
                    rec.set_python(pid, &python::placed(pid, &rt, bias, rt.walk), rt.key)?;
                    resolver.add_process(pid, &rt);
                    pythons.push((pid, rt));
                }
                rec.add_target(pid, &probes)?;
                let rt = pythons.iter().find(|p| p.0 == pid).map(|p| &p.1);
                children.note_target(pid, &files, rt, None);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Says what is traced (scripts wait for this line), then lets a launched command run.
fn start(args: &RecordArgs, plan: &Plan, s: &mut Session) -> anyhow::Result<()> {
    let layers = plan.layers;
    let Session {
        rec, group, child, ..
    } = s;
    for p in rec.probes.iter().filter(|p| !p.emulated) {
        log::info!(
            "{}: {} probed at a single-stepped instruction (slower)",
            p.path.display(),
            p.symbol
        );
    }
    let what = match (&plan.target, &group) {
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
        (Target::Command { program, .. }, _) => format!(
            "{} (pid {})",
            program.display(),
            child.as_ref().map_or(0, |c| c.pid)
        ),
        _ => format!(
            "pid {}",
            args.target
                .pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    // The command runs now (its probes are in): a failed exec ends here, in one line.
    if let Some(c) = child.as_mut() {
        c.start()?;
    }
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
            " (pymalloc sampled in windows: its live bytes are estimates; --pymalloc exact traps every call, 10-60x CPU on allocation-heavy code)"
        } else if layers.contains(Layer::Pymalloc) && !args.bare && args.target.command.is_empty() {
            " (pymalloc exact: a trap per Python allocation, 10-60x CPU on allocation-heavy code)"
        } else {
            ""
        }
    );
    Ok(())
}

/// Freezes the targets, reads the snapshot, analyses it and writes the outputs.
fn finish(
    args: &RecordArgs,
    plan: Plan,
    mut s: Session,
    mut sampler: Sampler,
    (duration_s, exit): (f64, Option<std::process::ExitStatus>),
) -> anyhow::Result<i32> {
    if let Some(g) = s.group.as_mut() {
        // Processes that started while the recording ended are part of it too.
        s.rec.drain();
        g.poll(&mut s.rec, &mut s.resolver, &s.syms);
        g.scan(&mut s.rec, &mut s.resolver, &s.syms);
    } else {
        s.rec.drain();
        s.children
            .poll(&mut s.rec, &mut s.resolver, &mut s.runtimes, &s.syms);
    }
    s.rec.freeze_all()?;
    // Processes a launched command started and left running (a `Popen` not waited for):
    // the recording ends with the command, and with it what is known of them.
    let mut orphans: Vec<u32> = match &s.child {
        Some(c) => s
            .rec
            .targets
            .iter()
            .copied()
            .filter(|&p| p != c.pid)
            .collect(),
        None => Vec::new(),
    };
    orphans.retain(|&pid| crate::targets::alive(pid));
    orphans.sort_unstable();
    let snap = s.rec.snapshot((args.min_age * 1e9) as u64)?;
    learn_new_stacks(&mut s.rec, &mut s.resolver);
    // A launched command's status is pyleak's, as with `time` or `strace`: scripts that
    // run their tests under pyleak still see them fail. A command still running (-d) or
    // a target attached to: 0.
    let status = exit.map_or(0, launch::exit_code);
    // Ended by -d (or a signal it ignored), a launched command runs on, untraced.
    let running = s.child.as_ref().filter(|_| exit.is_none()).map(|c| c.pid);
    if args.bare {
        return Ok(status);
    }
    sampler.error?;
    let mut facts = facts(
        &s.rec,
        &snap,
        &lock(&s.syms),
        &s.resolver,
        args.native,
        sampler.peaks.clone(),
        &s.children.followed,
    );
    if let Some(c) = &s.child {
        // The command started with the recording.
        facts.started_s.insert(c.pid, 0.0);
    }
    let mut analysis = analysis::analyze(
        &snap,
        &s.rec.model,
        &facts,
        &sampler.timeline,
        analysis::Options {
            duration_s,
            min_age_s: args.min_age,
            interval_s: args.interval(),
            group_libs: !args.no_group_libs,
        },
    );
    analysis.command_exit = exit.map(launch::describe_exit);
    // The targets are frozen in the kernel: let the command go, take the uprobes out (one
    // grace period per multi-uprobe link; ~0.1 s per probe with perf events), then write
    // the report.
    if let Some(c) = &sampler.censuses {
        held_by(&s.rec, c, &facts, &mut analysis);
    }
    let census = sampler.censuses.take().and_then(Censuses::finish);
    if let Some((json, _)) = &census {
        analysis.census = Some(json.clone());
    }
    drop(s.child);
    analysis.probes_detach_s = s.rec.detach_probes();
    log::info!("probes detached in {:.3} s", analysis.probes_detach_s);

    // The files first: a standard output that fails (a closed pipe, a full disk) must not
    // cost them.
    if let Some(out) = plan.outputs.output {
        let format = args
            .out
            .format
            .unwrap_or_else(|| OutputFormat::from_path(out.path()));
        report::write_file(&analysis, format, &plan.render, out)?;
    }
    if let Some(out) = plan.outputs.json {
        report::write_file(&analysis, OutputFormat::Json, &plan.render, out)?;
    }
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    report::text::write(&analysis, &mut lock)
        .and_then(|()| match &census {
            Some((_, text)) => lock.write_all(text.as_bytes()),
            None => Ok(()),
        })
        .and_then(|()| lock.flush())
        .context("writing the report to standard output")?;
    drop(lock);
    drop(s.rec);
    if let Some(pid) = running.filter(|&pid| crate::targets::alive(pid)) {
        eprintln!("pyleak: the command (pid {pid}) is still running, no longer traced");
    }
    if !orphans.is_empty() {
        let pids: Vec<String> = orphans.iter().map(u32::to_string).collect();
        eprintln!(
            "pyleak: {} followed process(es) still running, no longer traced (pid {}): the report holds what they did until the recording ended; wait for them in the program, or attach with --pid",
            orphans.len(),
            pids.join(", ")
        );
    }
    Ok(status)
}

/// Holders shown per suspect at most.
const HELD_BY_SHOWN: usize = 5;

/// Fills each pymalloc suspect's `held_by`: its live blocks (the frozen targets' live
/// table) that the last census attributed to a holder, summed per holder.
fn held_by(rec: &Recorder, censuses: &Censuses, facts: &Facts, analysis: &mut Analysis) {
    let blocks = match rec.live_blocks_by(Layer::Pymalloc, |pid, addr| {
        censuses.holder_of(pid, addr).map(<[String]>::to_vec)
    }) {
        Ok(b) => b,
        Err(e) => {
            log::warn!("reading live blocks for held_by: {e}");
            return;
        }
    };
    // (blocks, bytes) per holder path, per (process, frames).
    type PerHolder = HashMap<Vec<String>, (u64, u64)>;
    let mut by_frames: HashMap<(u32, Vec<String>), PerHolder> = HashMap::new();
    for ((pid, stack_id, path), (count, bytes)) in blocks {
        let frames = facts.frames_of(pid, stack_id).names;
        let e = by_frames
            .entry((pid, frames))
            .or_default()
            .entry(path)
            .or_default();
        e.0 += count;
        e.1 += bytes;
    }
    for s in analysis.suspects.iter_mut().chain(&mut analysis.startup) {
        if s.layer != Layer::Pymalloc.name() {
            continue;
        }
        let Some(holders) = by_frames.get(&(s.pid, s.frames.clone())) else {
            continue;
        };
        let mut held: Vec<HeldBy> = holders
            .iter()
            .map(|(path, &(count, bytes))| HeldBy {
                path: path.clone(),
                count,
                bytes,
            })
            .collect();
        held.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.path.cmp(&b.path)));
        held.truncate(HELD_BY_SHOWN);
        s.held_by = held;
    }
}

/// What the analysis needs to know of the processes besides the snapshot: names, cgroups,
/// CPython versions, the probes placed, every stack's frames and the mapping of each
/// resident page the vm layer did not see made.
fn facts(
    rec: &Recorder,
    snap: &Snapshot,
    syms: &Symbolizer,
    py: &python::Resolver,
    native: bool,
    peaks: crate::analysis::peak::Peaks,
    followed: &HashMap<u32, analysis::Followed>,
) -> Facts {
    let mut pids: Vec<u32> = rec.targets.clone();
    pids.extend(snap.stacks.keys().map(|&(pid, _, _)| pid));
    // Children that exited before their probes went in are listed too.
    pids.extend(followed.keys());
    let processes = pids
        .into_iter()
        .map(|pid| {
            (
                pid,
                ProcessInfo {
                    pid,
                    comm: rec.comm(pid),
                    cgroup: rec.cgroups.get(&pid).cloned(),
                    python: rec.pythons.get(&pid).cloned(),
                    followed: followed.get(&pid).cloned(),
                },
            )
        })
        .collect();
    let stack_keys = snap
        .stacks
        .keys()
        .map(|&(pid, _, id)| (pid, id))
        .chain(
            rec.model
                .procs
                .iter()
                .flat_map(|(&pid, p)| p.regions.values().map(move |r| (pid, r.stack_id))),
        )
        .chain(rec.model.cow_stacks.keys().copied())
        .chain(peaks.stack_keys());
    let mut page_kinds = std::collections::HashMap::new();
    for (&pid, p) in &rec.model.procs {
        for &addr in p.pages.keys() {
            if p.region_at(addr).is_some() {
                continue;
            }
            use crate::collect::vm::MappingKind;
            let kind = match syms.mapping_name(pid, addr) {
                Some("[heap]") => MappingKind::MallocHeap,
                Some(n) if n.starts_with("[stack") => MappingKind::Stack,
                Some(n) if n.starts_with('/') => MappingKind::File,
                _ => continue,
            };
            page_kinds.insert((pid, addr), kind);
        }
    }
    Facts {
        targets: rec.targets.clone(),
        processes,
        probes: rec
            .probes
            .iter()
            .map(|p| ProbeInfo {
                file: p.path.display().to_string(),
                symbol: p.symbol.to_owned(),
                offset: p.delta_from_entry,
                emulated: p.emulated,
            })
            .collect(),
        probe_links: if rec.multi_links() {
            "multi-uprobe"
        } else {
            "perf-event"
        }
        .to_owned(),
        probes_attach_s: rec.attach_s,
        frames: frames_of_all(rec, syms, py, native, stack_keys),
        started_s: std::collections::HashMap::new(),
        page_kinds,
        peaks,
    }
}
