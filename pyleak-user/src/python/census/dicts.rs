//! Dicts as read from the image: entries of the two key-table layouts (3.8–3.10 sized
//! tables, 3.11+ log2-sized tables with general or unicode entries), split tables whose
//! values live apart (a class's shared keys), and their sizes as `sys.getsizeof` counts.

use super::layout::DictKeys;
use super::objects::{Edge, Heap, MAX_ITEMS};

impl Heap<'_> {
    /// (key, value) pairs of the dict at `d` (either may be 0 for an empty slot).
    pub fn dict_entries(&self, d: u64) -> Option<Vec<(u64, u64)>> {
        let l = self.layout.dict;
        let keys = self.ptr(d + l.keys)?;
        let values = self.word(d + l.values).unwrap_or(0);
        let (entries, esize, koff, voff, n) = self.keys_table(keys)?;
        let mut out = Vec::with_capacity(n as usize);
        for i in 0..n {
            let e = entries + i * esize;
            let k = self.word(e + koff)?;
            let v = if values != 0 {
                self.word(values + l.values_array + i * 8)?
            } else {
                self.word(e + voff)?
            };
            if k != 0 || v != 0 {
                out.push((k, v));
            }
        }
        Some(out)
    }

    /// Where the entries of keys object `keys` are: (address, entry size, key offset,
    /// value offset, entries used).
    pub(super) fn keys_table(&self, keys: u64) -> Option<(u64, u64, u64, u64, u64)> {
        let l = self.layout.dict;
        let n = self.word(keys + l.nentries)?;
        if n > MAX_ITEMS {
            return None;
        }
        match l.keys_shape {
            DictKeys::Sized { size } => {
                let size = self.word(keys + size)?;
                if size > MAX_ITEMS * 2 {
                    return None;
                }
                let ix = ix_size(size);
                Some((keys + l.indices + size * ix, 24, 8, 16, n))
            }
            DictKeys::Log2 {
                log2_index_bytes,
                kind,
                ..
            } => {
                let ib = self.byte(keys + log2_index_bytes)?;
                if ib > 40 {
                    return None;
                }
                let general = self.byte(keys + kind)? == 0;
                let (esize, koff, voff) = if general { (24, 8, 16) } else { (16, 0, 8) };
                Some((keys + l.indices + (1u64 << ib), esize, koff, voff, n))
            }
        }
    }

    /// Bytes of the keys object `keys` when the dict owns it alone (as getsizeof counts).
    pub(super) fn keys_bytes(&self, keys: u64) -> u64 {
        let l = self.layout.dict;
        if self.word(keys) != Some(1) {
            return 0;
        }
        let usable = |n: u64| (n << 1) / 3;
        match l.keys_shape {
            DictKeys::Sized { size } => self.word(keys + size).map_or(0, |s| {
                l.sizeof_keys + s.min(MAX_ITEMS) * ix_size(s) + usable(s.min(MAX_ITEMS)) * 24
            }),
            DictKeys::Log2 {
                log2_size,
                log2_index_bytes,
                kind,
            } => {
                let (Some(s), Some(ib), Some(k)) = (
                    self.byte(keys + log2_size),
                    self.byte(keys + log2_index_bytes),
                    self.byte(keys + kind),
                ) else {
                    return 0;
                };
                if s > 32 || ib > 40 {
                    return 0;
                }
                let esize = if k == 0 { 24 } else { 16 };
                l.sizeof_keys + (1u64 << ib) + usable(1u64 << s) * esize
            }
        }
    }

    /// A module's, class's or instance's dict: the dict is part of its owner, each value a
    /// named reference (its key), keys items.
    pub(super) fn named_dict(&mut self, d: u64, out: &mut Vec<Edge>) {
        out.push(Edge::Part(d));
        for (k, v) in self.dict_entries(d).unwrap_or_default() {
            match self.str_value(k) {
                Some(name) if v != 0 => out.push(Edge::Named(name, v)),
                _ => out.push(Edge::Item(v)),
            }
            out.push(Edge::Item(k));
        }
    }

    /// Named values of shared-key values (`values[i]` named by the class's cached keys).
    pub(super) fn named_values(
        &mut self,
        cached_keys: u64,
        values: u64,
        cap: u64,
        out: &mut Vec<Edge>,
    ) {
        let Some((entries, esize, koff, _, n)) = self.keys_table(cached_keys) else {
            return;
        };
        for i in 0..n.min(cap) {
            let (Some(k), Some(v)) = (
                self.word(entries + i * esize + koff),
                self.word(values + i * 8),
            ) else {
                continue;
            };
            if v == 0 {
                continue;
            }
            match self.str_value(k) {
                Some(name) => out.push(Edge::Named(name, v)),
                None => out.push(Edge::Item(v)),
            }
        }
    }
}

/// Bytes per index of a pre-3.11 keys table of `size` slots.
fn ix_size(size: u64) -> u64 {
    match size {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_sizes() {
        assert_eq!(
            [ix_size(8), ix_size(256), ix_size(1 << 16), ix_size(1 << 32)],
            [1, 2, 4, 8]
        );
    }
}
