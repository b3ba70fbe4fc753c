//! Batched reads of another process's memory with `process_vm_readv` (up to `IOV_MAX`
//! ranges a call), and an in-memory stand-in for tests. Never writes.

#[cfg(test)]
use std::collections::BTreeMap;

/// Why one range could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFail {
    /// Not mapped in the target (`EFAULT`): for a pymalloc pool, its arena was freed.
    Unmapped,
    /// Anything else: the process is gone, no permission.
    Failed,
}

/// What reading has cost so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// System calls made.
    pub syscalls: u64,
    /// Ranges asked for.
    pub ranges: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Ranges that could not be read, for any reason: unmapped ones included (for a pool,
    /// that is a verdict: its arena was freed), and those whose samples are left unjudged.
    pub failed: u64,
}

/// Reads ranges of a target's memory, each whole or not at all.
pub trait ReadMemory {
    /// Reads each `(address, length)`; one result per range, in order.
    fn read_batch(&mut self, ranges: &[(u64, usize)]) -> Vec<Result<Vec<u8>, ReadFail>>;

    /// What reading has cost so far.
    fn stats(&self) -> ReadStats;
}

/// `IOV_MAX`: ranges per `process_vm_readv` call.
const IOV_MAX: usize = 1024;

/// Reads a live process with `process_vm_readv` (needs ptrace access: root, or a child of
/// the same user).
pub struct VmReader {
    pid: libc::pid_t,
    stats: ReadStats,
}

impl VmReader {
    /// A reader of `pid`'s memory.
    pub fn new(pid: u32) -> VmReader {
        VmReader {
            pid: pid as libc::pid_t,
            stats: ReadStats::default(),
        }
    }

    /// One `process_vm_readv` over `ranges` into `bufs`: the bytes read, or the errno.
    fn readv(&mut self, ranges: &[(u64, usize)], bufs: &mut [Vec<u8>]) -> Result<usize, i32> {
        let local: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let remote: Vec<libc::iovec> = ranges
            .iter()
            .map(|&(addr, len)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            })
            .collect();
        self.stats.syscalls += 1;
        // SAFETY: every local iovec points into a live buffer of its stated length, owned
        // by `bufs` for the whole call; remote addresses are only read by the kernel.
        let n = unsafe {
            libc::process_vm_readv(
                self.pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(n as usize)
        }
    }
}

impl ReadMemory for VmReader {
    fn read_batch(&mut self, ranges: &[(u64, usize)]) -> Vec<Result<Vec<u8>, ReadFail>> {
        let mut out: Vec<Option<Result<Vec<u8>, ReadFail>>> = vec![None; ranges.len()];
        let mut i = 0;
        while i < ranges.len() {
            let end = (i + IOV_MAX).min(ranges.len());
            let mut bufs: Vec<Vec<u8>> = ranges[i..end].iter().map(|&(_, l)| vec![0; l]).collect();
            match self.readv(&ranges[i..end], &mut bufs) {
                // The first range failed: say why, go on after it.
                Err(errno) => {
                    out[i] = Some(Err(if errno == libc::EFAULT {
                        ReadFail::Unmapped
                    } else {
                        ReadFail::Failed
                    }));
                    if errno == libc::ESRCH || errno == libc::EPERM {
                        // The process is gone or closed to us: nothing else will read.
                        for o in out.iter_mut().skip(i + 1) {
                            *o = Some(Err(ReadFail::Failed));
                        }
                        break;
                    }
                    i += 1;
                }
                // The kernel stops at the first range it cannot read whole.
                Ok(mut n) => {
                    self.stats.bytes += n as u64;
                    let mut next = end;
                    for (k, buf) in bufs.into_iter().enumerate() {
                        if n >= buf.len() {
                            n -= buf.len();
                            out[i + k] = Some(Ok(buf));
                        } else {
                            out[i + k] = Some(Err(ReadFail::Unmapped));
                            next = i + k + 1;
                            break;
                        }
                    }
                    i = next;
                }
            }
        }
        self.stats.ranges += ranges.len() as u64;
        let out: Vec<_> = out
            .into_iter()
            .map(|r| r.unwrap_or(Err(ReadFail::Failed)))
            .collect();
        self.stats.failed += out.iter().filter(|r| r.is_err()).count() as u64;
        out
    }

    fn stats(&self) -> ReadStats {
        self.stats
    }
}

#[cfg(test)]
/// A target's memory made of regions, for tests: a range inside one region reads,
/// anything else is unmapped.
#[derive(Debug, Default, Clone)]
pub struct FakeMemory {
    /// Regions by start address.
    pub regions: BTreeMap<u64, Vec<u8>>,
    stats: ReadStats,
}

#[cfg(test)]
impl FakeMemory {
    /// Maps `bytes` at `addr`.
    pub fn map(&mut self, addr: u64, bytes: Vec<u8>) {
        self.regions.insert(addr, bytes);
    }

    /// The region holding `addr`, writable, as (start, bytes).
    pub fn at_mut(&mut self, addr: u64) -> Option<(u64, &mut Vec<u8>)> {
        let (&start, bytes) = self.regions.range_mut(..=addr).next_back()?;
        ((addr - start) < bytes.len() as u64).then_some((start, bytes))
    }

    /// Writes a little-endian word at `addr` (which must be mapped).
    pub fn put(&mut self, addr: u64, value: u64) {
        let (start, bytes) = self.at_mut(addr).expect("mapped");
        let off = (addr - start) as usize;
        bytes[off..off + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn read_one(&self, addr: u64, len: usize) -> Result<Vec<u8>, ReadFail> {
        let (&start, bytes) = self
            .regions
            .range(..=addr)
            .next_back()
            .ok_or(ReadFail::Unmapped)?;
        let off = (addr - start) as usize;
        bytes
            .get(off..off + len)
            .map(<[u8]>::to_vec)
            .ok_or(ReadFail::Unmapped)
    }
}

#[cfg(test)]
impl ReadMemory for FakeMemory {
    fn read_batch(&mut self, ranges: &[(u64, usize)]) -> Vec<Result<Vec<u8>, ReadFail>> {
        self.stats.syscalls += 1;
        self.stats.ranges += ranges.len() as u64;
        let out: Vec<_> = ranges.iter().map(|&(a, l)| self.read_one(a, l)).collect();
        for r in &out {
            match r {
                Ok(b) => self.stats.bytes += b.len() as u64,
                Err(_) => self.stats.failed += 1,
            }
        }
        out
    }

    fn stats(&self) -> ReadStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_range_by_range() {
        let (a, b) = (vec![7u8; 64], vec![9u8; 4096]);
        let mut r = VmReader::new(std::process::id());
        let ranges = [
            (a.as_ptr() as u64, a.len()),
            (0x10, 8), // never mapped
            (b.as_ptr() as u64, b.len()),
            (b.as_ptr() as u64 + 8, 16),
        ];
        let out = r.read_batch(&ranges);
        assert_eq!(out[0].as_deref(), Ok(&a[..]));
        assert_eq!(out[1], Err(ReadFail::Unmapped));
        assert_eq!(out[2].as_deref(), Ok(&b[..]));
        assert_eq!(out[3].as_deref(), Ok(&b[8..24]));
        // One call, stopped at the unmapped range, then one for the rest.
        let stats = r.stats();
        assert_eq!((stats.syscalls, stats.ranges, stats.failed), (2, 4, 1));
        assert_eq!(stats.bytes, 64 + 4096 + 16);
    }

    #[test]
    fn a_process_gone_fails_every_range() {
        // The kernel does not hand out pid 0x3fff_fff0 (above pid_max's ceiling).
        let mut r = VmReader::new(0x3fff_fff0);
        let out = r.read_batch(&[(0x1000, 8), (0x2000, 8)]);
        assert_eq!(out, [Err(ReadFail::Failed), Err(ReadFail::Failed)]);
        assert_eq!(r.stats().syscalls, 1);
    }
}
