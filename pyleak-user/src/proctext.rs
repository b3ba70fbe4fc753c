//! Parsers of the text the kernel writes in `/proc/PID/maps` and `/proc/PID/stat`
//! (formats in `fs/proc/task_mmu.c` and `fs/proc/array.c`; `man 5 proc`). One home for
//! them, so the cases a hostile or odd process can produce (a file name with spaces, a
//! command name with `)` in it, a truncated line) are handled once, and fuzzed.

/// One line of `/proc/PID/maps`:
/// `start-end perms offset dev inode   path` (hexadecimal numbers; the path may hold
/// spaces and end in ` (deleted)`; anonymous mappings have none, the kernel's own areas
/// read `[heap]`, `[stack]`, `[vdso]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapsLine<'a> {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `rwxp`-style permissions (4 bytes; `-` for a missing one).
    pub perms: &'a str,
    /// Offset into the file, in bytes.
    pub offset: u64,
    /// Inode of the file (0 for anonymous memory).
    pub inode: u64,
    /// The path or the kernel's name for the area; empty for anonymous memory.
    pub path: &'a str,
}

impl<'a> MapsLine<'a> {
    /// Parses one line; `None` when it is not a maps line (a truncated read, garbage, an
    /// end before its start).
    pub fn parse(line: &'a str) -> Option<MapsLine<'a>> {
        let mut rest = line;
        let mut field = || {
            let t = rest.trim_start_matches(' ');
            let end = t.find(' ').unwrap_or(t.len());
            let (f, r) = t.split_at(end);
            rest = r;
            (!f.is_empty()).then_some(f)
        };
        let range = field()?;
        let perms = field()?;
        let offset = field()?;
        let _dev = field()?;
        let inode = field()?;
        let (s, e) = range.split_once('-')?;
        let start = u64::from_str_radix(s, 16).ok()?;
        let end = u64::from_str_radix(e, 16).ok()?;
        if end < start || perms.len() != 4 {
            return None;
        }
        Some(MapsLine {
            start,
            end,
            perms,
            offset: u64::from_str_radix(offset, 16).ok()?,
            inode: inode.parse().ok()?,
            // The path is the rest of the line after the padding, spaces included.
            path: rest.trim_start_matches(' '),
        })
    }

    /// Whether the area is executable.
    pub fn exec(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }

    /// Whether the path names a file (not `[heap]`, not anonymous).
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/')
    }

    /// Whether the mapped file was deleted after it was mapped.
    pub fn deleted(&self) -> bool {
        self.path.ends_with(" (deleted)")
    }
}

/// Every parseable line of a `/proc/PID/maps` text.
pub fn maps(text: &str) -> impl Iterator<Item = MapsLine<'_>> {
    text.lines().filter_map(MapsLine::parse)
}

/// What pyleak reads of `/proc/PID/stat`: `pid (comm) state ppid … flags …`. The command
/// name may hold spaces and parentheses, so fields are counted from the last `)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The command name (`comm`, at most 15 bytes as the kernel keeps it).
    pub comm: String,
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), `T`, `t`, `I`…
    pub state: char,
    /// The parent's pid.
    pub ppid: u32,
    /// The task's `PF_*` flags (`include/linux/sched.h`).
    pub flags: u64,
    /// Field 47, `start_brk` (0 when hidden).
    pub start_brk: u64,
}

/// `PF_KTHREAD` (`include/linux/sched.h`): the task is a kernel thread.
pub const PF_KTHREAD: u64 = 0x0020_0000;

impl Stat {
    /// Parses the text of `/proc/PID/stat`; `None` when it is malformed.
    pub fn parse(text: &str) -> Option<Stat> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        if close < open {
            return None;
        }
        let comm = text[open + 1..close].to_owned();
        let mut f = text[close + 1..].split_whitespace();
        let state = f.next()?.chars().next()?;
        let ppid = f.next()?.parse().ok()?;
        // pgrp, session, tty_nr, tpgid, then flags (field 9).
        let flags = f.nth(4)?.parse().ok()?;
        // start_brk is field 47: 37 fields after flags.
        let start_brk = f.nth(37).and_then(|v| v.parse().ok()).unwrap_or(0);
        Some(Stat {
            comm,
            state,
            ppid,
            flags,
            start_brk,
        })
    }

    /// Reads and parses `/proc/PID/stat`.
    pub fn of(pid: u32) -> Option<Stat> {
        Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// A zombie (exited, not reaped) or dead task.
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }

    /// A kernel thread.
    pub fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let l = MapsLine::parse(
            "7f1c2a000000-7f1c2a028000 r-xp 00028000 fe:01 1835014                    /usr/lib/x86_64-linux-gnu/libc.so.6",
        )
        .unwrap();
        assert_eq!(l.start, 0x7f1c2a000000);
        assert_eq!(l.end, 0x7f1c2a028000);
        assert_eq!(l.offset, 0x28000);
        assert_eq!(l.inode, 1835014);
        assert!(l.exec() && l.is_file() && !l.deleted());
        assert_eq!(l.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        let spaced = MapsLine::parse(
            "00400000-00401000 r--p 00000000 00:2a 77 /tmp/my dir/a b.so (deleted)",
        )
        .unwrap();
        assert_eq!(spaced.path, "/tmp/my dir/a b.so (deleted)");
        assert!(spaced.deleted());
        let anon = MapsLine::parse("7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!(anon.path, "");
        assert_eq!(
            MapsLine::parse("7ffd1000-7ffd2000 rw-p 00000000 00:00 0")
                .unwrap()
                .path,
            ""
        );
        for bad in [
            "",
            "garbage",
            "2000-1000 rw-p 0 00:00 0",
            "1-2 rw 0 0:0 0",
            "1-2 rw-p 0 0:0",
        ] {
            assert_eq!(MapsLine::parse(bad), None, "{bad:?}");
        }
        assert_eq!(maps("x\n1000-2000 r-xp 0 00:00 0 /a\n").count(), 1);
    }

    #[test]
    fn stat_lines() {
        let text = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 3 0 0 18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n";
        let s = Stat::parse(text).unwrap();
        assert_eq!(s.comm, "kthreadd");
        assert_eq!((s.state, s.ppid), ('S', 0));
        assert!(s.is_kernel_thread() && !s.is_zombie());
        let z = Stat::parse("77 (a) b) (c) Z 12 77 77 0 -1 4194628 0").unwrap();
        assert_eq!(z.comm, "a) b) (c");
        assert!(z.is_zombie() && !z.is_kernel_thread());
        assert_eq!(z.ppid, 12);
        let me = Stat::of(std::process::id()).unwrap();
        assert!(!me.is_kernel_thread() && !me.is_zombie());
        assert!(me.start_brk != 0, "a Rust test binary has a heap start");
        for bad in [
            "",
            "1 (x",
            "1 x) S 1",
            ") (",
            "1 (x) S notanumber 1 1 1 1 1",
        ] {
            assert_eq!(Stat::parse(bad), None, "{bad:?}");
        }
    }
}
