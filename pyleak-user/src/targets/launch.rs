//! `pyleak record -- COMMAND`: start the command stopped before its first instruction, so
//! the probes are in place when it begins.
//!
//! fork, then the child waits on a pipe; the parent attaches and writes one byte; the child
//! execs. (`std::process::Command` with a blocking `pre_exec` deadlocks: spawn waits for
//! the exec.)

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::ExitStatusExt},
    path::Path,
    process::ExitStatus,
};

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::Duration,
};

use anyhow::Context as _;

/// A command forked, waiting to exec until [`Launched::start`].
///
/// A dedicated thread forks it and stays its ptrace tracer (ptrace requests must come from
/// the thread that attached). The only use of ptrace is `PTRACE_O_TRACEEXIT`: the command
/// stops once as it exits, with its memory map still in place, so pyleak can read it for
/// symbols even when the command lives a millisecond; signals are passed on unchanged, and
/// a stop signal stops it as without a tracer (attached with `PTRACE_SEIZE`, its
/// group-stops are left in place with `PTRACE_LISTEN` until a SIGCONT).
pub struct Launched {
    /// Its pid.
    pub pid: u32,
    /// The program, for messages.
    program: String,
    go: Option<std::sync::mpsc::Sender<()>>,
    /// Read end of a close-on-exec pipe the child writes `errno` to when `execv` fails
    /// (end of file: the exec succeeded).
    exec_errno: Option<std::fs::File>,
    /// Resolves to how the command ended (`None` if it could not be waited for).
    pub exited: Option<tokio::sync::oneshot::Receiver<Option<ExitStatus>>>,
    /// When each signal was last delivered to the command (its tracer sees each): whether
    /// a Ctrl-C or a hang-up that reached pyleak reached it too.
    pub signals_seen: Arc<SignalsSeen>,
    /// Holds the command at each exec after its first until the new program is probed.
    pub exec_gate: Arc<ExecGate>,
    /// Each time the command stops at its interpreter's shutdown (the kernel's `SIGURG`, see
    /// `HOLD_AT_FINALIZE` in `pyleak-ebpf/src/lifecycle.rs`) or at its exit: a request to
    /// read its state. Dropping the receiver ends the holds.
    pub holds: Option<tokio::sync::mpsc::UnboundedReceiver<Hold>>,
}

/// The launched command stopped for pyleak to read its state (its heap, intact).
pub struct Hold {
    /// Stopped at its exit (`PTRACE_EVENT_EXIT`, its memory still mapped) rather than at
    /// `Py_FinalizeEx`: the heap is intact only if the interpreter never began its
    /// teardown (`os._exit`, a fatal signal).
    pub at_exit: bool,
    /// Answered once its state is read: `true` when a shutdown stop was pyleak's
    /// (the signal is then suppressed).
    pub reply: std::sync::mpsc::Sender<bool>,
}

/// The longest a launched command is held at its interpreter's shutdown for its state to be read (a
/// census of a large heap takes seconds): past it, it goes on.
const FINALIZE_HOLD_MAX: Duration = Duration::from_secs(60);

/// `si_code` of a signal the kernel sent (`SI_KERNEL`, `include/uapi/asm-generic/siginfo.h`):
/// `bpf_send_signal_thread` sends with it, `kill(2)` cannot.
const SI_KERNEL: i32 = 0x80;

/// When each signal was last delivered to a launched command, in [`monotonic_ms`] (0:
/// never), by signal number (1 to 64, Linux's `_NSIG`).
pub struct SignalsSeen([AtomicU64; 65]);

impl Default for SignalsSeen {
    fn default() -> Self {
        SignalsSeen(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl SignalsSeen {
    /// `signal` is being delivered now.
    fn saw(&self, signal: i32) {
        if let Some(t) = self.0.get(signal as usize) {
            t.store(monotonic_ms(), Ordering::Relaxed);
        }
    }

    /// When `signal` was last delivered (0: never).
    pub fn last_ms(&self, signal: i32) -> u64 {
        self.0
            .get(signal as usize)
            .map_or(0, |t| t.load(Ordering::Relaxed))
    }
}

/// The longest a launched command is held at an exec for its new program's probes: past
/// it, the command goes on (its first calls unseen) and a debug line says so.
const EXEC_HOLD_MAX: Duration = Duration::from_secs(10);

/// Holds a launched command at its ptrace exec stop, after its first exec, until pyleak
/// has probed the program it became: `env python app.py`, `setsid`, `nice` and
/// `bash -c 'python app.py'` exec Python in the same process, whose start-up (and a
/// short script's whole run) would otherwise pass before its probes are in. The kernel
/// announces the exec (`sched:sched_process_exec`) before the stop
/// (`PTRACE_EVENT_EXEC`, both in `fs/exec.c`'s `exec_binprm`), so pyleak learns of each
/// exec while the command waits for it.
#[derive(Default)]
pub struct ExecGate {
    /// How many of the command's execs pyleak has handled (its first included).
    handled: Mutex<u32>,
    cv: Condvar,
    /// Set when nobody will handle execs any more (the recording ended, or children are
    /// not followed): the command is not held.
    open: AtomicBool,
}

impl ExecGate {
    /// pyleak handled one more of the command's execs.
    pub fn handled(&self) {
        *self.handled.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_all();
    }

    /// No exec will be handled from now on: nothing waits.
    pub fn open(&self) {
        self.open.store(true, Ordering::Relaxed);
        self.cv.notify_all();
    }

    /// Waits until `n` execs are handled, the gate is opened, or [`EXEC_HOLD_MAX`] passes;
    /// returns whether the exec was handled in time.
    fn wait(&self, n: u32) -> bool {
        let guard = self.handled.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .cv
            .wait_timeout_while(guard, EXEC_HOLD_MAX, |h| {
                *h < n && !self.open.load(Ordering::Relaxed)
            })
            .unwrap_or_else(|e| e.into_inner());
        *guard >= n
    }
}

/// Forks a child that will exec `program` with `args` (args[0] included) once started;
/// `on_exit(pid)` runs while it stops on its way out.
pub fn spawn_paused(
    program: &Path,
    args: &[String],
    on_exit: impl Fn(u32) + Send + 'static,
) -> anyhow::Result<Launched> {
    let path =
        CString::new(program.as_os_str().as_bytes()).context("command path has a NUL byte")?;
    let argv: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("argument has a NUL byte")?;
    let (pid_tx, pid_rx) = std::sync::mpsc::channel::<std::io::Result<(u32, libc::c_int)>>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    let signals_seen = Arc::new(SignalsSeen::default());
    let seen = Arc::clone(&signals_seen);
    let exec_gate = Arc::new(ExecGate::default());
    let gate = Arc::clone(&exec_gate);
    let (hold_tx, hold_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("pyleak-launcher".into())
        .spawn(move || {
            let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
            argv_ptrs.push(std::ptr::null());
            let (pid, go_fd, errno_fd) = match fork_paused(&path, &argv_ptrs) {
                Ok(v) => v,
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                    return;
                }
            };
            // Traced from here, by this thread: exits and execs stop it.
            let options = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC;
            // SAFETY: seizing our own child, which waits on the pipe.
            unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid as libc::pid_t, 0, options) };
            let _ = pid_tx.send(Ok((pid, errno_fd)));
            let started = go_rx.recv().is_ok();
            if started {
                let b = 1u8;
                // SAFETY: writing one byte from a valid buffer to our pipe end.
                unsafe { libc::write(go_fd, (&b as *const u8).cast(), 1) };
            }
            // SAFETY: closing our pipe end once; unstarted, the child exits on EOF.
            unsafe { libc::close(go_fd) };
            let _ = exit_tx.send(trace_until_exit(pid, &on_exit, &seen, &gate, &hold_tx));
        })?;
    let (pid, errno_fd) = pid_rx.recv().context("launcher thread")?.context("fork")?;
    Ok(Launched {
        pid,
        program: program.display().to_string(),
        go: Some(go_tx),
        // SAFETY: the read end of the pipe, ours alone from here.
        exec_errno: Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(errno_fd) }),
        exited: Some(exit_rx),
        signals_seen,
        exec_gate,
        holds: Some(hold_rx),
    })
}

/// Forks; the child waits for a byte on a pipe, then execs (writing `errno` to a second,
/// close-on-exec pipe if that fails). Returns the pid, the write end of the first pipe and
/// the read end of the second.
fn fork_paused(
    path: &CString,
    argv: &[*const libc::c_char],
) -> std::io::Result<(u32, libc::c_int, libc::c_int)> {
    let mut fds = [0; 2];
    let mut errno_fds = [0; 2];
    // SAFETY: fds are valid arrays of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0
        || unsafe { libc::pipe2(errno_fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the child only makes async-signal-safe calls on data prepared before fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls on fds and buffers prepared before fork.
        unsafe {
            libc::close(fds[1]);
            libc::close(errno_fds[0]);
            let mut b = 0u8;
            if libc::read(fds[0], (&mut b as *mut u8).cast(), 1) != 1 {
                // pyleak gave up before starting the command.
                libc::_exit(127);
            }
            libc::execv(path.as_ptr(), argv.as_ptr());
            let errno = *libc::__errno_location();
            libc::write(errno_fds[1], (&errno as *const i32).cast(), 4);
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copies of the child's ends.
    unsafe {
        libc::close(fds[0]);
        libc::close(errno_fds[1]);
    }
    Ok((pid as u32, fds[1], errno_fds[0]))
}

/// Runs the child to its end as its tracer; returns how it ended.
fn trace_until_exit(
    pid: u32,
    on_exit: &impl Fn(u32),
    signals_seen: &SignalsSeen,
    exec_gate: &ExecGate,
    holds: &tokio::sync::mpsc::UnboundedSender<Hold>,
) -> Option<ExitStatus> {
    let pid_t = pid as libc::pid_t;
    let (mut execs, mut unhandled) = (0, 0);
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid_t, &mut status, libc::__WALL) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return None;
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Some(ExitStatus::from_raw(status));
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        if event == libc::PTRACE_EVENT_STOP {
            // A group-stop (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU delivered): it stays
            // stopped, as untraced, until a SIGCONT. Other event stops just go on.
            let stop = matches!(
                sig,
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
            );
            let request = if stop {
                libc::PTRACE_LISTEN
            } else {
                libc::PTRACE_CONT
            };
            // SAFETY: resuming (or leaving stopped) our stopped tracee.
            unsafe { libc::ptrace(request, pid_t, 0, 0) };
            continue;
        }
        let inject = if sig == libc::SIGTRAP && event == libc::PTRACE_EVENT_EXIT {
            on_exit(pid);
            held(holds, true);
            0
        } else if sig == libc::SIGTRAP && event == libc::PTRACE_EVENT_EXEC {
            // The command exec'd a program: a stop of our own, nothing to deliver. The
            // first exec is the command itself, probed before it started; a later one
            // waits for its new program's probes.
            execs += 1;
            // An exec pyleak never handled (its announcement lost) is not waited for
            // again at each later one.
            if execs > 1 && !exec_gate.wait(execs - unhandled) {
                unhandled += 1;
                log::debug!("process {pid}: went on after exec {execs} before its probes were in");
            }
            0
        } else if sig == libc::SIGURG && sent_by_kernel(pid_t) && held(holds, false) {
            // pyleak's own stop at the interpreter's shutdown, its state read: suppressed.
            0
        } else {
            signals_seen.saw(sig);
            // A signal for the command: deliver it as if nobody were watching.
            sig
        };
        // SAFETY: resuming our stopped tracee.
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid_t, 0, inject as libc::c_long) };
    }
}

/// Whether the signal `pid` stopped for was sent by the kernel (`si_code` `SI_KERNEL`).
fn sent_by_kernel(pid: libc::pid_t) -> bool {
    // SAFETY: reading the stopped tracee's siginfo into a zeroed buffer of its type.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::ptrace(
            libc::PTRACE_GETSIGINFO,
            pid,
            0,
            &mut info as *mut libc::siginfo_t,
        ) == 0
            && info.si_code == SI_KERNEL
    }
}

/// Asks pyleak's recording loop to read the stopped command's state and waits for its
/// answer: whether the stop was pyleak's. False at once when the loop has ended.
/// `at_exit`: stopped at its exit (see [`Hold::at_exit`]).
fn held(holds: &tokio::sync::mpsc::UnboundedSender<Hold>, at_exit: bool) -> bool {
    let (reply, rx) = std::sync::mpsc::channel();
    if holds.send(Hold { at_exit, reply }).is_err() {
        return false;
    }
    rx.recv_timeout(FINALIZE_HOLD_MAX).unwrap_or(false)
}

/// Milliseconds of `CLOCK_MONOTONIC`.
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// The exit status pyleak ends with for a command that ended this way, as a shell gives
/// it (`$?`): its own status, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// How a command ended, in words: `exited with status 3`, `killed by signal 11
/// (Segmentation fault), core dumped`.
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => {
            // SAFETY: strsignal returns a pointer to a NUL-terminated string (static or
            // thread-local) valid until the next call on this thread; copied at once.
            let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(sig)) }
                .to_string_lossy()
                .into_owned();
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("killed by signal {sig} ({name}){core}")
        }
        _ => format!("ended ({status})"),
    }
}

impl Launched {
    /// Lets the command exec. Errors: the exec failed (the command's one-line reason).
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.go
            .take()
            .context("already started")?
            .send(())
            .context("launcher thread gone")?;
        let Some(mut pipe) = self.exec_errno.take() else {
            return Ok(());
        };
        let mut errno = [0u8; 4];
        if std::io::Read::read_exact(&mut pipe, &mut errno).is_ok() {
            let errno = i32::from_ne_bytes(errno);
            let why = std::io::Error::from_raw_os_error(errno).to_string();
            let hint = match errno {
                libc::ENOENT => " (for a script: is its #! interpreter there?)",
                libc::ENOEXEC => " (not a program this machine runs, nor a script with #!)",
                _ => "",
            };
            return Err(crate::errors::UserError::ExecFailed(
                self.program.clone(),
                format!("{why}{hint}"),
            )
            .into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_as_a_shell_gives_them() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGINT)), 130);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGSEGV | 0x80)), 139);
    }

    #[test]
    fn exits_in_words() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9 (Killed)"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGSEGV | 0x80)),
            "killed by signal 11 (Segmentation fault), core dumped"
        );
    }
}
