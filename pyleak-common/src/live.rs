//! The live-block table: the keys and values of blocks allocated and not yet freed, how a
//! block's key is packed into one word the probes claim with a compare-and-swap, and which
//! bucket it goes to. Both sides read these: the probes claim and free slots, userspace maps
//! the table read-only and walks it.

/// Buckets of the live-block table (`LIVE_KEYS`), [`LIVE_BUCKET_SLOTS`] blocks each: the
/// table holds 2 Mi live blocks over all layers and processes (80 MiB of kernel memory with
/// [`LiveAlloc`]s: a million-object Python heap traced exactly fits, with its ints).
pub const LIVE_TABLE_BUCKETS: u32 = 1 << LIVE_TABLE_BITS;
/// log2 of [`LIVE_TABLE_BUCKETS`].
pub const LIVE_TABLE_BITS: u32 = 18;
/// Blocks per bucket of the live-block table: one cache line of keys.
pub const LIVE_BUCKET_SLOTS: usize = 8;
/// Live blocks tracked in the overflow hash map (`LIVE_ALLOCS`): those whose table bucket
/// was full, or whose address has no table key (see [`live_key`]).
pub const LIVE_ALLOCS_ENTRIES: u32 = 1 << 18;
/// Key of a live allocation: the same address can be live in two layers at once
/// (`PyObject_Malloc(600)` hands out the block `malloc(600)` returned).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllocKey {
    /// Process (thread-group) id.
    pub tgid: u32,
    /// [`Layer`](crate::Layer) number.
    pub layer: u32,
    /// Address of the block.
    pub addr: u64,
}

/// A block allocated and not yet freed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveAlloc {
    /// Bytes requested.
    pub size: u64,
    /// `bpf_ktime_get_ns()` when it was allocated.
    pub ts_ns: u64,
    /// Interned stack ([`StackTrace`](crate::StackTrace)) of the allocating thread.
    pub stack_id: u64,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Process (thread-group) id: in the table, the key holds only its low bits.
    pub tgid: u32,
}

/// Bits of the block address kept in a live-table key (addresses are 16-aligned and below
/// 2^47, so 43 bits).
const LIVE_KEY_ADDR_BITS: u32 = 43;

/// The live-table key of a block: address / 16, layer and the low 19 bits of the process id
/// in one word the probes can claim with a compare-and-swap (0 is a free slot). `None` for
/// an address that does not fit (not 16-aligned, or above 2^47): such blocks go to the
/// overflow hash map.
#[inline(always)]
pub fn live_key(tgid: u32, layer: u32, addr: u64) -> Option<u64> {
    if addr & 15 != 0 || addr >> (LIVE_KEY_ADDR_BITS + 4) != 0 || addr == 0 {
        return None;
    }
    Some((addr >> 4) | ((layer as u64 & 3) << LIVE_KEY_ADDR_BITS) | ((tgid as u64) << 45))
}

/// The (layer, address) a live-table key stands for; the process id is the slot's.
#[inline(always)]
pub fn live_key_parts(key: u64) -> (u32, u64) {
    (
        ((key >> LIVE_KEY_ADDR_BITS) & 3) as u32,
        (key & ((1 << LIVE_KEY_ADDR_BITS) - 1)) << 4,
    )
}

/// The bucket of a live-table key (Fibonacci hashing: the top bits of key × 2^64/φ).
#[inline(always)]
pub fn live_bucket(key: u64) -> u32 {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - LIVE_TABLE_BITS)) as u32
}

/// One bucket of live-table keys; the blocks' [`LiveAlloc`]s are in `LIVE_VALS` at
/// `bucket * LIVE_BUCKET_SLOTS + slot`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveBucket {
    /// [`live_key`]s, 0 where the slot is free.
    pub keys: [u64; LIVE_BUCKET_SLOTS],
}
