//! Finding functions in ELF files: their file offsets (what uprobes take) and their bytes
//! (to choose a cheap attach point).

use std::path::{Path, PathBuf};

use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

use crate::errors::UserError;

/// An ELF file read into memory.
pub struct ElfFile {
    path: PathBuf,
    data: Vec<u8>,
}

/// One function found in an [`ElfFile`].
#[derive(Debug, Clone)]
pub struct Function {
    /// Its offset in the file (what a uprobe attaches to).
    pub file_offset: u64,
    /// Its virtual address.
    pub address: u64,
    /// Its bytes (the whole function when the symbol has a size, else the first 64).
    pub code: Vec<u8>,
}

impl ElfFile {
    /// Reads `path`.
    pub fn open(path: &Path) -> Result<ElfFile, UserError> {
        let data = std::fs::read(path).map_err(|e| UserError::BadElf {
            path: path.to_owned(),
            source: e.into(),
        })?;
        ElfFile::from_bytes(path, data)
    }

    /// An ELF file's bytes `data`, named `path`; an error when `object` cannot parse them.
    pub fn from_bytes(path: &Path, data: Vec<u8>) -> Result<ElfFile, UserError> {
        object::File::parse(&*data).map_err(|e| UserError::BadElf {
            path: path.to_owned(),
            source: e.into(),
        })?;
        Ok(ElfFile {
            path: path.to_owned(),
            data,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The function at link-time address `addr` (found without a name: the bytes from
    /// there, as many as a symbol starting there says, else 64).
    pub fn function_at(&self, addr: u64) -> Option<Function> {
        let file = object::File::parse(&*self.data).ok()?;
        let size = file
            .symbols()
            .chain(file.dynamic_symbols())
            .find(|s| s.address() == addr && s.kind() == SymbolKind::Text && s.size() > 0)
            .map_or(64, |s| s.size());
        let section = file.sections().find(|s| {
            s.kind() == object::SectionKind::Text
                && addr >= s.address()
                && addr - s.address() < s.size()
        })?;
        let (sec_off, sec_len) = section.file_range()?;
        let rel = addr - section.address();
        let file_offset = sec_off.checked_add(rel)?;
        let len = size.min(sec_len.checked_sub(rel)?);
        let start = usize::try_from(file_offset).ok()?;
        let code = self
            .data
            .get(start..start.checked_add(usize::try_from(len).ok()?)?)?
            .to_vec();
        Some(Function {
            file_offset,
            address: addr,
            code,
        })
    }

    /// Whether link-time address `addr` lies in the section named `name`.
    pub fn in_section(&self, addr: u64, name: &str) -> bool {
        object::File::parse(&*self.data).is_ok_and(|file| {
            file.section_by_name(name)
                .is_some_and(|s| addr >= s.address() && addr - s.address() < s.size())
        })
    }

    /// Finds a defined function by name in the dynamic symbols, then in the full table.
    pub fn function(&self, name: &str) -> Option<Function> {
        self.function_where(|n| n == name)
    }

    /// Finds a defined function by name, or GCC's specialised copy of it
    /// (`name.constprop.0`, `name.isra.0`: the whole function, some arguments folded in;
    /// not `.part`/`.cold`, which are pieces of one).
    pub fn function_or_clone(&self, name: &str) -> Option<Function> {
        self.function(name).or_else(|| {
            self.function_where(|n| {
                n.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(".constprop.") || r.starts_with(".isra."))
            })
        })
    }

    /// The first defined function whose symbol name `matches`, dynamic symbols first.
    fn function_where(&self, matches: impl Fn(&str) -> bool) -> Option<Function> {
        let file = object::File::parse(&*self.data).ok()?;
        let sym = file.dynamic_symbols().chain(file.symbols()).find(|s| {
            s.is_definition() && s.kind() == SymbolKind::Text && s.name().is_ok_and(&matches)
        })?;
        let section = file.section_by_index(sym.section_index()?).ok()?;
        let (sec_off, sec_len) = section.file_range()?;
        let rel = sym.address().checked_sub(section.address())?;
        if rel >= sec_len {
            return None;
        }
        let file_offset = sec_off.checked_add(rel)?;
        let len = if sym.size() > 0 { sym.size() } else { 64 }.min(sec_len - rel);
        let start = usize::try_from(file_offset).ok()?;
        let code = self
            .data
            .get(start..start.checked_add(usize::try_from(len).ok()?)?)?
            .to_vec();
        Some(Function {
            file_offset,
            address: sym.address(),
            code,
        })
    }

    /// The link-time address of the defined data object `name` (`PyCode_Type`), from the
    /// dynamic symbols, then the full table.
    pub fn data_symbol(&self, name: &str) -> Option<u64> {
        let file = object::File::parse(&*self.data).ok()?;
        let sym = file
            .dynamic_symbols()
            .chain(file.symbols())
            .find(|s| s.is_definition() && s.kind() == SymbolKind::Data && s.name() == Ok(name))?;
        Some(sym.address())
    }

    /// Shared libraries the file needs (`DT_NEEDED`) and its run paths, `$ORIGIN` expanded.
    pub fn needed(&self) -> (Vec<String>, Vec<PathBuf>) {
        let Ok(file) = object::read::elf::ElfFile64::<object::Endianness>::parse(&*self.data)
        else {
            return (Vec::new(), Vec::new());
        };
        let origin = self.path.parent().unwrap_or(Path::new("/")).to_owned();
        let mut needed = Vec::new();
        let mut paths = Vec::new();
        let endian = file.endian();
        let Ok(Some((dynamic, index))) = file.elf_section_table().dynamic(endian, &*self.data)
        else {
            return (needed, paths);
        };
        let Ok(strings) = file.elf_section_table().strings(endian, &*self.data, index) else {
            return (needed, paths);
        };
        use object::read::elf::Dyn as _;
        for d in dynamic {
            let tag = d.tag32(endian);
            let Some(tag) = tag else { continue };
            if !matches!(
                tag,
                object::elf::DT_NEEDED | object::elf::DT_RPATH | object::elf::DT_RUNPATH
            ) {
                continue;
            }
            let Ok(s) = d.string(endian, strings) else {
                continue;
            };
            let s = String::from_utf8_lossy(s).into_owned();
            if tag == object::elf::DT_NEEDED {
                needed.push(s);
            } else {
                for p in s.split(':') {
                    let p = p
                        .replace("$ORIGIN", &origin.to_string_lossy())
                        .replace("${ORIGIN}", &origin.to_string_lossy());
                    paths.push(PathBuf::from(p));
                }
            }
        }
        (needed, paths)
    }
}
