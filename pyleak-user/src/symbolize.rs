//! Native frames to `symbol (module)`: the process's memory map (snapshotted while it is
//! alive) gives the file and offset, the file's ELF symbol tables give the name.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Mutex, MutexGuard},
};

use object::{elf::PF_X, Object, ObjectSegment, ObjectSymbol, SegmentFlags, SymbolKind};

/// One line of `/proc/PID/maps` with a file behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    /// Mapped executable (code).
    exec: bool,
    path: String,
}

/// The function symbols of one file, and how its file offsets become addresses.
#[derive(Debug, Default)]
struct ModuleSyms {
    /// (address, end, name), sorted by address.
    syms: Vec<(u64, u64, String)>,
    /// Each loaded segment.
    segments: Vec<Segment>,
}

/// A loaded segment of a file.
#[derive(Debug, Clone, Copy)]
struct Segment {
    file_offset: u64,
    file_size: u64,
    address: u64,
    /// Mapped executable (code).
    exec: bool,
}

/// Turns native addresses into names, caching files and memory maps.
#[derive(Default)]
pub struct Symbolizer {
    maps: HashMap<u32, Vec<Mapping>>,
    modules: HashMap<String, ModuleSyms>,
    /// Per process, a hash of the `/proc/PID/maps` text last read: an unchanged map is
    /// not parsed again (group targets re-read every member's map up to 50 times a
    /// second, and with file-wide probes on libc each of pyleak's own mallocs traps).
    last: HashMap<u32, u64>,
    /// The buffer each map is read into.
    buf: Vec<u8>,
}

impl Symbolizer {
    /// Forgets the memory map of `pid` (a retired process); files' symbols stay.
    pub fn forget(&mut self, pid: u32) {
        self.maps.remove(&pid);
        self.last.remove(&pid);
    }

    /// Processes whose memory maps are kept, and files whose symbols are.
    pub fn footprint(&self) -> (usize, usize) {
        (self.maps.len(), self.modules.len())
    }

    /// Records the current memory map of `pid` (mappings seen before are kept, so a
    /// library unloaded later still resolves). Fails quietly when the process is gone.
    pub fn snapshot(&mut self, pid: u32) {
        use std::{hash::Hasher as _, io::Read as _};
        self.buf.clear();
        let Ok(mut f) = std::fs::File::open(format!("/proc/{pid}/maps")) else {
            return;
        };
        if f.read_to_end(&mut self.buf).is_err() {
            return;
        }
        let mut h = std::hash::DefaultHasher::new();
        h.write(&self.buf);
        let hash = h.finish();
        if self.last.insert(pid, hash) == Some(hash) && self.maps.contains_key(&pid) {
            return;
        }
        let Ok(text) = std::str::from_utf8(&self.buf) else {
            return;
        };
        let known = self.maps.entry(pid).or_default();
        for line in crate::proctext::maps(text) {
            // Files, and the kernel's named areas ([heap], [stack]) for mapping kinds.
            if !line.is_file() && !line.path.starts_with('[') {
                continue;
            }
            let m = Mapping {
                start: line.start,
                end: line.end,
                offset: line.offset,
                exec: line.exec(),
                path: line.path.to_owned(),
            };
            if !known.contains(&m) {
                // Newer mappings first: they win where addresses were reused.
                known.insert(0, m);
            }
        }
        let paths: Vec<String> = known
            .iter()
            .filter(|m| m.path.starts_with('/'))
            .map(|m| m.path.clone())
            .collect();
        for path in paths {
            self.modules
                .entry(path)
                .or_insert_with_key(|path| load_module(pid, path));
        }
    }

    /// The name of the mapping of `pid` holding `addr` (a file, `[heap]`, `[stack]`), as
    /// last seen; `None` for anonymous memory or an unknown address.
    pub fn mapping_name(&self, pid: u32, addr: u64) -> Option<&str> {
        self.maps
            .get(&pid)?
            .iter()
            .find(|m| m.start <= addr && addr < m.end)
            .map(|m| m.path.as_str())
    }

    /// Whether `ip` lies in an executable file mapping of `pid` (frame-pointer walks
    /// through code built without frame pointers end in garbage, which seldom does: a
    /// pointer into a library's data is mapped, but not as code).
    pub fn is_code(&self, pid: u32, ip: u64) -> bool {
        self.maps.get(&pid).is_some_and(|maps| {
            maps.iter()
                .any(|m| m.start <= ip && ip < m.end && m.exec && m.path.starts_with('/'))
        })
    }

    /// `symbol (module)` for an address in `pid`; `is_return` when it is a return address
    /// (looked up one byte back, inside the call).
    pub fn frame(&self, pid: u32, ip: u64, is_return: bool) -> String {
        let ip_lookup = if is_return { ip.saturating_sub(1) } else { ip };
        let Some(m) = self.maps.get(&pid).and_then(|maps| {
            maps.iter()
                .find(|m| m.start <= ip_lookup && ip_lookup < m.end)
        }) else {
            return format!("{ip:#x} ([unknown])");
        };
        let module = Path::new(&m.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Checked: a hostile file's segments can hold any numbers.
        let file_off = (ip_lookup - m.start).wrapping_add(m.offset);
        let syms = self.modules.get(&m.path);
        // The address in the file's own terms (its segments' virtual addresses, what its
        // symbols, `addr2line -e` and `objdump` use): the load bias taken off.
        let seg = syms.and_then(|syms| {
            syms.segments
                .iter()
                .find(|s| s.file_offset <= file_off && file_off - s.file_offset < s.file_size)
        });
        let addr = seg.and_then(|s| (file_off - s.file_offset).checked_add(s.address));
        // Only code has function names; a symbol without a size (hand-written assembly)
        // covers up to the next symbol, within its segment.
        let name = syms.zip(seg).and_then(|(syms, seg)| {
            let addr = addr?;
            if !seg.exec {
                return None;
            }
            let i = syms.syms.partition_point(|(s, _, _)| *s <= addr);
            let (s, e, name) = syms.syms.get(i.checked_sub(1)?)?;
            (addr < *e || (*s == *e && *s >= seg.address)).then(|| name.clone())
        });
        match name {
            Some(name) => format!("{name} ({module})"),
            None => format!("{:#x} ({module})", addr.unwrap_or(file_off)),
        }
    }
}

/// Files larger than this are not read for symbols.
const MAX_MODULE_BYTES: u64 = 1 << 30;

fn load_module(pid: u32, path: &str) -> ModuleSyms {
    let through_root = format!("/proc/{pid}/root{path}");
    let file = [through_root.as_str(), path]
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() < MAX_MODULE_BYTES));
    // Device mappings (/dev/zero...) and other non-files have no symbols to read.
    let Some(file) = file else {
        return ModuleSyms::default();
    };
    let Ok(data) = std::fs::read(file) else {
        return ModuleSyms::default();
    };
    module_syms(&data, |id| read_debug_file(pid, id))
}

/// The symbols and segments of the ELF file `data`, with those of the debug file
/// `debug_for` finds for its build id.
fn module_syms(data: &[u8], debug_for: impl Fn(&[u8]) -> Option<Vec<u8>>) -> ModuleSyms {
    let Ok(file) = object::File::parse(data) else {
        return ModuleSyms::default();
    };
    let mut syms = function_symbols(&file, 0);
    // A stripped file's full symbol table may be in a separate debug file (Debian's
    // `-dbg`/`-dbgsym` packages), found by build id: same addresses, local functions too.
    if let Some(debug) = file.build_id().ok().flatten().and_then(debug_for) {
        if let Ok(debug) = object::File::parse(&*debug) {
            syms.extend(function_symbols(&debug, 2));
        }
    }
    // One name per address: one with a size, exported if any (`malloc`, not glibc's
    // internal alias `__GI___libc_malloc`), then the first by name.
    syms.sort_by(|a, b| (a.0, b.1, a.2, &a.3).cmp(&(b.0, a.1, b.2, &b.3)));
    syms.dedup_by_key(|s| s.0);
    let syms = syms.into_iter().map(|(a, e, _, n)| (a, e, n)).collect();
    let segments = file
        .segments()
        .map(|s| {
            let (file_offset, file_size) = s.file_range();
            Segment {
                file_offset,
                file_size,
                address: s.address(),
                exec: matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0),
            }
        })
        .collect();
    ModuleSyms { syms, segments }
}

/// The fuzz target's way in: the symbols of `data` (an ELF file, no debug file), then a
/// lookup of each as a frame of a process mapping it at 0x40_0000 (pyleak's own case).
pub fn fuzz_module(data: &[u8]) {
    let module = module_syms(data, |_| None);
    let starts: Vec<u64> = module.syms.iter().take(64).map(|s| s.0).collect();
    let mut syms = Symbolizer::default();
    let path = "/fuzz/module.so".to_owned();
    syms.maps.insert(
        1,
        module
            .segments
            .iter()
            .filter_map(|s| {
                let start = 0x40_0000u64.checked_add(s.file_offset)?;
                Some(Mapping {
                    start,
                    end: start.checked_add(s.file_size)?,
                    offset: s.file_offset,
                    exec: s.exec,
                    path: path.clone(),
                })
            })
            .collect(),
    );
    syms.modules.insert(path, module);
    for a in starts {
        let _ = syms.frame(1, a, false);
        let _ = syms.frame(1, a.wrapping_add(0x40_0000), true);
    }
}

/// (address, end, rank, name) of each function a file defines; the rank is `base` for
/// exported symbols, `base + 1` for the others (lower is preferred).
fn function_symbols(file: &object::File, base: u8) -> Vec<(u64, u64, u8, String)> {
    let ranked = |rank: u8| {
        move |s: object::Symbol| {
            let ok = s.kind() == SymbolKind::Text && s.is_definition() && s.address() != 0;
            ok.then(|| {
                Some((
                    s.address(),
                    s.address().saturating_add(s.size()),
                    rank,
                    s.name().ok()?.to_owned(),
                ))
            })
            .flatten()
        }
    };
    file.dynamic_symbols()
        .filter_map(ranked(base))
        .chain(file.symbols().filter_map(ranked(base + 1)))
        .collect()
}

/// Where debug files live, by build id.
const DEBUG_BUILD_ID_DIR: &str = "/usr/lib/debug/.build-id";

/// The debug file of the file with build id `id`: the target's own (through
/// `/proc/PID/root`), else the host's (a build id names one build, wherever it is).
fn read_debug_file(pid: u32, id: &[u8]) -> Option<Vec<u8>> {
    let (first, rest) = id.split_first()?;
    let hex: String = rest.iter().map(|b| format!("{b:02x}")).collect();
    let rel = format!("{DEBUG_BUILD_ID_DIR}/{first:02x}/{hex}.debug");
    [format!("/proc/{pid}/root{rel}"), rel]
        .iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() < MAX_MODULE_BYTES))
        .find_map(|p| std::fs::read(p).ok())
}

/// Locks a shared symbolizer; a panic elsewhere cannot leave it half-updated in a way
/// that matters, so a poisoned lock is used as is.
pub fn lock(syms: &Mutex<Symbolizer>) -> MutexGuard<'_, Symbolizer> {
    syms.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function() -> u64 {
        marker_function as fn() -> u64 as usize as u64
    }

    #[test]
    fn resolves_a_function_in_this_test_binary() {
        let mut s = Symbolizer::default();
        let pid = std::process::id();
        s.snapshot(pid);
        let addr = marker_function();
        let frame = s.frame(pid, addr + 1, true);
        assert!(frame.contains("marker_function"), "{frame}");
        assert!(s.frame(pid, 8, false).contains("[unknown]"));
    }

    #[test]
    fn resolves_a_function_in_a_shared_library() {
        let mut s = Symbolizer::default();
        let pid = std::process::id();
        s.snapshot(pid);
        // libc is loaded at a random base: the name comes out only with the bias removed.
        let addr = libc::getpid as *const () as u64;
        assert!(s.is_code(pid, addr));
        let frame = s.frame(pid, addr, false);
        // (`getpid` or its alias `__getpid`: one name per address is kept.)
        assert!(frame.contains("getpid (libc.so"), "{frame}");
        // Data is mapped but is not code: a frame-pointer walk landing there went astray.
        let data = &raw const STATIC_DATA as u64;
        assert!(s.mapping_name(pid, data).is_some());
        assert!(!s.is_code(pid, data));
    }

    static STATIC_DATA: [u8; 64] = [7; 64];

    #[test]
    fn an_address_without_a_function_reads_as_the_files_own_address() {
        let mut s = Symbolizer::default();
        let pid = std::process::id();
        s.snapshot(pid);
        // Writable data sits at a file offset other than its address in the file (the
        // segment's offset and address differ); no function symbol covers it.
        let at = &raw const WRITABLE_DATA as u64;
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let file = object::File::parse(&*exe).unwrap();
        let sym = file
            .symbols()
            .find(|s| s.name().is_ok_and(|n| n.contains("WRITABLE_DATA")))
            .expect("the static's symbol");
        let exe_name = std::fs::read_link("/proc/self/exe").unwrap();
        let exe_name = exe_name.file_name().unwrap().to_string_lossy();
        assert_eq!(
            s.frame(pid, at + 8, false),
            format!("{:#x} ({exe_name})", sym.address() + 8)
        );
    }

    static mut WRITABLE_DATA: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    #[test]
    fn a_stripped_librarys_local_functions_are_named_from_its_debug_file() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        // (start, file offset, path) of libc's code mapping.
        let (start, offset, path) = maps
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let path = *f.get(5)?;
                (f[1].contains('x') && path.contains("/libc.so")).then(|| {
                    let start = u64::from_str_radix(f[0].split('-').next().unwrap(), 16);
                    (start.unwrap(), u64::from_str_radix(f[2], 16).unwrap(), path)
                })
            })
            .next()
            .expect("libc's code mapping");
        let data = std::fs::read(path).unwrap();
        let libc = object::File::parse(&*data).unwrap();
        let id = libc.build_id().unwrap().expect("libc has a build id");
        let Some(debug) = read_debug_file(std::process::id(), id) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "libc's debug file (libc6-dbg) is required under CI"
            );
            eprintln!("\n!!! TEST NOT RUN: no debug file for {path} (install libc6-dbg) !!!\n");
            return;
        };
        let debug = object::File::parse(&*debug).unwrap();
        // A function the stripped library does not name: only its debug file does.
        let exported: std::collections::HashSet<u64> =
            function_symbols(&libc, 0).iter().map(|s| s.0).collect();
        let (addr, _, _, name) = function_symbols(&debug, 2)
            .into_iter()
            .find(|(a, e, _, n)| n == "_int_malloc" && e > a && !exported.contains(a))
            .expect("_int_malloc in libc's debug file");
        let seg = libc
            .segments()
            .find(|s| {
                matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0)
                    && s.address() <= addr
                    && addr < s.address() + s.size()
            })
            .expect("libc's code segment");
        let at = start + (addr - seg.address() + seg.file_range().0 - offset) + 4;
        let mut s = Symbolizer::default();
        s.snapshot(std::process::id());
        assert_eq!(
            s.frame(std::process::id(), at, false),
            format!("{name} (libc.so.6)")
        );
    }
}
