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

use anyhow::Context as _;

/// A command forked, waiting to exec until [`Launched::start`].
///
/// A dedicated thread forks it and stays its ptrace tracer (ptrace requests must come from
/// the thread that forked). The only use of ptrace is `PTRACE_O_TRACEEXIT`: the command
/// stops once as it exits, with its memory map still in place, so pyleak can read it for
/// symbols even when the command lives a millisecond; signals are passed on unchanged.
pub struct Launched {
    /// Its pid.
    pub pid: u32,
    go: Option<std::sync::mpsc::Sender<()>>,
    /// Resolves to how the command ended (`None` if it could not be waited for).
    pub exited: Option<tokio::sync::oneshot::Receiver<Option<ExitStatus>>>,
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
    let (pid_tx, pid_rx) = std::sync::mpsc::channel::<std::io::Result<u32>>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pyleak-launcher".into())
        .spawn(move || {
            let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
            argv_ptrs.push(std::ptr::null());
            let (pid, go_fd) = match fork_paused(&path, &argv_ptrs) {
                Ok(v) => v,
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                    return;
                }
            };
            let _ = pid_tx.send(Ok(pid));
            let started = go_rx.recv().is_ok();
            if started {
                let b = 1u8;
                // SAFETY: writing one byte from a valid buffer to our pipe end.
                unsafe { libc::write(go_fd, (&b as *const u8).cast(), 1) };
            }
            // SAFETY: closing our pipe end once; unstarted, the child exits on EOF.
            unsafe { libc::close(go_fd) };
            let _ = exit_tx.send(trace_until_exit(pid, &on_exit));
        })?;
    let pid = pid_rx.recv().context("launcher thread")?.context("fork")?;
    Ok(Launched {
        pid,
        go: Some(go_tx),
        exited: Some(exit_rx),
    })
}

/// Forks; the child asks to be traced, waits for a byte on a pipe, then execs.
fn fork_paused(
    path: &CString,
    argv: &[*const libc::c_char],
) -> std::io::Result<(u32, libc::c_int)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
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
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            let mut b = 0u8;
            if libc::read(fds[0], (&mut b as *mut u8).cast(), 1) != 1 {
                // pyleak gave up before starting the command.
                libc::_exit(127);
            }
            libc::execv(path.as_ptr(), argv.as_ptr());
            let msg = b"pyleak: exec of the command failed\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(fds[0]) };
    Ok((pid as u32, fds[1]))
}

/// Runs the child to its end as its tracer; returns how it ended.
fn trace_until_exit(pid: u32, on_exit: &impl Fn(u32)) -> Option<ExitStatus> {
    let pid_t = pid as libc::pid_t;
    let mut exec_seen = false;
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
        let inject = if sig == libc::SIGTRAP && event == libc::PTRACE_EVENT_EXIT {
            on_exit(pid);
            0
        } else if sig == libc::SIGTRAP && event == libc::PTRACE_EVENT_EXEC {
            // The command exec'd another program: a stop of our own, nothing to deliver
            // (without PTRACE_O_TRACEEXEC the kernel would send the new program a SIGTRAP,
            // which kills it).
            0
        } else if sig == libc::SIGTRAP && !exec_seen {
            // The stop after the first exec: from here on, only the exit stop matters.
            exec_seen = true;
            let options = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_TRACEEXEC;
            // SAFETY: setting options on our stopped tracee.
            unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid_t, 0, options) };
            0
        } else {
            // A signal for the command: deliver it as if nobody were watching.
            sig
        };
        // SAFETY: resuming our stopped tracee.
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid_t, 0, inject as libc::c_long) };
    }
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
    /// Lets the child exec.
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.go
            .take()
            .context("already started")?
            .send(())
            .context("launcher thread gone")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
