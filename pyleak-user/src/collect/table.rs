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
        Self::map(map, name, len, libc::PROT_READ)
    }

    /// A shared read-write mapping (for [`clear_slots`]).
    fn new_writable(map: &Map, name: &str, len: usize) -> anyhow::Result<Self> {
        Self::map(map, name, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    fn map(map: &Map, name: &str, len: usize, prot: libc::c_int) -> anyhow::Result<Self> {
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
                prot,
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

/// Calls `f` with every block the table holds, its slot (`bucket * LIVE_BUCKET_SLOTS +
/// i`) and its raw key (for [`clear_slots`]).
pub fn for_each_live_slot(
    keys: &Map,
    vals: &Map,
    mut f: impl FnMut(AllocKey, LiveAlloc, usize, u64),
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
            let slot = b * LIVE_BUCKET_SLOTS + i;
            let v = vals.get(slot);
            let (layer, addr) = live_key_parts(k);
            f(
                AllocKey {
                    tgid: v.tgid,
                    layer,
                    addr,
                },
                v,
                slot,
                k,
            );
        }
    }
    Ok(())
}

/// Frees table slots `(slot, key)` whose key is still `key`, with a compare-and-swap as
/// the probes do (a slot claimed again since keeps its new block). Returns how many were
/// freed.
pub fn clear_slots(keys: &Map, slots: &[(usize, u64)]) -> anyhow::Result<usize> {
    use std::sync::atomic::{AtomicU64, Ordering};
    if slots.is_empty() {
        return Ok(0);
    }
    let buckets = LIVE_TABLE_BUCKETS as usize;
    let map: Mapped<LiveBucket> = Mapped::new_writable(keys, "LIVE_KEYS", buckets)?;
    let mut n = 0;
    for &(slot, key) in slots {
        let (b, i) = (slot / LIVE_BUCKET_SLOTS, slot % LIVE_BUCKET_SLOTS);
        assert!(b < buckets);
        // SAFETY: in bounds of the shared writable mapping; the key words are 8-aligned
        // and the probes change them only atomically too.
        let word = unsafe {
            AtomicU64::from_ptr((map.ptr as *mut LiveBucket).add(b).cast::<u64>().add(i))
        };
        if word
            .compare_exchange(key, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// Calls `f` with every block the table holds.
pub fn for_each_live(
    keys: &Map,
    vals: &Map,
    mut f: impl FnMut(AllocKey, LiveAlloc),
) -> anyhow::Result<()> {
    for_each_live_slot(keys, vals, |key, block, _, _| f(key, block))
}
