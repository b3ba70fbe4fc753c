//! What the host must allow before anything is loaded: the capabilities pyleak uses and
//! the kernel's lockdown mode. Each refusal is one line saying what to do. The parsers
//! take the text of the kernel's files, so they are tested (and fuzzed) without root.

use crate::errors::UserError;

/// Where the kernel says its lockdown mode (absent without the lockdown LSM).
pub const LOCKDOWN: &str = "/sys/kernel/security/lockdown";

/// A capability pyleak needs: its number (`include/uapi/linux/capability.h`), its name
/// and what pyleak uses it for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Bit in the `CapEff` mask.
    pub bit: u32,
    /// `CAP_…` name.
    pub name: &'static str,
    /// What for.
    pub why: &'static str,
}

/// The capabilities pyleak needs when it is not root, each measured here as making a
/// recording fail (or see nothing) when missing. `CAP_SYS_ADMIN` stands in for the first
/// two (the kernel accepts it for eBPF and perf events); it is also what mounting tracefs
/// and reading `/proc/PID/map_files` (group targets) take, which fail with their own line.
pub const NEEDED: [Capability; 4] = [
    Capability {
        bit: 39,
        name: "CAP_BPF",
        why: "load eBPF programs and maps",
    },
    Capability {
        bit: 38,
        name: "CAP_PERFMON",
        why: "attach uprobes and tracepoints",
    },
    Capability {
        bit: 19,
        name: "CAP_SYS_PTRACE",
        why: "read another user's memory map and memory",
    },
    Capability {
        bit: 1,
        name: "CAP_DAC_OVERRIDE",
        why: "tracefs files owned by root",
    },
];

/// `CAP_SYS_ADMIN`'s bit, which the kernel accepts in place of CAP_BPF and CAP_PERFMON.
const CAP_SYS_ADMIN: u32 = 21;

/// The effective capability mask in `/proc/self/status` text (`CapEff:\t000001ffffffffff`).
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The needed capabilities missing from mask `caps`.
pub fn missing_caps(caps: u64) -> Vec<Capability> {
    let admin = caps & (1u64 << CAP_SYS_ADMIN) != 0;
    NEEDED
        .iter()
        .filter(|c| caps & (1u64 << c.bit) == 0)
        .filter(|c| !(admin && matches!(c.name, "CAP_BPF" | "CAP_PERFMON")))
        .copied()
        .collect()
}

/// Checks pyleak's own privileges: root, or every capability in [`NEEDED`].
pub fn check_privileges() -> Result<(), UserError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing = effective_caps(&status).map_or_else(|| NEEDED.to_vec(), missing_caps);
    if missing.is_empty() {
        return Ok(());
    }
    if missing.len() == NEEDED.len() && !root {
        return Err(UserError::NotRoot);
    }
    Err(UserError::MissingCapabilities(
        missing
            .iter()
            .map(|c| format!("{} ({})", c.name, c.why))
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

/// The kernel's lockdown mode (`security/lockdown/lockdown.c`), from the text of
/// `/sys/kernel/security/lockdown`: `none integrity [confidentiality]`, the bracketed
/// word being the mode. `None` when the text names none.
pub fn lockdown_mode(text: &str) -> Option<&str> {
    let start = text.find('[')?;
    let end = start + text[start..].find(']')?;
    let mode = &text[start + 1..end];
    (!mode.is_empty() && !mode.contains(char::is_whitespace)).then_some(mode)
}

/// Refuses a kernel in lockdown's confidentiality mode, which closes tracefs
/// (`LOCKDOWN_TRACEFS`) and eBPF's reads of kernel memory (`LOCKDOWN_BPF_READ_KERNEL`):
/// pyleak's tracepoints cannot be found there. Integrity mode leaves both open.
pub fn check_lockdown(path: &std::path::Path) -> Result<(), UserError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(()); // no lockdown LSM in this kernel
    };
    match lockdown_mode(&text) {
        Some("confidentiality") => Err(UserError::Lockdown),
        _ => Ok(()),
    }
}

/// `(major, minor)` of a kernel release string (`6.12.3-amd64`).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The `Seccomp:` mode in `/proc/PID/status` text (0 none, 1 strict, 2 filter).
pub fn seccomp_mode(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a uretprobe would kill a process in seccomp mode `mode` on kernel `version`:
/// kernels 6.11 to 6.13 return from uretprobes through the `uretprobe` syscall, which a
/// seccomp filter that denies unknown syscalls turns into the process's death (the
/// filter is bypassed for it from 6.14, `kernel/seccomp.c`).
pub fn uretprobe_kills(version: (u32, u32), mode: u32) -> bool {
    mode == 2 && ((6, 11)..=(6, 13)).contains(&version)
}

/// Refuses `pid` when a uretprobe would kill it (see [`uretprobe_kills`]).
pub fn check_seccomp(pid: u32) -> Result<(), UserError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    match (kernel_version(&release), seccomp_mode(&status)) {
        (Some(v), Some(mode)) if uretprobe_kills(v, mode) => Err(UserError::SeccompUretprobe {
            pid,
            kernel: release.trim().to_owned(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_from_status() {
        let status = "Name:\tpyleak\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        let caps = effective_caps(status).unwrap();
        assert!(missing_caps(caps).is_empty());
        // CAP_BPF and CAP_PERFMON alone: the other two are missing.
        let some = (1u64 << 39) | (1 << 38);
        let names: Vec<_> = missing_caps(some).iter().map(|c| c.name).collect();
        assert_eq!(names, ["CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE"]);
        // CAP_SYS_ADMIN in place of CAP_BPF and CAP_PERFMON.
        let admin = (1u64 << 21) | (1 << 19) | (1 << 1);
        assert!(missing_caps(admin).is_empty());
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
        assert_eq!(effective_caps(""), None);
    }

    #[test]
    fn seccomp_and_the_uretprobe_syscall() {
        assert_eq!(kernel_version("6.12.3-amd64\n"), Some((6, 12)));
        assert_eq!(kernel_version("6.18.0"), Some((6, 18)));
        assert_eq!(kernel_version("garbage"), None);
        assert_eq!(
            seccomp_mode("Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n"),
            Some(2)
        );
        assert_eq!(seccomp_mode("Seccomp:\t0\n"), Some(0));
        assert!(uretprobe_kills((6, 11), 2) && uretprobe_kills((6, 13), 2));
        assert!(!uretprobe_kills((6, 14), 2) && !uretprobe_kills((6, 10), 2));
        assert!(!uretprobe_kills((6, 12), 0) && !uretprobe_kills((6, 12), 1));
        // This host: the check passes for pyleak's own (unfiltered) process.
        assert!(check_seccomp(std::process::id()).is_ok());
    }

    #[test]
    fn lockdown_modes() {
        assert_eq!(
            lockdown_mode("[none] integrity confidentiality\n"),
            Some("none")
        );
        assert_eq!(
            lockdown_mode("none integrity [confidentiality]\n"),
            Some("confidentiality")
        );
        assert_eq!(
            lockdown_mode("none [integrity] confidentiality"),
            Some("integrity")
        );
        assert_eq!(lockdown_mode("none integrity"), None);
        assert_eq!(lockdown_mode("]["), None);
        assert_eq!(lockdown_mode("[]"), None);
    }
}
