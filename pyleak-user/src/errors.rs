//! What a user can get wrong, each with a one-line message that says what to do. An
//! error that has a cause keeps it as its `source`: `main` prints the chain on one line
//! (`cannot write out.json: Permission denied`).

use std::path::PathBuf;

/// Any error kept as a cause.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors a user can hit; `main` prints them as one line and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// eBPF needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN for uprobes).
    #[error("pyleak needs root to load eBPF programs: run it with sudo")]
    NotRoot,
    /// Not root, and some of the capabilities pyleak needs are missing (a list, each with
    /// what it is for).
    #[error("pyleak is missing capabilities: {0}: run it as root, or grant them (e.g. `setpriv --ambient-caps` or a container's `--cap-add`)")]
    MissingCapabilities(String),
    /// The kernel is locked down in confidentiality mode.
    #[error("the kernel is in lockdown confidentiality mode (/sys/kernel/security/lockdown), which closes tracefs and eBPF's kernel reads to pyleak: boot with `lockdown=integrity` (or none) to trace")]
    Lockdown,
    /// `--pid` names a zombie.
    #[error("process {pid} is a zombie: it has exited and waits for its parent {ppid} to reap it; nothing is left to trace")]
    Zombie {
        /// The pid given.
        pid: u32,
        /// Its parent, which has not reaped it.
        ppid: u32,
    },
    /// `--pid` names a kernel thread.
    #[error("PID {pid} is a kernel thread ({comm}), which has no user memory to trace: give a user process, e.g. from `pgrep -a python`")]
    KernelThread {
        /// The pid given.
        pid: u32,
        /// Its name.
        comm: String,
    },
    /// `--pid` names a process a uretprobe would kill (seccomp filter, kernel 6.11–6.13).
    #[error("process {pid} runs under a seccomp filter, and this kernel ({kernel}) kills such a process when a uretprobe returns through the uretprobe syscall (6.11 to 6.13; fixed in 6.14): pyleak will not risk it; trace it on another kernel")]
    SeccompUretprobe {
        /// The pid given.
        pid: u32,
        /// The kernel's release.
        kernel: String,
    },
    /// `--pid` names pyleak itself.
    #[error("PID {0} is pyleak itself: give the process to trace")]
    SelfTarget(u32),
    /// `--duration` not positive, or too long to count.
    #[error("--duration must be above 0 and at most 1e9 seconds, not {0:?}: e.g. `-d 60`, or leave it out to record until Ctrl-C")]
    BadDuration(f64),
    /// `--interval` longer than `--duration`: not one growth sample.
    #[error("--interval {interval} is longer than --duration {duration}: no growth sample would be taken; give an interval below the duration, e.g. `--interval {suggest}`")]
    IntervalOverDuration {
        /// The interval asked for, in seconds.
        interval: f64,
        /// The duration asked for, in seconds.
        duration: f64,
        /// A tenth of the duration.
        suggest: f64,
    },
    /// `--native-depth` outside 1..=32.
    #[error("--native-depth must be 1 to 32, not {0}: e.g. `--native-depth 8`")]
    BadNativeDepth(u32),
    /// `--pid` names no process.
    #[error("no process with PID {0}: check it with `ps -p {0}`")]
    NoSuchPid(u32),
    /// The process went away between finding and attaching.
    #[error("process {0} exited before pyleak could attach: start it again, or use `pyleak record -- COMMAND`")]
    ProcessGone(u32),
    /// Nothing after `--`.
    #[error(
        "empty command after `--`: give the program to run, e.g. `pyleak record -- python3 app.py`"
    )]
    EmptyCommand,
    /// The command is not an executable file on PATH.
    #[error("command `{0}` not found: give a path or a program on PATH")]
    CommandNotFound(String),
    /// The PID given is a thread of another process (a TID).
    #[error("{0} is a thread of process {1}, not a process: give `-p {1}`")]
    ThreadNotProcess(u32, u32),
    /// A live process whose memory map cannot be read.
    #[error("cannot read the memory map of process {0} (/proc/{0}/maps: {1}): pyleak reads it to find the files to probe; a process the kernel shields from other root processes cannot be traced")]
    MapsUnreadable(u32, String),
    /// The command names a directory.
    #[error("`{0}` is a directory, not a command: give the program to run")]
    CommandIsDirectory(String),
    /// The command is a file without execute permission.
    #[error("`{0}` is not executable: `chmod +x` it, or run it through its interpreter (pyleak record -- python3 {0})")]
    CommandNotExecutable(String),
    /// `execv` of the command failed (the command, why).
    #[error("cannot run `{0}`: {1}")]
    ExecFailed(String, String),
    /// Neither `--pid` nor a command.
    #[error("nothing to trace: give `--pid PID`, `--cgroup PATH`, `--container ID`, `--all` or `-- COMMAND ARGS...`")]
    NoTarget,
    /// `census --pid` names a process that runs no CPython.
    #[error("process {0} runs no CPython (no _PyRuntime in the files it maps): give the PID of a Python 3.8-3.13 process")]
    NotPython(u32),
    /// `census --pid` names a process whose CPython runtime file was deleted or replaced
    /// on disk since it was mapped (the pid, the file).
    #[error("process {0} runs a CPython whose file {1} was deleted or replaced on disk since it started (an upgrade?): pyleak reads the runtime's layout from that file; restart the process to take a census")]
    RuntimeDeleted(u32, String),
    /// `census --pid` names a CPython whose heap pyleak cannot read.
    #[error("process {pid} runs CPython {version}, whose heap pyleak cannot read: census supports CPython 3.8-3.13 (GIL builds)")]
    CensusUnsupported {
        /// The process.
        pid: u32,
        /// The version found (`3.14`, `3.7`, `3.13t (free-threaded)`).
        version: String,
    },
    /// Its memory cannot be read (not root, or another user's process under Yama).
    #[error("cannot read the memory of process {0}: run pyleak as root (census reads it with process_vm_readv)")]
    MemoryUnreadable(u32),
    /// The process exited between censuses or during one.
    #[error("process {pid} exited during census {at} of {count}: nothing to report; run the census while it runs")]
    ExitedDuringCensus {
        /// The process.
        pid: u32,
        /// Which census (1-based).
        at: u32,
        /// How many were asked for.
        count: u32,
    },
    /// The interpreter's state is not readable (starting up, shutting down).
    #[error("process {pid}: {what}: try again once it runs Python code")]
    NoInterpreter {
        /// The process.
        pid: u32,
        /// What was missing.
        what: String,
    },
    /// `--count 0`.
    #[error("--count must be 1 or more censuses, not {0}: e.g. `--count 3`")]
    BadCount(u32),
    /// `--pid` and a command together.
    #[error("give either `--pid` or `-- COMMAND`, not both")]
    PidAndCommand,
    /// Two kinds of target at once (`--cgroup` and `--pid`...).
    #[error(
        "give one kind of target: `--pid`, `--cgroup`, `--container`, `--all` or `-- COMMAND`"
    )]
    TooManyTargets,
    /// No cgroup v2 hierarchy to filter by.
    #[error("no cgroup v2 hierarchy is mounted ({0}): mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`")]
    NoCgroup2(String),
    /// `--cgroup` names something that is not a cgroup v2 directory.
    #[error("{path} is not a cgroup v2 directory ({reason}): give a directory under {mount}, e.g. `--cgroup {mount}/system.slice`, or a path relative to it")]
    NotCgroup {
        /// What was given.
        path: PathBuf,
        /// Where cgroup v2 is mounted.
        mount: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `--container` is not a (prefix of a) hexadecimal container id.
    #[error("`{0}` is not a container id: give the hexadecimal id or a prefix of it, as `docker ps`, `podman ps` or `crictl ps` show it")]
    BadContainerId(String),
    /// No container's cgroup has this id.
    #[error("no container with id `{id}` under {root}: check the id with `docker ps --no-trunc` (or podman/crictl ps); is the container running on this host?")]
    ContainerNotFound {
        /// The id given.
        id: String,
        /// The cgroup v2 mount searched.
        root: PathBuf,
    },
    /// The id prefix matches several containers.
    #[error("container id `{id}` matches {count} containers ({matches}...): give more of the id")]
    ContainerAmbiguous {
        /// The id given.
        id: String,
        /// How many matched.
        count: usize,
        /// The first few, shortened.
        matches: String,
    },
    /// tracefs missing and could not be mounted.
    #[error("tracefs is not mounted and mounting it failed ({0}): run `mount -t tracefs tracefs /sys/kernel/tracing`")]
    NoTracefs(String),
    /// A `--layers` entry pyleak does not know.
    #[error("unknown layer `{0}`: choose from pymalloc, pymem_raw, libc, vm, pages, all")]
    BadLayer(String),
    /// A file pyleak must read is not an ELF file it understands.
    #[error("cannot read {path}")]
    BadElf {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Cause,
    },
    /// An output file cannot be created or written (a missing or read-only directory,
    /// a full disk).
    #[error("cannot write {path} ({cause}): give a path in a writable directory with free space")]
    Output {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        cause: std::io::Error,
    },
    /// `--interval` not a positive number (at most 1e9 s).
    #[error("--interval must be above 0 and at most 1e9 seconds, not {0:?}: e.g. `--interval 2`")]
    BadInterval(f64),
    /// `--pymalloc-window`/`--pymalloc-period` out of range.
    #[error("--pymalloc-window {window} with --pymalloc-period {period}: the window must be above 0 s and shorter than the period (defaults 0.05 and 2)")]
    BadWindow {
        /// The window asked for, in seconds.
        window: f64,
        /// The period asked for, in seconds.
        period: f64,
    },
    /// `--min-age` negative.
    #[error("--min-age must be zero or more seconds, not {0}: e.g. `--min-age 1`")]
    BadMinAge(f64),
    /// `pyleak report` input unreadable or not a pyleak report.
    #[error("cannot read report {path} (give a file written by `pyleak record --json FILE`)")]
    BadReport {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Cause,
    },
    /// The kernel had no memory for pyleak's maps.
    #[error("the kernel could not allocate pyleak's maps: they need about {need_mib} MiB of kernel memory at start (more as stacks are found){advice}")]
    MapMemory {
        /// The maps' size, in MiB.
        need_mib: u64,
        /// What to do: raise the memory cgroup's limit (to how much), or free memory.
        advice: String,
    },
    /// The kernel refused to load or attach a program.
    #[error("the kernel refused pyleak's eBPF programs ({0}): pyleak needs a kernel with BTF, uprobes and tracepoints (5.15+)")]
    Ebpf(String),
}
