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
