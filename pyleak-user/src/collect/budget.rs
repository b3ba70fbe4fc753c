//! How much kernel memory pyleak's maps take, and the memory cgroup limit that may refuse
//! it: when creating the maps fails for want of memory, the error says how much is needed.
//! BPF maps are charged to the memory cgroup of the process creating them (kernel 5.11+,
//! `__GFP_ACCOUNT` in `kernel/bpf/syscall.c`).

/// BPF map types (`include/uapi/linux/bpf.h`).
const HASH: u32 = 1;
const ARRAY: u32 = 2;
const PERCPU_HASH: u32 = 5;
const PERCPU_ARRAY: u32 = 6;
const STACK_TRACE: u32 = 7;
const LRU_HASH: u32 = 9;
const RINGBUF: u32 = 27;

/// `BPF_F_NO_PREALLOC`: the map's elements are allocated as they are inserted.
const NO_PREALLOC: u32 = 1;

/// What a hash map element costs besides its key and value (`struct htab_elem`, ~48 bytes).
const HASH_ELEM_OVERHEAD: u64 = 48;

/// Bytes one map of `map_type` with these sizes takes in the kernel, about (data only:
/// the kernel's fixed headers and rounding to pages are left out).
pub fn map_bytes(map_type: u32, key: u32, value: u32, entries: u32, cpus: u64) -> u64 {
    let round8 = |n: u32| u64::from(n).div_ceil(8) * 8;
    let entries = u64::from(entries);
    match map_type {
        HASH | LRU_HASH => entries * (round8(key) + round8(value) + HASH_ELEM_OVERHEAD),
        PERCPU_HASH => entries * (round8(key) + HASH_ELEM_OVERHEAD + round8(value) * cpus),
        ARRAY => entries * round8(value),
        PERCPU_ARRAY => entries * round8(value) * cpus,
        // One element per stack id and a bucket pointer each.
        STACK_TRACE => entries * (round8(value) + 8 + 8),
        // max_entries is the data size in bytes; its pages are mapped twice, not copied.
        RINGBUF => entries,
        _ => entries * (round8(key) + round8(value)),
    }
}

/// What a hash map's bucket array takes: one `struct bucket` (a list head and a raw
/// spinlock, 16 bytes on x86_64) per bucket, `roundup_pow_of_two(max_entries)` buckets,
/// allocated when the map is created, preallocated or not (`htab_map_alloc` in
/// `kernel/bpf/hashtab.c`).
pub fn hash_buckets_bytes(map_type: u32, entries: u32) -> u64 {
    match map_type {
        HASH | LRU_HASH | PERCPU_HASH => u64::from(entries).next_power_of_two() * 16,
        _ => 0,
    }
}

/// Bytes the maps of the eBPF object `obj` take as they are created, about: every map's
/// bucket array, and the elements of the preallocated ones (the elements of maps with
/// `BPF_F_NO_PREALLOC`, pyleak's interned stacks and per-stack totals, come later and are
/// left out).
pub fn maps_bytes(obj: &[u8]) -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let Ok(obj) = aya_obj::Object::parse(obj) else {
        return 0;
    };
    obj.maps
        .values()
        .map(|m| {
            let elements = if m.map_flags() & NO_PREALLOC == 0 {
                map_bytes(
                    m.map_type(),
                    m.key_size(),
                    m.value_size(),
                    m.max_entries(),
                    cpus,
                )
            } else {
                0
            };
            elements + hash_buckets_bytes(m.map_type(), m.max_entries())
        })
        .sum()
}

/// The memory limit of pyleak's own memory cgroup, if any: its path and bytes (cgroup v2
/// `memory.max`, else v1 `memory.limit_in_bytes`), from `/proc/self/cgroup`.
pub fn own_memory_limit() -> Option<(String, u64)> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    memory_limit(&groups, |path| std::fs::read_to_string(path).ok())
}

/// [`own_memory_limit`] from `/proc/self/cgroup` text, reading files with `read`.
fn memory_limit(groups: &str, read: impl Fn(&str) -> Option<String>) -> Option<(String, u64)> {
    for line in groups.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let file = if controllers.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else if controllers.is_empty() {
            format!("/sys/fs/cgroup/unified{path}/memory.max")
        } else {
            continue;
        };
        // "max", or v1's "no limit" (a huge number), mean none.
        if let Some(limit) = read(&file).and_then(|t| t.trim().parse::<u64>().ok()) {
            if limit < 1 << 60 {
                return Some((path.to_owned(), limit));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes() {
        assert_eq!(map_bytes(ARRAY, 4, 12, 10, 2), 160);
        assert_eq!(map_bytes(PERCPU_ARRAY, 4, 8, 10, 2), 160);
        assert_eq!(map_bytes(HASH, 8, 16, 100, 2), 100 * (8 + 16 + 48));
        assert_eq!(map_bytes(RINGBUF, 0, 0, 1 << 20, 2), 1 << 20);
        assert_eq!(hash_buckets_bytes(HASH, 100), 128 * 16);
        assert_eq!(hash_buckets_bytes(PERCPU_HASH, 1 << 18), (1 << 18) * 16);
        assert_eq!(hash_buckets_bytes(ARRAY, 100), 0);
        let obj = std::fs::read(concat!(env!("OUT_DIR"), "/pyleak")).unwrap();
        let total = maps_bytes(&obj);
        // The live-block table's values alone are 1 Mi slots of 32 bytes.
        assert!(total > 32 << 20, "{total}");
    }

    #[test]
    fn limits_from_cgroup_files() {
        let v1 = "12:memory:/pyleak-test\n0::/user.slice\n";
        let read = |p: &str| {
            (p == "/sys/fs/cgroup/memory/pyleak-test/memory.limit_in_bytes")
                .then(|| "31457280\n".to_owned())
        };
        assert_eq!(
            memory_limit(v1, read),
            Some(("/pyleak-test".into(), 31457280))
        );
        let v2 = "0::/app\n";
        let read =
            |p: &str| (p == "/sys/fs/cgroup/unified/app/memory.max").then(|| "max\n".to_owned());
        assert_eq!(memory_limit(v2, read), None);
    }
}
