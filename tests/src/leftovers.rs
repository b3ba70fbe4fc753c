//! What of pyleak is left in the kernel after a recording ended, told apart from what
//! another live pyleak holds (a long soak, or another person's test, on the same host).
//!
//! A BPF program or link lives while something holds it: a file descriptor in a process,
//! a pin in bpffs, a link holding its program. A pyleak that exited (or was killed) closed
//! its descriptors, so what it leaves behind is held by no live process. A program or link
//! that a live process outside this test's own process tree holds (through a descriptor,
//! or for a program through a link it holds) is another recording's, not a leftover. The
//! holders are read from `/proc/PID/fd` and `/proc/PID/fdinfo` (the kernel prints
//! `prog_id:` for a `bpf-prog` descriptor and `link_id:`/`prog_id:` for a `bpf_link` one:
//! `bpf_prog_show_fdinfo` and `bpf_link_show_fdinfo` in `kernel/bpf/syscall.c`), not from
//! bpftool's `pids` (which Debian's bpftool 7.1, built without skeletons, does not print).
//!
//! tracefs uprobe events have no owner, so any is a leftover; pyleak makes none (its
//! uprobes are multi-uprobe links, or perf events of the kernel's `uprobe` PMU through aya,
//! which writes `uprobe_events` only on kernels older than 4.17).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::{bpf_links, bpftool_list, is_pyleak_program};

/// Program and link ids held by live processes outside this test's process tree.
#[derive(Debug, Default)]
pub struct Held {
    /// Program ids held by a descriptor, or by a link such a process holds.
    pub programs: HashSet<u64>,
    /// Link ids held by a descriptor.
    pub links: HashSet<u64>,
}

/// The parent of every process now running (from `/proc/PID/stat`, field 4).
fn parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command, in parentheses: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok());
        if let Some(ppid) = ppid {
            out.insert(pid, ppid);
        }
    }
    out
}

/// Whether `pid` is `ancestor` or descends from it, by `parents`.
fn descends(pid: u32, ancestor: u32, parents: &HashMap<u32, u32>) -> bool {
    let mut p = pid;
    // A parent chain is short; the bound only guards against a pid reused mid-walk.
    for _ in 0..4096 {
        if p == ancestor {
            return true;
        }
        match parents.get(&p) {
            Some(&pp) if pp != 0 && pp != p => p = pp,
            _ => return false,
        }
    }
    false
}

/// The value of `key:` in a fdinfo text.
fn fdinfo_field(info: &str, key: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .parse()
        .ok()
}

/// Programs and links that process `pid` holds (none if it is gone).
pub fn held_by(pid: u32) -> Held {
    let mut held = Held::default();
    add_held(pid, &mut held);
    held
}

/// Programs and links that live processes outside the process tree of `me` hold.
pub fn held_by_others(me: u32) -> Held {
    let parents = parents();
    let mut held = Held::default();
    for &pid in parents.keys() {
        if !descends(pid, me, &parents) {
            add_held(pid, &mut held);
        }
    }
    held
}

/// Adds to `held` what `pid`'s descriptors hold.
fn add_held(pid: u32, held: &mut Held) {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return;
    };
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let is_link = target == "anon_inode:bpf_link";
        if !is_link && target != "anon_inode:bpf-prog" {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        )) else {
            continue;
        };
        if let Some(prog) = fdinfo_field(&info, "prog_id") {
            held.programs.insert(prog);
        }
        if is_link {
            if let Some(link) = fdinfo_field(&info, "link_id") {
                held.links.insert(link);
            }
        }
    }
}

/// What of pyleak is in the kernel and held by no live process outside this test's tree.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// (id, name) of pyleak-named programs.
    pub programs: Vec<(u64, String)>,
    /// (id, type, program id) of links running one of pyleak's programs.
    pub links: Vec<(u64, String, u64)>,
    /// `/sys/kernel/tracing/uprobe_events`, trimmed (any line is a leftover).
    pub uprobe_events: String,
}

impl Leftovers {
    /// Nothing left.
    pub fn is_empty(&self) -> bool {
        self.programs.is_empty() && self.links.is_empty() && self.uprobe_events.is_empty()
    }
}

/// pyleak's programs, links and tracefs uprobes in the kernel now, less what live processes
/// outside this test's process tree hold. The kernel is listed before the holders are read,
/// so a recording that starts in between is not mistaken for a leftover; one that ends in
/// between is (its programs go within moments: [`assert_no_pyleak_programs`] retries).
///
/// [`assert_no_pyleak_programs`]: crate::assert_no_pyleak_programs
pub fn pyleak_leftovers() -> Leftovers {
    let programs: Vec<(u64, String)> = bpftool_list("prog")
        .iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?;
            is_pyleak_program(name).then(|| Some((p["id"].as_u64()?, name.to_owned())))?
        })
        .collect();
    let ids: HashSet<u64> = programs.iter().map(|(id, _)| *id).collect();
    let links: Vec<(u64, String, u64)> = bpf_links()
        .into_iter()
        .filter(|(_, _, prog)| ids.contains(prog))
        .collect();
    let uprobe_events = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let held = held_by_others(std::process::id());
    Leftovers {
        programs: programs
            .into_iter()
            .filter(|(id, _)| !held.programs.contains(id))
            .collect(),
        links: links
            .into_iter()
            .filter(|(id, _, _)| !held.links.contains(id))
            .collect(),
        uprobe_events,
    }
}

/// Waits (up to 5 s) until nothing of pyleak is left in the kernel but what another live
/// recording holds ([`pyleak_leftovers`]); panics with what is left.
pub fn assert_no_pyleak_programs() {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = pyleak_leftovers();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left in the kernel: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_fields() {
        let link = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2077\nlink_type:\tuprobe_multi\nlink_id:\t134197\nprog_tag:\tacd3fbaac8bac3fb\nprog_id:\t91472\n";
        assert_eq!(fdinfo_field(link, "link_id"), Some(134197));
        assert_eq!(fdinfo_field(link, "prog_id"), Some(91472));
        assert_eq!(fdinfo_field(link, "map_id"), None);
    }

    #[test]
    fn program_names_full_and_cut_to_15() {
        assert!(is_pyleak_program("sched_process_exit"));
        assert!(is_pyleak_program("sched_process_e"));
        assert!(is_pyleak_program("reuse_holder_en"));
        assert!(is_pyleak_program("alloc_enter"));
        assert!(!is_pyleak_program("alloc_ente"));
        assert!(!is_pyleak_program("sched_process_fork"));
    }

    #[test]
    fn descent() {
        let parents: HashMap<u32, u32> = [(10, 1), (11, 10), (12, 11), (20, 1)].into();
        assert!(descends(12, 10, &parents));
        assert!(descends(10, 10, &parents));
        assert!(!descends(20, 10, &parents));
        assert!(!descends(99, 10, &parents));
    }
}
