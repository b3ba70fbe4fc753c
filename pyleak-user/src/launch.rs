//! `pyleak record -- COMMAND`: start the command stopped before its first instruction, so
//! the probes are in place when it begins.
//!
//! fork, then the child waits on a pipe; the parent attaches and writes one byte; the child
//! execs. (`std::process::Command` with a blocking `pre_exec` deadlocks: spawn waits for
//! the exec.) The fork happens before any thread exists.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

use anyhow::Context as _;

/// A child forked and waiting to exec.
pub struct Launched {
    /// Its pid.
    pub pid: u32,
    go: libc::c_int,
}

/// Forks a child that will exec `program` with `args` (args[0] included) once told to.
pub fn spawn_paused(program: &Path, args: &[String]) -> anyhow::Result<Launched> {
    let path = CString::new(program.as_os_str().as_bytes()).context("command path has a NUL byte")?;
    let argv: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .context("argument has a NUL byte")?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: called while the process has one thread; the child only makes
    // async-signal-safe calls (close, read, execv, write, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls on fds and buffers prepared before fork.
        unsafe {
            libc::close(fds[1]);
            let mut b = 0u8;
            if libc::read(fds[0], (&mut b as *mut u8).cast(), 1) != 1 {
                // pyleak gave up before starting the command.
                libc::_exit(127);
            }
            libc::execv(path.as_ptr(), argv_ptrs.as_ptr());
            let msg = b"pyleak: exec of the command failed\n";
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copy of the read end.
    unsafe { libc::close(fds[0]) };
    Ok(Launched { pid: pid as u32, go: fds[1] })
}

impl Launched {
    /// Lets the child exec.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let b = 1u8;
        // SAFETY: writing one byte from a valid buffer to our pipe end.
        let n = unsafe { libc::write(self.go, (&b as *const u8).cast(), 1) };
        // SAFETY: closing our pipe end once.
        unsafe { libc::close(self.go) };
        self.go = -1;
        if n != 1 {
            return Err(std::io::Error::last_os_error()).context("starting the command");
        }
        Ok(())
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if self.go >= 0 {
            // Never started: closing the pipe makes the child exit without running anything.
            // SAFETY: closing our pipe end once.
            unsafe { libc::close(self.go) };
        }
    }
}

/// Waits for `pid` to exit; returns its exit code (128+signal when killed).
pub fn wait(pid: u32) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r == pid as libc::pid_t {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return -1;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}
