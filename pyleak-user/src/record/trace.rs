//! The recording loop: events from the kernel, the targets followed, growth samples, the
//! status line, until the duration, a signal, or the targets' end.

use std::{
    io::IsTerminal as _,
    os::fd::{AsRawFd, RawFd},
    process::ExitStatus,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use pyleak_common::{Drop, Layer};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind, sync::mpsc::UnboundedReceiver};

use super::{
    children::Children,
    follow::Group,
    runtimes::{learn_new_stacks, Runtimes},
    sampler::Sampler,
    View,
};
use crate::{
    cli::RecordArgs,
    collect::Recorder,
    python,
    report::human_bytes,
    symbolize::{lock, Symbolizer},
    targets::{
        alive,
        launch::{monotonic_ms, ExecGate, Hold, SignalsSeen},
    },
};

/// How often the status line and the memory-map snapshots refresh.
const TICK: Duration = Duration::from_secs(1);
/// Memory maps are re-read at most this often while events flow (new libraries).
const MAPS_REFRESH: Duration = Duration::from_millis(20);
/// How often the ring buffer is read when nothing wakes pyleak: page faults are sent
/// without a wakeup (`emit_quiet` in the kernel), and wait at most this long.
const QUIET_DRAIN: Duration = Duration::from_millis(20);
/// A SIGINT, SIGHUP or SIGTERM delivered to the command this long before pyleak's own is
/// the same signal, sent to both.
const SIGNAL_SKEW_MS: u64 = 200;

/// How long a launched command gets to exit after pyleak forwards Ctrl-C/SIGTERM.
const CHILD_GRACE: Duration = Duration::from_secs(2);

/// Why a recording ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Duration,
    Signal,
    TargetsExited,
}

/// How targets are followed while recording.
pub enum Follow<'a> {
    /// `--pid`, a command: the targets' Python runtimes (placement, allocator tables) and
    /// the processes they start.
    Pids(&'a mut Runtimes, &'a mut Children),
    /// `--cgroup`, `--container`, `--all`: processes come and go.
    Group(&'a mut Group),
}

impl Follow<'_> {
    /// Handles what the kernel announced: a group's new programs and unseen processes, or
    /// the targets' children and new programs.
    fn poll(
        &mut self,
        rec: &mut Recorder,
        resolver: &mut python::Resolver,
        syms: &Mutex<Symbolizer>,
    ) {
        match self {
            Follow::Group(g) => g.poll(rec, resolver, syms),
            Follow::Pids(runtimes, children) => children.poll(rec, resolver, runtimes, syms),
        }
    }
}

/// The ring buffer's fd, for tokio to wait on.
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Reads the events waiting in the ring buffer, the new stacks' code objects, and (at most
/// every [`MAPS_REFRESH`] while events flow) the targets' memory maps.
fn on_events(
    rec: &mut Recorder,
    syms: &Mutex<Symbolizer>,
    resolver: &mut python::Resolver,
    follow: &mut Follow<'_>,
    last_maps: &mut Instant,
) {
    let n = rec.drain();
    follow.poll(rec, resolver, syms);
    learn_new_stacks(rec, resolver);
    if n > 0 && last_maps.elapsed() >= MAPS_REFRESH {
        *last_maps = Instant::now();
        match follow {
            Follow::Group(g) => g.refresh(rec, resolver, syms),
            Follow::Pids(runtimes, _) => runtimes.refresh(rec, syms),
        }
    }
}

/// A launched command, as the trace loop sees it.
pub struct Launch {
    pub pid: u32,
    /// Resolves to how it ended.
    pub exited: tokio::sync::oneshot::Receiver<Option<ExitStatus>>,
    /// See [`Launched::signals_seen`](crate::targets::launch::Launched::signals_seen).
    pub signals_seen: Arc<SignalsSeen>,
    /// Opened when the loop ends: nothing handles the command's execs after it.
    pub exec_gate: Arc<ExecGate>,
    /// See [`Launched::holds`](crate::targets::launch::Launched::holds).
    pub holds: Option<UnboundedReceiver<Hold>>,
}

/// Reads events until the recording ends; returns why it ended.
pub async fn trace_loop(
    rec: &mut Recorder,
    syms: &Mutex<Symbolizer>,
    resolver: &mut python::Resolver,
    mut follow: Follow<'_>,
    args: &RecordArgs,
    launched: Option<Launch>,
    sampler: &mut Sampler,
) -> anyhow::Result<(End, Option<ExitStatus>)> {
    let started = sampler.started;
    let child = launched.as_ref().map(|l| l.pid);
    let child_signals = launched.as_ref().map(|l| Arc::clone(&l.signals_seen));
    let exec_gate = launched.as_ref().map(|l| Arc::clone(&l.exec_gate));
    let (mut child_exit, mut holds) = match launched {
        Some(l) => (Some(l.exited), l.holds),
        None => (None, None),
    };
    let mut exit = None;
    // The signal that ended the recording (0: none), and the command's SIGINTs then.
    let mut signalled = 0;
    let mut signalled_ms = 0;
    // SAFETY: the ring buffer's fd belongs to `rec`, which outlives this function and so
    // this AsyncFd; it is not closed while registered.
    let ring = unsafe { AsyncFd::register(RingFd(rec.ring_fd().as_raw_fd())) }
        .map_err(|_| anyhow::anyhow!("cannot poll the ring buffer"))?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    // A hang-up (the terminal closed, or `kill -HUP`) ends the recording as SIGTERM does:
    // the report files are written (standard output may be gone with the terminal). Under
    // `nohup` (SIGHUP ignored) it is left ignored.
    let mut sighup = if ignored(libc::SIGHUP) {
        None
    } else {
        Some(tokio::signal::unix::signal(SignalKind::hangup())?)
    };
    let mut tick = tokio::time::interval(TICK);
    let mut sample_tick = tokio::time::interval(sampler.interval);
    let mut quiet_drain = tokio::time::interval(QUIET_DRAIN);
    quiet_drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keys = sampler.keys();
    let deadline = args
        .duration
        .map(|d| started + Duration::from_secs_f64(d.max(0.0)));
    let status_tty = std::io::stderr().is_terminal();
    let mut last_maps = Instant::now() - MAPS_REFRESH;
    let mut stacks_full_said = false;
    let mut last_events = (0u64, Instant::now());
    if let Follow::Pids(runtimes, _) = &mut follow {
        runtimes.refresh(rec, syms);
    }
    let window = Duration::from_secs_f64(args.pymalloc_window);
    let period = Duration::from_secs_f64(args.pymalloc_period);
    // The first window, like every other, opens after a random wait: a window pinned to the
    // start would always see the interpreter's start-up, whose mix of events is its own.
    let mut window_at = tokio::time::Instant::now() + next_gap(period, window);
    // A second judgement of the samples between two windows, at a random point of the gap.
    let mut judge_at: Option<tokio::time::Instant> = None;
    let end = loop {
        let sleep_until = deadline.map(tokio::time::Instant::from_std);
        tokio::select! {
            guard = ring.readable() => {
                // Readiness is cleared before draining: an event submitted while draining
                // wakes the loop again instead of waiting for the next tick.
                let mut guard = guard?;
                guard.clear_ready();
                on_events(rec, syms, resolver, &mut follow, &mut last_maps);
            }
            _ = quiet_drain.tick() => on_events(rec, syms, resolver, &mut follow, &mut last_maps),
            _ = tick.tick() => {
                rec.drain();
                follow.poll(rec, resolver, syms);
                if let Follow::Group(g) = &mut follow {
                    learn_new_stacks(rec, resolver);
                    g.scan(rec, resolver, syms);
                    g.refresh(rec, resolver, syms);
                    sampler.forget(&g.take_retired_early());
                    let gone = g.reap(rec);
                    if !gone.is_empty() {
                        let mut syms = lock(syms);
                        for &pid in &gone {
                            syms.forget(pid);
                        }
                        resolver.forget(&gone);
                        sampler.forget(&gone);
                    }
                    if let Some(cg) = g.cgroup.as_ref().filter(|cg| !cg.dir.exists()) {
                        eprintln!("pyleak: cgroup {} was removed: ending the recording", cg.path);
                        break End::TargetsExited;
                    }
                } else if let Follow::Pids(runtimes, _) = &mut follow {
                    learn_new_stacks(rec, resolver);
                    runtimes.refresh(rec, syms);
                    if child.is_none() && rec.targets.iter().all(|&pid| !alive(pid) || rec.is_frozen(pid)) {
                        break End::TargetsExited;
                    }
                }
                if log::log_enabled!(log::Level::Debug) {
                    footprint(rec, &lock(syms), resolver, &follow, sampler);
                }
                if !stacks_full_said && rec.drop_count(Drop::StacksFull) > 0 {
                    stacks_full_said = true;
                    eprintln!("pyleak: warning: {}", crate::report::text::stacks_full_hint());
                }
                if sampler.view == View::Top {
                    sampler.draw(rec);
                } else if !args.quiet && started.elapsed() >= TICK {
                    status_line(rec, started, &mut last_events, status_tty);
                }
            }
            _ = sample_tick.tick() => {
                rec.drain();
                follow.poll(rec, resolver, syms);
                learn_new_stacks(rec, resolver);
                census_execd(sampler, &follow, child);
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
            // The sweep right after a window judges the samples while the code that made
            // them is still at work (the traps slowed it through the window): a block it
            // freed and took again for an equal object, a dict or a list a fingerprint
            // cannot tell apart, would pass for the sample. Judged again at a moment
            // unrelated to the windows, such a sample is found freed as soon as its code
            // rests, and a sample found freed once is gone for good.
            _ = async { tokio::time::sleep_until(judge_at.unwrap_or_else(tokio::time::Instant::now)).await }, if judge_at.is_some() => {
                judge_at = None;
                rec.drain();
                if let Err(e) = rec.sweep() {
                    log::warn!("judging pymalloc samples: {e}");
                }
            }
            _ = tokio::time::sleep_until(window_at), if rec.samples_pymalloc() => {
                if rec.windows().is_some_and(|w| w.is_open()) {
                    close_and_judge(rec, None)?;
                    let gap = next_gap(period, window);
                    let now = tokio::time::Instant::now();
                    window_at = now + gap;
                    judge_at = Some(now + gap.mul_f64(0.25 + 0.5 * uniform()));
                } else if rec.book().full {
                    window_at = tokio::time::Instant::now() + period;
                } else {
                    rec.open_window()?;
                    window_at = tokio::time::Instant::now() + window;
                }
            }
            _ = sigint.recv() => {
                signalled = libc::SIGINT;
                signalled_ms = monotonic_ms();
                break End::Signal;
            }
            _ = sigterm.recv() => {
                signalled = libc::SIGTERM;
                signalled_ms = monotonic_ms();
                break End::Signal;
            }
            _ = async { sighup.as_mut().expect("guarded").recv().await }, if sighup.is_some() => {
                signalled = libc::SIGHUP;
                signalled_ms = monotonic_ms();
                break End::Signal;
            }
            // The command stopped at its interpreter's shutdown (`--census`, sampled pymalloc): its
            // samples judged and its last census taken now, before the interpreter tears
            // its heap down, then it goes on.
            hold = async { holds.as_mut().expect("guarded").recv().await }, if holds.is_some() => {
                match hold {
                    Some(Hold { at_exit, reply }) => {
                        rec.drain();
                        let frozen = child.is_some_and(|pid| rec.frozen_in_kernel(pid));
                        // At its shutdown: the kernel froze it there. At its exit: only
                        // if it never froze (os._exit, a fatal signal: the heap as it
                        // was), and when there is something to read.
                        let ours = if at_exit {
                            !frozen && (sampler.censuses.is_some() || rec.samples_pymalloc())
                        } else {
                            frozen
                        };
                        if ours {
                            follow.poll(rec, resolver, syms);
                            learn_new_stacks(rec, resolver);
                            // The pymalloc samples judged against the heap the report
                            // describes (the last window's were not confirmed yet).
                            close_and_judge(rec, child)?;
                            census_execd(sampler, &follow, child);
                            sampler.hold(rec, &lock(syms), resolver);
                        }
                        let _ = reply.send(ours);
                    }
                    None => holds = None,
                }
            }
            status = async { child_exit.as_mut().expect("guarded").await }, if child_exit.is_some() => {
                child_exit = None;
                exit = status.ok().flatten();
                break End::TargetsExited;
            }
        }
    };
    // Execs are not handled from here on: a launched command is not held at them, nor at
    // its interpreter's shutdown.
    if let Some(gate) = &exec_gate {
        gate.open();
    }
    drop(holds);
    if status_tty && !args.quiet && sampler.view == View::StatusLine {
        eprintln!();
    }
    // The last window closes, and every sample is judged once more while the targets live.
    close_and_judge(rec, None)?;
    // The last moment counts for growth too.
    rec.drain();
    follow.poll(rec, resolver, syms);
    learn_new_stacks(rec, resolver);
    sampler.sample(rec, &lock(syms), resolver);
    if let (Some(pid), Some(wait)) = (child, child_exit) {
        // Ended by a signal: the command gets the same one (unless a terminal's Ctrl-C
        // already reached it) and a moment to shut down, so its interpreter's teardown
        // freezes its state as in a normal exit. Ended by -d: it goes on, untraced.
        let grace = if end == End::Signal {
            // `q` in the live view, or a failed sample: as SIGTERM.
            let signal = if signalled != 0 {
                signalled
            } else {
                libc::SIGTERM
            };
            // A signal the command got as pyleak did (a Ctrl-C reaches the whole
            // foreground group, a terminal's hang-up its session, `kill -TERM -PGID` or a
            // service manager's stop the whole group; its tracer sees it within
            // milliseconds): not sent again.
            let mut reached = signal_reached_child(signal, pid);
            if let (libc::SIGINT | libc::SIGHUP | libc::SIGTERM, false, Some(seen), true) =
                (signal, reached, &child_signals, signalled != 0)
            {
                for _ in 0..20 {
                    if seen.last_ms(signal) + SIGNAL_SKEW_MS >= signalled_ms {
                        reached = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if !reached {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid as libc::pid_t, signal) };
            }
            CHILD_GRACE
        } else {
            Duration::ZERO
        };
        if let Ok(Ok(status)) = tokio::time::timeout(grace, wait).await {
            exit = status;
        }
    }
    rec.drain();
    Ok((end, exit))
}

/// The wait from one window's close to the next window's opening: exponential, so window
/// starts form a Poisson process of mean interval `period` (no beat with the program's own
/// period), less the window itself.
fn next_gap(period: Duration, window: Duration) -> Duration {
    let u = loop {
        let r = uniform();
        if r > 0.0 {
            break r;
        }
    };
    let mean = period.saturating_sub(window).as_secs_f64();
    Duration::from_secs_f64((-u.ln() * mean).min(mean * 20.0))
}

/// Whether `signal` sent to pyleak most likely reached the command `child` too: a SIGINT
/// while pyleak's process group, which the command shares, is its terminal's foreground
/// group (Ctrl-C signals the whole group). Sending it again would interrupt the command's
/// own handling of the first (a `KeyboardInterrupt` in its cleanup).
fn signal_reached_child(signal: i32, child: u32) -> bool {
    if signal != libc::SIGINT {
        return false;
    }
    // SAFETY: plain queries of process groups and of the terminal on stdin/stderr.
    unsafe {
        let ours = libc::getpgrp();
        let same_group = libc::getpgid(child as libc::pid_t) == ours;
        let foreground = libc::tcgetpgrp(libc::STDIN_FILENO) == ours
            || libc::tcgetpgrp(libc::STDERR_FILENO) == ours;
        same_group && foreground
    }
}

/// Closes the sampling window if one is open and judges every pymalloc sample (those of
/// `held`, a launched command stopped at its freeze, too): the window's page faults are
/// drained first, so they count before its samples are weighed.
fn close_and_judge(rec: &mut Recorder, held: Option<u32>) -> anyhow::Result<()> {
    rec.close_window()?;
    rec.drain();
    if let Err(e) = rec.sweep_holding(held) {
        log::warn!("judging pymalloc samples: {e}");
    }
    rec.end_closing()
}

/// With `--census`: a launched command that became Python by an exec (`env python3`,
/// `bash -c 'python3 …'`) is followed from then on, like one launched directly.
fn census_execd(sampler: &mut Sampler, follow: &Follow<'_>, child: Option<u32>) {
    let (Some(c), Some(pid), Follow::Pids(_, children)) =
        (sampler.censuses.as_mut(), child, follow)
    else {
        return;
    };
    if !c.has(pid) {
        if let Some(rt) = children.runtime(pid) {
            c.add(pid, rt, true);
        }
    }
}

/// Whether `signal` is ignored in pyleak (as `nohup` leaves SIGHUP).
fn ignored(signal: i32) -> bool {
    // SAFETY: querying a disposition into a zeroed sigaction; nothing is changed.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// A number drawn uniformly from [0, 1).
fn uniform() -> f64 {
    // SAFETY: libc's generator, seeded by nothing: no secret is drawn here.
    unsafe { libc::rand() as f64 / (libc::RAND_MAX as f64 + 1.0) }
}

/// What pyleak's own memory holds, per kind of state, on one debug line (`RUST_LOG=debug`;
/// `cargo xtask soak` reads it to see what grows).
fn footprint(
    rec: &Recorder,
    syms: &Symbolizer,
    resolver: &python::Resolver,
    follow: &Follow<'_>,
    sampler: &Sampler,
) {
    let (maps, modules) = syms.footprint();
    let (procs, codes, stacks) = resolver.footprint();
    let (members, held) = match follow {
        Follow::Group(g) => g.footprint(),
        Follow::Pids(..) => (0, 0),
    };
    log::debug!(
        "footprint: timeline {} series x {} samples; {}; symbols: {maps} memory maps, {modules} files; python: {procs} processes, {codes} code objects, {stacks} stacks; group: {members} members, {held} files held",
        sampler.timeline.keys(),
        sampler.timeline.len(),
        rec.footprint(),
    );
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
    for layer in Layer::UPROBED {
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
