//! Watches a traced process's allocator tables (read from `/proc/PID/mem`, never written)
//! and says in one line when they no longer point at the functions CPython starts with:
//! `PYTHONMALLOC=malloc` (Python's allocations go to the C heap, so they show in the
//! `pymem_raw` and `libc` layers), or hooks (tracemalloc, `PYTHONMALLOC=debug`), which call
//! the original allocators, so the `pymalloc` counts stay right.

use std::{
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSegment as _};

use super::{
    elf::ElfFile,
    tables::{find_table, AllocTable, Domain},
};

/// What the tables point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableState {
    /// The functions the file initialises them with.
    Original,
    /// The object and mem domains use the raw domain's functions (`PYTHONMALLOC=malloc`).
    Malloc,
    /// Other functions (tracemalloc's or the debug hooks).
    Hooked,
}

/// Classifies live tables against the file's initial ones (`initial`/`live`: raw, mem, obj).
pub fn classify(initial: &[AllocTable; 3], live: &[[u64; 4]; 3]) -> TableState {
    if (0..3).all(|d| live[d] == initial[d].functions) {
        return TableState::Original;
    }
    let raw = initial[0].functions;
    if live[1] == raw && live[2] == raw {
        return TableState::Malloc;
    }
    TableState::Hooked
}

/// One process's tables, checked from time to time.
pub struct AllocWatch {
    pid: u32,
    file: PathBuf,
    base_vaddr: u64,
    tables: [AllocTable; 3],
    bias: Option<u64>,
    said: TableState,
    /// The state read at the previous check: a change is said when two checks in a row
    /// agree. While the interpreter starts, CPython swaps the raw table for a moment
    /// (`_PyMem_SetDefaultAllocator` around reading its configuration, 3.6–3.9): one read
    /// then is no hook.
    last: TableState,
}

impl AllocWatch {
    /// A watch for `pid`, whose Python runtime is in `file`; `None` when the file's tables
    /// cannot be found.
    pub fn new(pid: u32, file: &Path) -> Option<AllocWatch> {
        let elf = ElfFile::open(file).ok()?;
        let tables = [
            find_table(&elf, Domain::Raw)?,
            find_table(&elf, Domain::Mem)?,
            find_table(&elf, Domain::Obj)?,
        ];
        let base_vaddr = object::File::parse(elf.data())
            .ok()?
            .segments()
            .map(|s| s.address())
            .min()?
            & !0xfff;
        Some(AllocWatch {
            pid,
            file: file.to_owned(),
            base_vaddr,
            tables,
            bias: None,
            said: TableState::Original,
            last: TableState::Original,
        })
    }

    /// Reads the live tables and says (once per change) what they point at.
    pub fn check(&mut self) {
        if self.bias.is_none() {
            self.bias = crate::python::file_load_bias(self.pid, &self.file, self.base_vaddr);
        }
        let Some(bias) = self.bias else { return };
        let Some(state) = self.read(bias) else { return };
        let previous = std::mem::replace(&mut self.last, state);
        if state != previous {
            return;
        }
        // Said once per change to a replaced state; going back is not news.
        let said = std::mem::replace(&mut self.said, state);
        if state == said || state == TableState::Original {
            return;
        }
        let pid = self.pid;
        match state {
            TableState::Original => {}
            TableState::Malloc => eprintln!(
                "pyleak: warning: process {pid}: Python's object allocator is replaced by malloc (PYTHONMALLOC=malloc): its allocations are reported in the pymem_raw and libc layers, the pymalloc layer stays empty"
            ),
            TableState::Hooked => eprintln!(
                "pyleak: warning: process {pid}: Python's allocator tables point at hooks (tracemalloc or PYTHONMALLOC=debug): pyleak counts the allocators the hooks call (debug hooks add their padding to each size)"
            ),
        }
    }

    fn read(&self, bias: u64) -> Option<TableState> {
        let mem = std::fs::File::open(format!("/proc/{}/mem", self.pid)).ok()?;
        let mut live = [[0u64; 4]; 3];
        for (d, t) in self.tables.iter().enumerate() {
            let mut buf = [0u8; 32];
            mem.read_exact_at(&mut buf, t.address.wrapping_add(bias) + 8)
                .ok()?;
            for (i, f) in live[d].iter_mut().enumerate() {
                let v = u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().ok()?);
                *f = v.wrapping_sub(bias);
            }
        }
        Some(classify(&self.tables, &live))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_tables() {
        let t = |a: u64| AllocTable {
            address: a,
            functions: [a + 1, a + 2, a + 3, a + 4],
        };
        let initial = [t(0x100), t(0x200), t(0x200)];
        let f = |i: usize| initial[i].functions;
        assert_eq!(
            classify(&initial, &[f(0), f(1), f(2)]),
            TableState::Original
        );
        assert_eq!(classify(&initial, &[f(0), f(0), f(0)]), TableState::Malloc);
        let hook = [0x900, 0x901, 0x902, 0x903];
        assert_eq!(classify(&initial, &[hook, hook, hook]), TableState::Hooked);
        assert_eq!(classify(&initial, &[f(0), f(1), hook]), TableState::Hooked);
    }
}
