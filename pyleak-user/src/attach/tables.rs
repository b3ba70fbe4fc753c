//! CPython's allocator tables (`PyMemAllocatorEx {ctx, malloc, calloc, realloc, free}` for
//! the raw, mem and object domains), found in the file without symbols for them.
//!
//! The exported entry points read their domain's table (`PyObject_Malloc` loads
//! `_PyObject.ctx` and `_PyObject.malloc`, `PyObject_Free` `.ctx` and `.free`), so decoding
//! their first instructions gives the table's address; its initial value, in the file's
//! data (plain bytes in a fixed-address executable, `R_X86_64_RELATIVE` relocations in a
//! PIE or a shared libpython), gives the functions CPython allocates with. This works on
//! stripped and LTO builds alike, where the functions themselves have no names.

use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind, Register};
use object::{Object, ObjectSection, ObjectSegment, RelocationFlags, RelocationTarget};

use super::elf::ElfFile;

/// One domain's table: where it is and what it initially points at (link-time addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocTable {
    /// Address of the `PyMemAllocatorEx` (its `ctx` field).
    pub address: u64,
    /// `malloc`, `calloc`, `realloc`, `free`.
    pub functions: [u64; 4],
}

/// A CPython allocator domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// `PyMem_Raw*`.
    Raw,
    /// `PyMem_*`.
    Mem,
    /// `PyObject_*`.
    Obj,
}

impl Domain {
    /// The exported functions of the domain, each with the table field it reads (field
    /// index: 1 malloc, 2 calloc, 3 realloc, 4 free).
    fn exported(self) -> [(&'static str, u64); 4] {
        match self {
            Domain::Raw => [
                ("PyMem_RawMalloc", 1),
                ("PyMem_RawCalloc", 2),
                ("PyMem_RawRealloc", 3),
                ("PyMem_RawFree", 4),
            ],
            Domain::Mem => [
                ("PyMem_Malloc", 1),
                ("PyMem_Calloc", 2),
                ("PyMem_Realloc", 3),
                ("PyMem_Free", 4),
            ],
            Domain::Obj => [
                ("PyObject_Malloc", 1),
                ("PyObject_Calloc", 2),
                ("PyObject_Realloc", 3),
                ("PyObject_Free", 4),
            ],
        }
    }
}

/// Memory addresses an instruction sequence reads (RIP-relative resolved, or absolute).
fn memory_reads(code: &[u8], addr: u64, max_instructions: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for instr in Decoder::with_ip(64, code, addr, DecoderOptions::NONE)
        .into_iter()
        .take(max_instructions)
    {
        if instr.is_invalid() {
            break;
        }
        for op in 0..instr.op_count() {
            if instr.op_kind(op) != OpKind::Memory {
                continue;
            }
            let absolute =
                instr.memory_base() == Register::None && instr.memory_index() == Register::None;
            if instr.is_ip_rel_memory_operand() {
                out.push(instr.ip_rel_memory_address());
            } else if absolute {
                out.push(instr.memory_displacement64());
            }
        }
        if instr.flow_control() == FlowControl::Return {
            break;
        }
    }
    out
}

/// The table of `domain`: the address every exported function of the domain agrees on
/// (it reads both `ctx` at the table and its own field), with its initial pointers.
pub fn find_table(elf: &ElfFile, domain: Domain) -> Option<AllocTable> {
    let mut address = None;
    for (name, field) in domain.exported() {
        let f = elf.function(name)?;
        let reads = memory_reads(&f.code, f.address, 24);
        let found = reads
            .iter()
            .copied()
            .find(|&t| reads.contains(&t.wrapping_add(8 * field)))?;
        match address {
            None => address = Some(found),
            Some(a) if a == found => {}
            Some(_) => return None,
        }
    }
    let address = address?;
    let mut functions = [0u64; 4];
    for (i, f) in functions.iter_mut().enumerate() {
        *f = elf.initial_pointer(address.checked_add(8 * (i as u64 + 1))?)?;
        if !elf.is_code(*f) {
            return None;
        }
    }
    Some(AllocTable { address, functions })
}

impl ElfFile {
    /// The value the loader leaves in the pointer at link-time address `addr`: a relocation's
    /// result when one applies there (PIE, shared library), else the file's bytes.
    pub fn initial_pointer(&self, addr: u64) -> Option<u64> {
        let file = object::File::parse(self.data()).ok()?;
        if let Some(relocs) = file.dynamic_relocations() {
            for (offset, r) in relocs {
                if offset != addr {
                    continue;
                }
                let RelocationFlags::Elf { r_type } = r.flags() else {
                    return None;
                };
                return match (r_type, r.target()) {
                    (object::elf::R_X86_64_RELATIVE, _) => u64::try_from(r.addend()).ok(),
                    (object::elf::R_X86_64_64, RelocationTarget::Symbol(i)) => {
                        use object::ObjectSymbol;
                        let sym = file.symbol_by_index(i).ok()?;
                        sym.is_definition()
                            .then(|| sym.address().wrapping_add(r.addend() as u64))
                    }
                    _ => None,
                };
            }
        }
        // No relocation: the bytes in the file (or zero in .bss).
        for seg in file.segments() {
            let (start, size) = (seg.address(), seg.size());
            if addr < start || size < 8 || addr - start > size - 8 {
                continue;
            }
            let data = seg.data().ok()?;
            let rel = usize::try_from(addr - start).ok()?;
            return Some(match data.get(rel..rel.checked_add(8)?) {
                Some(b) => u64::from_le_bytes(b.try_into().ok()?),
                None => 0,
            });
        }
        None
    }

    /// Whether `addr` lies in an executable section.
    pub fn is_code(&self, addr: u64) -> bool {
        let Ok(file) = object::File::parse(self.data()) else {
            return false;
        };
        file.sections().any(|s| {
            s.kind() == object::SectionKind::Text
                && addr >= s.address()
                && addr - s.address() < s.size()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_of_a_thunk() {
        // mov rsi,rdi; test rdi,rdi; js +0x10; mov rdi,[rip+0x2ad071]; jmp [rip+0x2ad073]
        let code = [
            0x48, 0x89, 0xfe, 0x48, 0x85, 0xff, 0x78, 0x10, 0x48, 0x8b, 0x3d, 0x71, 0xd0, 0x2a,
            0x00, 0xff, 0x25, 0x73, 0xd0, 0x2a, 0x00, 0xc3,
        ];
        let reads = memory_reads(&code, 0x1af1e0, 24);
        assert_eq!(reads, vec![0x45c260, 0x45c268]);
        // mov rax,[0x959f60] (absolute); ret
        let abs = [0x48, 0x8b, 0x04, 0x25, 0x60, 0x9f, 0x95, 0x00, 0xc3];
        assert_eq!(memory_reads(&abs, 0x500950, 24), vec![0x959f60]);
    }

    /// A CPython this machine is expected to have: loud here, a failure under CI.
    fn skip(why: &str) {
        assert!(std::env::var_os("CI").is_none(), "required under CI: {why}");
        eprintln!("!!! SKIPPED: {why}");
    }

    #[test]
    fn tables_of_debian_and_pyenv_311() {
        // Debian's LTO executable (fixed address, stripped of local symbols) and pyenv's
        // shared libpython (relocated pointers, local symbols to check against).
        let debian = std::path::Path::new("/usr/bin/python3.11");
        let Ok(elf) = ElfFile::open(debian) else {
            return skip("no /usr/bin/python3.11");
        };
        let obj = find_table(&elf, Domain::Obj).expect("obj table");
        let mem = find_table(&elf, Domain::Mem).expect("mem table");
        let raw = find_table(&elf, Domain::Raw).expect("raw table");
        assert_eq!(obj.functions, mem.functions, "mem domain uses pymalloc");
        assert_ne!(obj.address, mem.address);
        assert_ne!(obj.functions[0], raw.functions[0]);
        let Some(lib) = std::process::Command::new("pyenv")
            .arg("root")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .map(|r| format!("{r}/versions/3.11.7/lib/libpython3.11.so.1.0"))
            .filter(|p| std::path::Path::new(p).exists())
        else {
            return skip("no pyenv 3.11.7");
        };
        let elf = ElfFile::open(std::path::Path::new(&lib)).unwrap();
        let obj = find_table(&elf, Domain::Obj).expect("obj table");
        let raw = find_table(&elf, Domain::Raw).expect("raw table");
        let by_name = |n: &str| elf.function(n).unwrap().address;
        assert_eq!(
            obj.functions,
            [
                by_name("_PyObject_Malloc"),
                by_name("_PyObject_Calloc"),
                by_name("_PyObject_Realloc"),
                by_name("_PyObject_Free")
            ]
        );
        assert_eq!(raw.functions[3], by_name("_PyMem_RawFree"));
        assert_eq!(
            find_table(&elf, Domain::Mem).unwrap().functions,
            obj.functions
        );
    }
}
