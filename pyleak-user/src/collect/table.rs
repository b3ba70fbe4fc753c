//! Reading the kernel's live-block table (`LIVE_KEYS`, `LIVE_VALS`) through a read-only
//! mapping of the two array maps: a million slots are read in milliseconds, where one
//! lookup per slot would take a system call each.

use std::os::fd::{AsFd as _, AsRawFd as _};

use anyhow::{bail, Context as _};
use aya::maps::Map;
use pyleak_common::{
    live_key_parts, AllocKey, LiveAlloc, LiveBucket, LIVE_BUCKET_SLOTS, LIVE_TABLE_BUCKETS,
};

/// A read-only mapping of an array map holding `len` values of `T`.
struct Mapped<T> {
    ptr: *const T,
    len: usize,
    bytes: usize,
}

impl<T> Mapped<T> {
    fn new(map: &Map, name: &str, len: usize) -> anyhow::Result<Self> {
        let Map::Array(data) = map else {
            bail!("map {name} is not an array");
        };
        // Array maps lay their values out back to back, each rounded up to 8 bytes: the
        // types read here are multiples of 8 already.
        const { assert!(size_of::<T>().is_multiple_of(8)) };
        let bytes = (len * size_of::<T>()).next_multiple_of(4096);
        // SAFETY: a fresh shared read-only mapping of the map's fd; the kernel checks the
        // map was created mappable and that `bytes` fits in it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("mmap {name}"));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
            bytes,
        })
    }

    /// Value `i`, copied out (probes may change it under us: every `T` here is plain data).
    fn get(&self, i: usize) -> T {
        assert!(i < self.len);
        // SAFETY: in bounds of the mapping, aligned (page-aligned base, 8-byte multiples).
        unsafe { std::ptr::read_volatile(self.ptr.add(i)) }
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.bytes) };
    }
}

/// Calls `f` with every block the table holds.
pub fn for_each_live(
    keys: &Map,
    vals: &Map,
    mut f: impl FnMut(AllocKey, LiveAlloc),
) -> anyhow::Result<()> {
    let buckets = LIVE_TABLE_BUCKETS as usize;
    let keys: Mapped<LiveBucket> = Mapped::new(keys, "LIVE_KEYS", buckets)?;
    let vals: Mapped<LiveAlloc> = Mapped::new(vals, "LIVE_VALS", buckets * LIVE_BUCKET_SLOTS)?;
    for b in 0..buckets {
        let bucket = keys.get(b);
        for (i, &k) in bucket.keys.iter().enumerate() {
            if k == 0 {
                continue;
            }
            let v = vals.get(b * LIVE_BUCKET_SLOTS + i);
            let (layer, addr) = live_key_parts(k);
            f(
                AllocKey {
                    tgid: v.tgid,
                    layer,
                    addr,
                },
                v,
            );
        }
    }
    Ok(())
}
