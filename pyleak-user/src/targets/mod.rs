//! What is traced: processes by pid, a command pyleak starts, or a group (a cgroup, a
//! container, every Python process). One home for naming a target and checking it exists;
//! `launch` starts a command held before its first instruction, `group` finds cgroups and
//! their processes.

pub mod group;
pub mod launch;

use std::path::{Path, PathBuf};

use self::group::Cgroup;
use crate::{errors::UserError, proctext::Stat};

/// The flags that name what to trace (one kind of target).
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Process to attach to (repeat for several).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Trace every process in a cgroup v2 group and its descendants, including processes
    /// that start there later: a directory of the cgroup v2 mount (absolute, or relative
    /// to the mount). Probes on shared files (libc, libpython) then trap in every process
    /// on the host that maps them; only the group's are counted.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Trace a Docker, containerd, CRI-O or Podman container (its id or a unique prefix):
    /// its cgroup, as with --cgroup.
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
    /// Trace every Python process on the host, including ones that start later.
    #[arg(long)]
    pub all: bool,
    /// The command to run and trace, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The target of a recording, checked.
#[derive(Debug, Clone)]
pub enum Target {
    /// Running processes (`--pid`, repeatable).
    Pids(Vec<u32>),
    /// A command to start (`-- COMMAND ARGS…`): the program resolved, and argv.
    Command {
        /// The executable, as `execvp` would find it.
        program: PathBuf,
        /// Its arguments, argv[0] included.
        argv: Vec<String>,
    },
    /// Every process of a cgroup (`--cgroup`, `--container`), or with `None` every Python
    /// process on the host (`--all`).
    Group(Option<Cgroup>),
}

impl Target {
    /// The one target `args` name; an error says what is wrong with it.
    pub fn from_args(args: &TargetArgs) -> Result<Target, UserError> {
        if !args.pids.is_empty() && !args.command.is_empty() {
            return Err(UserError::PidAndCommand);
        }
        let kinds = [
            !args.pids.is_empty(),
            !args.command.is_empty(),
            args.cgroup.is_some(),
            args.container.is_some(),
            args.all,
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            return Err(UserError::TooManyTargets);
        }
        if let Some(path) = &args.cgroup {
            return Ok(Target::Group(Some(group::resolve(path)?)));
        }
        if let Some(id) = &args.container {
            return Ok(Target::Group(Some(group::resolve_container(id)?)));
        }
        if args.all {
            return Ok(Target::Group(None));
        }
        for &pid in &args.pids {
            check_pid(pid)?;
        }
        match args.command.first() {
            Some(cmd) if cmd.is_empty() => Err(UserError::EmptyCommand),
            Some(cmd) => Ok(Target::Command {
                program: resolve_command(cmd).ok_or_else(|| not_runnable(cmd))?,
                argv: args.command.clone(),
            }),
            None if args.pids.is_empty() => Err(if std::env::args().any(|a| a == "--") {
                UserError::EmptyCommand
            } else {
                UserError::NoTarget
            }),
            None => Ok(Target::Pids(args.pids.clone())),
        }
    }
}

/// Whether `pid` runs (not a zombie, not gone).
pub fn alive(pid: u32) -> bool {
    Stat::of(pid).is_some_and(|s| !s.is_zombie())
}

/// Checks that `pid` names a process pyleak can trace: one that exists, is not a zombie
/// or a kernel thread, and is not pyleak itself.
pub fn check_pid(pid: u32) -> Result<(), UserError> {
    if pid == 0 {
        return Err(UserError::NoSuchPid(pid));
    }
    let Some(stat) = Stat::of(pid) else {
        return Err(UserError::NoSuchPid(pid));
    };
    if pid == std::process::id() {
        return Err(UserError::SelfTarget(pid));
    }
    if stat.is_zombie() {
        return Err(UserError::Zombie {
            pid,
            ppid: stat.ppid,
        });
    }
    if stat.is_kernel_thread() {
        return Err(UserError::KernelThread {
            pid,
            comm: stat.comm,
        });
    }
    // /proc/TID exists for each thread, hidden from listings: a TID names a thread.
    let tgid = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
        });
    if let Some(tgid) = tgid.filter(|&t| t != pid) {
        return Err(UserError::ThreadNotProcess(pid, tgid));
    }
    crate::host::check_seccomp(pid)
}

/// Why `cmd`, which [`resolve_command`] did not find, cannot run: a path that is a
/// directory or lacks the execute bits, else not found.
fn not_runnable(cmd: &str) -> UserError {
    let path = Path::new(cmd);
    match path.metadata() {
        Ok(m) if cmd.contains('/') && m.is_dir() => UserError::CommandIsDirectory(cmd.to_owned()),
        Ok(m) if cmd.contains('/') && m.is_file() => {
            UserError::CommandNotExecutable(cmd.to_owned())
        }
        _ => UserError::CommandNotFound(cmd.to_owned()),
    }
}

/// Resolves a command the way `execvp` would: a path as given, else the first executable
/// on `PATH`.
pub fn resolve_command(cmd: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| executable(p))
}
