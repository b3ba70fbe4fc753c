//! A copy of a process's writable memory, taken while its threads are briefly stopped, so
//! that a census parses one consistent heap instead of racing the program.
//!
//! Stopping uses `PTRACE_SEIZE` + `PTRACE_INTERRUPT` on every thread (a ptrace stop the
//! program cannot observe: no signal is queued, `SIGSTOP` is never sent), and
//! `PTRACE_DETACH` as soon as the copy is made; a signal that arrives meanwhile is handed
//! back on detach. Every private writable mapping (`rw-p` in `/proc/PID/maps`: pymalloc's
//! arenas, the C heap, libpython's `.data`/`.bss` with the static types and
//! `_PyRuntime`) is read with `process_vm_readv`, one call per mapping. Never writes.

use std::{collections::HashMap, time::Instant};

/// Largest piece of a mapping asked for in one iovec.
const CHUNK: usize = 16 << 20;

/// One copied mapping.
#[derive(Debug)]
struct Region {
    start: u64,
    bytes: Vec<u8>,
}

/// The target's writable memory, as copied.
#[derive(Debug, Default)]
pub struct Image {
    /// Regions by start address, not overlapping.
    regions: Vec<Region>,
}

/// What copying cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyStats {
    /// How long the target was stopped, in milliseconds (0 when it was not).
    pub paused_ms: f64,
    /// Whether it was stopped (it is not when another tracer holds it).
    pub paused: bool,
    /// Bytes copied.
    pub bytes: u64,
    /// Bytes of writable mappings that could not be read.
    pub unreadable_bytes: u64,
    /// When the memory was read: the middle of the pause (or of the reading, when the
    /// target was not stopped). Growth rates are measured between these instants, not
    /// between the moments a census was begun: making the copy's buffers first takes a
    /// varying time (tens of ms on a busy host, more for the first census).
    pub read_at: Option<Instant>,
}

impl Image {
    /// An image of the given regions, for tests.
    #[cfg(test)]
    pub fn from_regions(mut regions: Vec<(u64, Vec<u8>)>) -> Image {
        regions.sort_by_key(|r| r.0);
        Image {
            regions: regions
                .into_iter()
                .map(|(start, bytes)| Region { start, bytes })
                .collect(),
        }
    }

    /// `len` bytes at `addr`, when wholly inside one copied region.
    pub fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let i = self
            .regions
            .partition_point(|r| r.start <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        let off = usize::try_from(addr - r.start).ok()?;
        r.bytes.get(off..off.checked_add(len)?)
    }

    /// The little-endian word at `addr`.
    pub fn word(&self, addr: u64) -> Option<u64> {
        let b = self.bytes(addr, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

/// Private writable mappings of `pid` (start, end), from `/proc/PID/maps`.
fn writable_mappings(pid: u32) -> std::io::Result<Vec<(u64, u64)>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let name = f.nth(3).unwrap_or("");
        if !perms.starts_with("rw") || perms.as_bytes().get(3) != Some(&b'p') {
            continue;
        }
        if name == "[vvar]" || name == "[vsyscall]" || name == "[vvar_vclock]" {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
            out.push((a, b));
        }
    }
    Ok(out)
}

/// A buffer of `len` bytes whose pages are already faulted in, so that copying into it
/// while the target is stopped costs no page faults on pyleak's side.
fn prefaulted(len: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(len);
    buf.resize(len, 1u8);
    buf
}

/// Reads `[start, end)` of `pid` into `buf` (made `end - start` long); on a failure part
/// way, keeps what was read before it (`process_vm_readv` stops at the first unreadable
/// page).
fn read_mapping(pid: u32, start: u64, end: u64, mut buf: Vec<u8>) -> Result<Vec<u8>, i32> {
    let len = usize::try_from(end - start).map_err(|_| libc::EFAULT)?;
    buf.resize(len, 0);
    let mut done = 0usize;
    while done < len {
        let n = (len - done).min(CHUNK * 64);
        let mut local = Vec::new();
        let mut remote = Vec::new();
        let mut off = 0;
        while off < n {
            let piece = (n - off).min(CHUNK);
            local.push(libc::iovec {
                // SAFETY: in bounds of `buf` (done + off + piece <= len).
                iov_base: unsafe { buf.as_mut_ptr().add(done + off) }.cast(),
                iov_len: piece,
            });
            remote.push(libc::iovec {
                iov_base: (start + (done + off) as u64) as *mut libc::c_void,
                iov_len: piece,
            });
            off += piece;
        }
        // SAFETY: every local iovec points into `buf`, alive and not otherwise borrowed
        // for the call; remote addresses are only read by the kernel.
        let got = unsafe {
            libc::process_vm_readv(
                pid as libc::pid_t,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if got <= 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            if done == 0 {
                return Err(if got == 0 { libc::EFAULT } else { errno });
            }
            buf.truncate(done);
            return Ok(buf);
        }
        done += got as usize;
        if (got as usize) < n {
            buf.truncate(done);
            return Ok(buf);
        }
    }
    Ok(buf)
}

/// Threads of `pid` stopped with `PTRACE_SEIZE` + `PTRACE_INTERRUPT`; detached on drop.
struct Stopped {
    /// (thread id, signal to hand back on detach).
    threads: Vec<(libc::pid_t, libc::c_int)>,
}

impl Stopped {
    /// Seizes and stops every thread of `pid`; None when the first cannot be seized (e.g.
    /// another tracer holds it), in which case nothing stays seized.
    fn stop(pid: u32) -> Option<Stopped> {
        let mut stopped = Stopped {
            threads: Vec::new(),
        };
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        for t in tasks.flatten() {
            let Some(tid) = t
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            // SAFETY: plain ptrace requests on a thread id; no memory is passed.
            let ok = unsafe {
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, 0usize) == 0
                    && libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) == 0
            };
            if !ok {
                if stopped.threads.is_empty() {
                    return None;
                }
                // A thread that exited meanwhile: nothing to stop.
                continue;
            }
            stopped.threads.push((tid, 0));
        }
        for (tid, sig) in &mut stopped.threads {
            let mut status = 0;
            // SAFETY: waits for the seized thread's stop; `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(*tid, &mut status, libc::__WALL) };
            if r == *tid && libc::WIFSTOPPED(status) {
                let s = libc::WSTOPSIG(status);
                // A signal-delivery stop (not our interrupt's event stop): hand it back.
                if status >> 16 == 0 && s != libc::SIGTRAP {
                    *sig = s;
                }
            }
        }
        Some(stopped)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &(tid, sig) in &self.threads {
            // SAFETY: detaches a thread this process seized; `sig` is 0 or the signal
            // its stop reported.
            unsafe {
                libc::ptrace(libc::PTRACE_DETACH, tid, 0usize, sig as usize);
            }
        }
    }
}

/// Copies `pid`'s private writable memory, stopping it meanwhile when `pause`.
/// Errors: the process is gone or its maps cannot be read.
pub fn copy(pid: u32, pause: bool) -> std::io::Result<(Image, CopyStats)> {
    let mut stats = CopyStats::default();
    // Buffers for the mappings as they are now, made before the target stops.
    let mut ready: HashMap<(u64, u64), Vec<u8>> = writable_mappings(pid)?
        .into_iter()
        .filter_map(|(a, b)| Some(((a, b), prefaulted(usize::try_from(b - a).ok()?))))
        .collect();
    let started = Instant::now();
    let stopped = if pause { Stopped::stop(pid) } else { None };
    stats.paused = stopped.is_some();
    let maps = writable_mappings(pid);
    let mut regions = Vec::new();
    if let Ok(maps) = &maps {
        for &(start, end) in maps {
            let buf = ready.remove(&(start, end)).unwrap_or_default();
            match read_mapping(pid, start, end, buf) {
                Ok(bytes) => {
                    stats.unreadable_bytes += (end - start) - bytes.len() as u64;
                    stats.bytes += bytes.len() as u64;
                    regions.push(Region { start, bytes });
                }
                Err(libc::ESRCH) => break,
                Err(_) => stats.unreadable_bytes += end - start,
            }
        }
    }
    drop(stopped);
    let took = started.elapsed();
    stats.read_at = Some(started + took / 2);
    if stats.paused {
        stats.paused_ms = took.as_secs_f64() * 1e3;
    }
    maps?;
    if regions.is_empty() {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    regions.sort_by_key(|r| r.start);
    Ok((Image { regions }, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inside_one_region_only() {
        let img = Image::from_regions(vec![(0x2000, vec![1; 16]), (0x1000, vec![2; 16])]);
        assert_eq!(img.bytes(0x1000, 16), Some(&[2u8; 16][..]));
        assert_eq!(img.bytes(0x1008, 16), None);
        assert_eq!(img.word(0x2008), Some(0x0101_0101_0101_0101));
        assert!(img.bytes(0xfff, 1).is_none() && img.bytes(0x3000, 1).is_none());
    }

    #[test]
    fn copies_own_heap() {
        // pyleak's own memory: a Vec on the heap is in a private writable mapping.
        let v = vec![0x5au8; 1 << 16];
        let (img, stats) = copy(std::process::id(), false).expect("own memory");
        assert_eq!(img.bytes(v.as_ptr() as u64, v.len()), Some(&v[..]));
        assert!(!stats.paused && stats.bytes >= v.len() as u64);
    }
}
