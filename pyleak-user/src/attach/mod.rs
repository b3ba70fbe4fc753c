//! Where to put probes: which files a target maps (its libc, its libpython), which
//! functions in them, at which offsets, with which cookies.

pub mod allocwatch;
pub mod elf;
mod fallback;
pub mod plan;
pub mod prologue;
pub mod reuse;
pub mod sites;
pub mod tables;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use pyleak_common::{
    AllocKind, Layer, ProbeCookie, FINALIZE_FREEZE_HERE, FINALIZE_MARK, FINALIZE_THREADS_JOINED,
};

use self::{elf::ElfFile, prologue::choose_attach_point};
use crate::proctext;

/// Which program a probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeRole {
    /// `alloc_enter` plus `alloc_exit` at the same point.
    Alloc,
    /// `free_enter`.
    Free,
    /// `py_finalize_enter`.
    Finalize,
    /// `py_init_enter` (its cookie: the attach point's link-time address).
    PyInit,
    /// `site_enter`: the guard of an inlined allocator call ([`ProbeSpec::site`]).
    Site,
    /// `site_join`: where an inlined allocator call's block is in a register.
    Join,
    /// `site_join_ret`: the return of a function whose inlined allocator call is a tail
    /// call (the block is its return value).
    JoinReturn,
    /// `reuse_enter` on `_Py_NewReference`: an object given its first reference, which a
    /// free list may have handed out again.
    ReuseObject,
    /// `reuse_exit` on the return of a function that may take a block off a free list
    /// (`new_keys_object`).
    ReuseBlock,
    /// `reuse_holder_exit` plus `reuse_holder_enter` at the same point: a function that
    /// gives an object its block (`insert_to_emptydict`: a dict its keys table).
    ReuseHolder,
    /// `code_dealloc_enter` on `code_dealloc`: a code object being freed (the kernel's
    /// cached first lines may be stale from then on).
    CodeDealloc,
}

/// One uprobe to attach.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// The file, as a path the kernel can open from pyleak's mount namespace.
    pub path: PathBuf,
    /// The function's name (for messages).
    pub symbol: &'static str,
    /// File offset of the attach point.
    pub offset: u64,
    /// Program(s) to run.
    pub role: ProbeRole,
    /// The cookie the programs read.
    pub cookie: u64,
    /// Whether the instruction there is emulated by the kernel (cheap).
    pub emulated: bool,
    /// Attach point minus function start.
    pub delta_from_entry: u64,
    /// For `Site` and `Join` probes: what the kernel reads there (`SITES[id]`, the id being
    /// the cookie's third field).
    pub site: Option<pyleak_common::SiteInfo>,
}

/// The libc malloc family: name, what it does, how many argument registers it reads.
pub const LIBC_FUNCTIONS: [(&str, AllocKind, usize); 10] = [
    ("malloc", AllocKind::Malloc, 1),
    ("calloc", AllocKind::Calloc, 2),
    ("realloc", AllocKind::Realloc, 2),
    ("reallocarray", AllocKind::Reallocarray, 3),
    ("posix_memalign", AllocKind::PosixMemalign, 3),
    ("aligned_alloc", AllocKind::Aligned, 2),
    ("memalign", AllocKind::Aligned, 2),
    ("valloc", AllocKind::Malloc, 1),
    ("pvalloc", AllocKind::Pvalloc, 1),
    ("free", AllocKind::Free, 1),
];

/// CPython's object and mem domains (both served by pymalloc since 3.6).
pub const PYMALLOC_FUNCTIONS: [(&str, AllocKind, usize); 8] = [
    ("PyObject_Malloc", AllocKind::Malloc, 1),
    ("PyObject_Calloc", AllocKind::Calloc, 2),
    ("PyObject_Realloc", AllocKind::Realloc, 2),
    ("PyObject_Free", AllocKind::Free, 1),
    ("PyMem_Malloc", AllocKind::Malloc, 1),
    ("PyMem_Calloc", AllocKind::Calloc, 2),
    ("PyMem_Realloc", AllocKind::Realloc, 2),
    ("PyMem_Free", AllocKind::Free, 1),
];

/// The functions CPython's object and mem domain tables point at (local symbols, present
/// in unstripped builds). Probing them instead of the exported entry points catches calls
/// the exported ones inline (LTO), and their prologues have cheap attach points where the
/// exported thunks (`mov rsi,rdi; mov rdi,ctx; jmp *table`) have none.
pub const PYMALLOC_TABLE_FUNCTIONS: [(&str, AllocKind, usize); 4] = [
    ("_PyObject_Malloc", AllocKind::CtxMalloc, 2),
    ("_PyObject_Calloc", AllocKind::CtxCalloc, 3),
    ("_PyObject_Realloc", AllocKind::CtxRealloc, 3),
    ("_PyObject_Free", AllocKind::CtxFree, 2),
];

/// The functions CPython's raw domain table points at.
pub const PYMEM_RAW_TABLE_FUNCTIONS: [(&str, AllocKind, usize); 4] = [
    ("_PyMem_RawMalloc", AllocKind::CtxMalloc, 2),
    ("_PyMem_RawCalloc", AllocKind::CtxCalloc, 3),
    ("_PyMem_RawRealloc", AllocKind::CtxRealloc, 3),
    ("_PyMem_RawFree", AllocKind::CtxFree, 2),
];

/// Probes for CPython allocator domains (`domains` share `layer`): the functions their
/// tables point at, found from the tables themselves (stripped and LTO builds included),
/// else by their local names, else the exported API. Domains whose tables point at the same
/// functions (mem and object use pymalloc) get one probe per function, so nothing counts
/// twice.
pub fn plan_python_domain(
    elf: &ElfFile,
    layer: Layer,
    domains: &[tables::Domain],
    table: &[(&'static str, AllocKind, usize)],
    exported: &[(&'static str, AllocKind, usize)],
) -> Vec<ProbeSpec> {
    let found: Option<Vec<_>> = domains
        .iter()
        .map(|&d| tables::find_table(elf, d))
        .collect();
    if let Some(found) = found {
        let mut seen = BTreeSet::new();
        let mut out = plan_sites(elf, layer, &found, exported);
        for t in found {
            for (i, &addr) in t.functions.iter().enumerate() {
                // `table` names the four functions in table order.
                let Some(&(name, kind, args)) = table.get(i) else {
                    continue;
                };
                if !seen.insert(addr) {
                    continue;
                }
                match elf.function_at(addr) {
                    Some(f) => out.push(plan_function(elf, layer, name, kind, args, &f)),
                    None => log::debug!("{}: no code at {addr:#x}", elf.path().display()),
                }
            }
        }
        log::debug!(
            "{}: {} probes from the allocator tables",
            elf.path().display(),
            out.len()
        );
        return out;
    }
    if table
        .iter()
        .all(|(name, _, _)| elf.function(name).is_some())
    {
        plan_layer(elf, layer, table)
    } else {
        plan_layer(elf, layer, exported)
    }
}

/// CPython's raw domain: buffers taken straight from the C heap.
pub const PYMEM_RAW_FUNCTIONS: [(&str, AllocKind, usize); 4] = [
    ("PyMem_RawMalloc", AllocKind::Malloc, 1),
    ("PyMem_RawCalloc", AllocKind::Calloc, 2),
    ("PyMem_RawRealloc", AllocKind::Realloc, 2),
    ("PyMem_RawFree", AllocKind::Free, 1),
];

/// Plans probes for `functions` of one layer in `elf`. Functions at the same address (glibc's
/// `memalign` is `aligned_alloc`) get one probe.
pub fn plan_layer(
    elf: &ElfFile,
    layer: Layer,
    functions: &[(&'static str, AllocKind, usize)],
) -> Vec<ProbeSpec> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for &(name, kind, args) in functions {
        let Some(f) = elf.function(name) else {
            log::debug!("{} does not define {name}", elf.path().display());
            continue;
        };
        if !seen.insert(f.file_offset) {
            continue;
        }
        out.push(plan_function(elf, layer, name, kind, args, &f));
    }
    out
}

/// Site ids given so far (0 means "none" to the kernel).
static NEXT_SITE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Probes for the allocator calls a fixed-address LTO/PGO executable inlined behind guards
/// (see [`sites`]); nothing for other files.
///
/// A guarded copy that tail-calls returns to the enclosing function's caller: its join is
/// a return probe on that function. In the layer's own exported entry points
/// (`PyMem_RawMalloc`…), which get an ordinary entry+return probe, such copies are left out
/// (their frees, needing no return, keep the guard).
fn plan_sites(
    elf: &ElfFile,
    layer: Layer,
    tables: &[tables::AllocTable],
    exported: &[(&'static str, AllocKind, usize)],
) -> Vec<ProbeSpec> {
    use std::sync::atomic::Ordering;
    let mut out = Vec::new();
    // Domains that share functions (mem and object) share sites.
    let mut groups: Vec<Vec<tables::AllocTable>> = Vec::new();
    for t in tables {
        match groups.iter_mut().find(|g| g[0].functions == t.functions) {
            Some(g) => g.push(*t),
            None => groups.push(vec![*t]),
        }
    }
    let Ok(file) = object::File::parse(elf.data()) else {
        return out;
    };
    for group in groups {
        let mut scan = sites::find_sites(elf, &group);
        if scan.sites.is_empty() {
            continue;
        }
        let mut ranges = Vec::new();
        for &(name, kind, args) in exported {
            if matches!(kind, AllocKind::Free) {
                continue;
            }
            if let Some(f) = elf.function(name) {
                ranges.push(f.address..f.address.saturating_add(f.code.len() as u64));
                out.push(plan_function(elf, layer, name, kind, args, &f));
            }
        }
        scan.sites
            .retain(|s| s.join.is_none() || !ranges.iter().any(|r| r.contains(&s.guard)));
        let guards: BTreeSet<u64> = scan.sites.iter().map(|s| s.guard).collect();
        let mut joins: std::collections::BTreeMap<sites::Join, u32> = Default::default();
        let mut used = 0;
        for site in &scan.sites {
            let join_id = match site.join {
                None => 0,
                // A join on another guard's jump would race with it: leave such sites out.
                Some(sites::Join::At(j, _, _)) if guards.contains(&j) => continue,
                Some(join) => match joins.get(&join) {
                    Some(&id) => id,
                    None => {
                        let planned = match join {
                            sites::Join::At(j, r, disp) => file_offset(&file, j).map(|off| {
                                (
                                    off,
                                    site.join_emulated,
                                    "inlined allocator (return)",
                                    r,
                                    disp,
                                )
                            }),
                            // The enclosing function's return: a return probe where the
                            // return address is still on top.
                            sites::Join::Return(f) => elf.function_at(f).map(|f| {
                                let point = choose_attach_point(&f.code, f.address, 0, true);
                                (
                                    f.file_offset + point.offset,
                                    point.emulated,
                                    "inlined allocator (tail-call return)",
                                    0,
                                    0,
                                )
                            }),
                        };
                        let Some((offset, emulated, symbol, result_reg, disp)) = planned else {
                            continue;
                        };
                        let id = NEXT_SITE.fetch_add(1, Ordering::Relaxed);
                        if id >= pyleak_common::SITES_ENTRIES {
                            break;
                        }
                        joins.insert(join, id);
                        log::debug!(
                            "join {join:x?} (guard {:#x}, emulated: {emulated})",
                            site.guard,
                        );
                        out.push(ProbeSpec {
                            path: elf.path().to_owned(),
                            symbol,
                            offset,
                            role: match join {
                                sites::Join::At(..) => ProbeRole::Join,
                                sites::Join::Return(_) => ProbeRole::JoinReturn,
                            },
                            cookie: ProbeCookie {
                                kind: AllocKind::SiteJoin as u32,
                                layer: layer as u32,
                                stack_delta: id,
                            }
                            .encode(),
                            emulated,
                            delta_from_entry: 0,
                            site: Some(pyleak_common::SiteInfo {
                                join: id,
                                result_reg,
                                arg_const: [disp, 0],
                                ..Default::default()
                            }),
                        });
                        id
                    }
                },
            };
            let Some(off) = file_offset(&file, site.guard) else {
                continue;
            };
            let id = NEXT_SITE.fetch_add(1, Ordering::Relaxed);
            if id >= pyleak_common::SITES_ENTRIES {
                break;
            }
            used += 1;
            out.push(ProbeSpec {
                path: elf.path().to_owned(),
                symbol: "inlined allocator (guard)",
                offset: off,
                role: ProbeRole::Site,
                cookie: ProbeCookie {
                    kind: site.kind as u32,
                    layer: layer as u32,
                    stack_delta: id,
                }
                .encode(),
                emulated: true,
                delta_from_entry: 0,
                site: Some(pyleak_common::SiteInfo {
                    join: join_id,
                    ..site.info
                }),
            });
        }
        log::info!(
            "{}: {used} inlined allocator calls probed, {} left out ({} guards)",
            elf.path().display(),
            scan.sites.len() + scan.skipped - used,
            scan.sites.len() + scan.skipped
        );
    }
    out
}

/// The file offset of link-time address `addr` in an executable section.
pub(super) fn file_offset(file: &object::File, addr: u64) -> Option<u64> {
    use object::{Object, ObjectSection};
    let s = file.sections().find(|s| {
        s.kind() == object::SectionKind::Text
            && addr >= s.address()
            && addr - s.address() < s.size()
    })?;
    s.file_range()?.0.checked_add(addr - s.address())
}

/// The probe on one allocator function, at a cheap attach point of its prologue.
fn plan_function(
    elf: &ElfFile,
    layer: Layer,
    name: &'static str,
    kind: AllocKind,
    args: usize,
    f: &elf::Function,
) -> ProbeSpec {
    let is_free = matches!(kind, AllocKind::Free | AllocKind::CtxFree);
    let point = choose_attach_point(&f.code, f.address, args, !is_free);
    let cookie = ProbeCookie {
        kind: kind as u32,
        layer: layer as u32,
        stack_delta: point.stack_delta as u32,
    };
    ProbeSpec {
        path: elf.path().to_owned(),
        symbol: name,
        offset: f.file_offset + point.offset,
        role: if is_free {
            ProbeRole::Free
        } else {
            ProbeRole::Alloc
        },
        cookie: cookie.encode(),
        emulated: point.emulated,
        delta_from_entry: point.offset,
        site: None,
    }
}

/// The probes that freeze a process when its interpreter starts tearing itself down, once
/// it has joined the non-daemon threads: a program whose main thread returns while a
/// worker goes on allocating is read after the worker's work. `Py_FinalizeEx` first calls
/// `wait_for_thread_shutdown`, then `_Py_FinishPendingCalls`, then the `atexit` functions,
/// and only then tears down (`Python/pylifecycle.c`, 3.8–3.13). Probed:
/// - `Py_FinalizeEx`, to mark the process (cookie `FINALIZE_MARK`), and
///   `_Py_FinishPendingCalls` to freeze it (`FINALIZE_THREADS_JOINED`), where the file
///   names it (`.symtab` or `.dynsym`: pyenv's and python.org's builds);
/// - else (Debian's LTO build: no symbol, the function inlined) the instruction after
///   `Py_FinalizeEx`'s first call into its own file's `.text`, `wait_for_thread_shutdown`'s
///   return (see [`after_first_local_call`]);
/// - else `Py_FinalizeEx` alone, freezing there (`FINALIZE_FREEZE_HERE`).
///
/// Empty without `Py_FinalizeEx`.
pub fn plan_finalize(elf: &ElfFile) -> Vec<ProbeSpec> {
    let Some(finalize) = elf.function("Py_FinalizeEx") else {
        return Vec::new();
    };
    let probe = |symbol: &'static str, file_offset: u64, code: &[u8], address: u64, cookie| {
        let point = choose_attach_point(code, address, 0, false);
        ProbeSpec {
            path: elf.path().to_owned(),
            symbol,
            offset: file_offset + point.offset,
            role: ProbeRole::Finalize,
            cookie,
            emulated: point.emulated,
            delta_from_entry: point.offset,
            site: None,
        }
    };
    let joined = if let Some(f) = elf.function("_Py_FinishPendingCalls") {
        Some(probe(
            "_Py_FinishPendingCalls",
            f.file_offset,
            &f.code,
            f.address,
            FINALIZE_THREADS_JOINED,
        ))
    } else {
        after_first_local_call(elf, &finalize).map(|(delta, emulated)| ProbeSpec {
            path: elf.path().to_owned(),
            symbol: "Py_FinalizeEx",
            offset: finalize.file_offset + delta,
            role: ProbeRole::Finalize,
            cookie: FINALIZE_THREADS_JOINED,
            emulated,
            delta_from_entry: delta,
            site: None,
        })
    };
    let cookie = if joined.is_some() {
        FINALIZE_MARK
    } else {
        FINALIZE_FREEZE_HERE
    };
    let mut probes = vec![probe(
        "Py_FinalizeEx",
        finalize.file_offset,
        &finalize.code,
        finalize.address,
        cookie,
    )];
    probes.extend(joined);
    probes
}

/// Instructions of `Py_FinalizeEx` looked at for its first call.
const FINALIZE_CALL_WINDOW: usize = 64;

/// The instruction after `f`'s first direct call, in the order of its bytes, into its
/// file's own `.text` (a call through the PLT is another library's, `__tls_get_addr` in a
/// shared libpython; an early return, such as 3.8's when not initialized, is passed): its
/// offset from `f`'s start, and whether a uprobe emulates it. In `Py_FinalizeEx` that call
/// is `wait_for_thread_shutdown` (3.8–3.13; in 3.13 after `resolve_final_tstate`, when
/// that is not inlined, which at worst freezes as early as `Py_FinalizeEx`'s entry). `None`
/// when its first instructions make no such call.
pub fn after_first_local_call(elf: &ElfFile, f: &elf::Function) -> Option<(u64, bool)> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
    let mut decoder = Decoder::with_ip(64, &f.code, f.address, DecoderOptions::NONE);
    let mut called = false;
    for instr in decoder.iter().take(FINALIZE_CALL_WINDOW) {
        if instr.is_invalid() {
            return None;
        }
        let start = usize::try_from(instr.ip() - f.address).ok()?;
        if called {
            let bytes = f.code.get(start..start + instr.len())?;
            return Some((instr.ip() - f.address, prologue::is_emulated(&instr, bytes)));
        }
        match instr.flow_control() {
            FlowControl::Call
                if instr.op0_kind() == OpKind::NearBranch64
                    && elf.in_section(instr.near_branch_target(), ".text") =>
            {
                called = true;
            }
            _ => {}
        }
    }
    None
}

/// `offsetof(PyTypeObject, tp_dealloc)`, 3.6–3.14 (`Include/cpython/object.h`: the
/// variable-size object head, 24 bytes, then `tp_name`, `tp_basicsize`, `tp_itemsize`).
const TP_DEALLOC: u64 = 48;

/// The probe that tells the kernel a code object is being freed: on the function
/// `PyCode_Type.tp_dealloc` points at (`code_dealloc`, `Objects/codeobject.c`), found from
/// the type's initial value in the file, so stripped and LTO builds (where the function
/// has no name) have it too. Its address is taken, so it is never inlined. `None` when the
/// file has no `PyCode_Type` or its `tp_dealloc` is not code in the file.
pub fn plan_code_dealloc(elf: &ElfFile) -> Option<ProbeSpec> {
    let ty = elf.data_symbol("PyCode_Type")?;
    let addr = elf.initial_pointer(ty.checked_add(TP_DEALLOC)?)?;
    if !elf.is_code(addr) {
        return None;
    }
    let f = elf.function_at(addr)?;
    let point = choose_attach_point(&f.code, f.address, 0, false);
    Some(ProbeSpec {
        path: elf.path().to_owned(),
        symbol: "code_dealloc",
        offset: f.file_offset + point.offset,
        role: ProbeRole::CodeDealloc,
        cookie: 0,
        emulated: point.emulated,
        delta_from_entry: point.offset,
        site: None,
    })
}

/// The probe that tells the kernel where a launched command's Python runtime was loaded.
pub fn plan_py_init(elf: &ElfFile) -> Option<ProbeSpec> {
    let f = elf.function("Py_InitializeFromConfig")?;
    Some(ProbeSpec {
        path: elf.path().to_owned(),
        symbol: "Py_InitializeFromConfig",
        offset: f.file_offset,
        role: ProbeRole::PyInit,
        cookie: f.address,
        emulated: false,
        delta_from_entry: 0,
        site: None,
    })
}

/// `path` as the process it was found through names it: `/proc/PID/root/usr/lib/x.so`
/// is `/usr/lib/x.so` (what a user recognises in messages).
pub fn as_process_names(path: &Path) -> String {
    let s = path.to_string_lossy();
    match s
        .strip_prefix("/proc/")
        .and_then(|r| r.split_once("/root/"))
    {
        Some((pid, rest)) if pid.bytes().all(|b| b.is_ascii_digit()) => format!("/{rest}"),
        _ => s.into_owned(),
    }
}

/// Files a running process maps, as paths reachable from pyleak (through `/proc/PID/root`).
pub fn mapped_files(pid: u32) -> std::io::Result<Vec<PathBuf>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let files: BTreeSet<&str> = proctext::maps(&maps)
        .filter(|m| m.is_file() && !m.deleted())
        .map(|m| m.path)
        .collect();
    Ok(files
        .into_iter()
        .map(|p| PathBuf::from(format!("/proc/{pid}/root{p}")))
        .collect())
}

/// The files a running process maps that pyleak would probe or read a Python runtime
/// from (the C library, a malloc replacement, libpython, a `python` executable) but that
/// were deleted or replaced on disk since they were mapped (`/proc/PID/maps` marks them
/// ` (deleted)`: a package upgrade under a running service): their names, without the
/// mark. pyleak cannot open them by name, so their layers and Python stacks are missing.
pub fn deleted_runtime_files(pid: u32) -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let names: BTreeSet<String> = proctext::maps(&maps)
        .filter(|m| m.is_file() && m.deleted())
        .map(|m| m.path.trim_end_matches(" (deleted)").to_owned())
        .filter(|p| {
            let path = Path::new(p);
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            is_libc(path)
                || is_malloc_replacement(path)
                || name.starts_with("libpython")
                || name.starts_with("python")
        })
        .collect();
    names.into_iter().collect()
}

/// Files a running process maps, each as (a path naming it through `/proc/PID/root`, a
/// path that opens the very file mapped: `/proc/PID/map_files/START-END`). The memory map
/// names files as seen from the process's mount namespace, which may not be reachable
/// from pyleak's even through `/proc/PID/root` (a chroot inside a private namespace);
/// `map_files` always is.
pub fn mapped_file_handles(pid: u32) -> std::io::Result<Vec<(PathBuf, PathBuf)>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for m in proctext::maps(&maps) {
        if m.is_file() && !m.deleted() && seen.insert(m.path) {
            out.push((
                PathBuf::from(format!("/proc/{pid}/root{}", m.path)),
                // The same numbers without the zero padding (`400000-41f000`).
                PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)),
            ));
        }
    }
    Ok(out)
}

/// Whether a file name looks like the C library.
pub fn is_libc(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
}

/// Whether a file is a malloc that replaces libc's in the processes that load it
/// (usually through `LD_PRELOAD`): jemalloc, tcmalloc, mimalloc. Its malloc family is
/// the `libc` layer's, probed like libc's.
pub fn is_malloc_replacement(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    ["libjemalloc.so", "libtcmalloc", "libmimalloc"]
        .iter()
        .any(|p| name.starts_with(p))
        && name.contains(".so")
}

/// Whether a file may hold the Python runtime: a shared libpython, or a python executable
/// (statically linked builds such as Debian's keep it there).
pub fn may_hold_python(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    (name.starts_with("libpython") && name.contains(".so")) || name.starts_with("python")
}

/// The ELF program a command will run: the file itself, or the interpreter of a `#!` script
/// (`#!/usr/bin/env python3` included).
pub fn program_of(path: &Path) -> PathBuf {
    let Ok(bytes) = std::fs::read(path) else {
        return path.to_owned();
    };
    if !bytes.starts_with(b"#!") {
        return path.to_owned();
    }
    let line = bytes[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let Some(interp) = words.next() else {
        return path.to_owned();
    };
    if Path::new(interp).file_name().is_some_and(|n| n == "env") {
        if let Some(p) = words
            .find(|w| !w.starts_with('-'))
            .and_then(crate::targets::resolve_command)
        {
            return program_of(&p);
        }
    }
    program_of(Path::new(interp))
}

/// Where the dynamic loader looks after the program's own search path.
const LIBRARY_DIRS: [&str; 7] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

/// The libraries a process that has just called exec is about to map (its program's
/// `DT_NEEDED`, found under its root), as paths through `/proc/PID/root`: probing them
/// before its loader maps them catches its first allocations.
pub fn needed_in_root(pid: u32) -> Vec<PathBuf> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return Vec::new();
    };
    let under_root = |p: &Path| -> PathBuf {
        if p.starts_with(&root) {
            p.to_owned()
        } else {
            root.join(p.strip_prefix("/").unwrap_or(p))
        }
    };
    let Ok(elf) = ElfFile::open(&under_root(&exe)) else {
        return Vec::new();
    };
    let (needed, dirs) = elf.needed();
    let dirs: Vec<PathBuf> = dirs
        .iter()
        .map(|d| under_root(d))
        .chain(LIBRARY_DIRS.iter().map(|d| under_root(Path::new(d))))
        .collect();
    needed
        .iter()
        .filter_map(|lib| dirs.iter().map(|d| d.join(lib)).find(|p| p.is_file()))
        .collect()
}

/// The files a program will map that pyleak probes: its libc and the file that holds the
/// Python runtime (the executable itself or its libpython), found from `DT_NEEDED` and the
/// library search path before the program runs.
pub fn libraries_of(program: &Path) -> Vec<PathBuf> {
    let Ok(elf) = ElfFile::open(program) else {
        return Vec::new();
    };
    let (needed, mut dirs) = elf.needed();
    if let Some(extra) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&extra));
    }
    dirs.extend(LIBRARY_DIRS.map(PathBuf::from));
    let mut out = vec![program.to_owned()];
    // Libraries the command will preload (a replacement malloc, most often): the dynamic
    // loader reads the same environment the command inherits from pyleak.
    let preload = std::env::var("LD_PRELOAD").unwrap_or_default();
    for lib in preload.split([' ', ':']).filter(|l| !l.is_empty()) {
        let p = Path::new(lib);
        if p.is_absolute() {
            out.push(p.to_owned());
        } else if let Some(p) = dirs.iter().map(|d| d.join(lib)).find(|p| p.exists()) {
            out.push(p);
        }
    }
    for lib in needed {
        if let Some(p) = dirs.iter().map(|d| d.join(&lib)).find(|p| p.exists()) {
            out.push(p);
        }
    }
    // The memory map will name the files behind any symlinks (python3 → python3.11).
    out.into_iter()
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPython this machine is expected to have: loud here, a failure under CI.
    fn skip(why: &str) {
        assert!(std::env::var_os("CI").is_none(), "required under CI: {why}");
        eprintln!("!!! SKIPPED: {why}");
    }

    /// pyenv's shared libpythons, 3.8–3.13: (version, file), the missing ones said.
    fn pyenv_libpythons() -> Vec<(&'static str, ElfFile)> {
        let root = std::process::Command::new("pyenv")
            .arg("root")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let mut out = Vec::new();
        for (v, lib) in [
            ("3.8.18", "3.8"),
            ("3.9.18", "3.9"),
            ("3.10.13", "3.10"),
            ("3.11.7", "3.11"),
            ("3.12.1", "3.12"),
            ("3.13.0", "3.13"),
        ] {
            let path = format!("{root}/versions/{v}/lib/libpython{lib}.so.1.0");
            match ElfFile::open(Path::new(&path)) {
                Ok(elf) => out.push((v, elf)),
                Err(_) => skip(&format!("no {path}")),
            }
        }
        out
    }

    /// The instruction before `delta` bytes into `f`: a direct call, and its target.
    fn call_before(f: &elf::Function, delta: u64) -> Option<u64> {
        use iced_x86::{Decoder, DecoderOptions, FlowControl};
        let mut decoder = Decoder::with_ip(64, &f.code, f.address, DecoderOptions::NONE);
        decoder
            .iter()
            .find(|i| i.next_ip() == f.address + delta)
            .filter(|i| i.flow_control() == FlowControl::Call)
            .map(|i| i.near_branch_target())
    }

    #[test]
    fn the_shutdown_freeze_waits_for_the_threads_to_be_joined() {
        // pyenv names `_Py_FinishPendingCalls`: Py_FinalizeEx marks, it freezes.
        for (v, elf) in pyenv_libpythons() {
            let probes = plan_finalize(&elf);
            let got: Vec<(&str, u64)> = probes.iter().map(|p| (p.symbol, p.cookie)).collect();
            assert_eq!(
                got,
                [
                    ("Py_FinalizeEx", FINALIZE_MARK),
                    ("_Py_FinishPendingCalls", FINALIZE_THREADS_JOINED)
                ],
                "{v}"
            );
            // Where it is not a tail call, the first local call of Py_FinalizeEx is
            // wait_for_thread_shutdown: what Debian's build is probed after.
            let finalize = elf.function("Py_FinalizeEx").unwrap();
            let wait = elf.function("wait_for_thread_shutdown").unwrap();
            match after_first_local_call(&elf, &finalize) {
                Some((delta, _)) => {
                    assert_eq!(call_before(&finalize, delta), Some(wait.address), "{v}")
                }
                None => assert_eq!(v, "3.13.0", "only 3.13 tail-calls _Py_Finalize"),
            }
        }
        // Debian's LTO executable names neither: probed after Py_FinalizeEx's first call.
        let Ok(elf) = ElfFile::open(Path::new("/usr/bin/python3.11")) else {
            return skip("no /usr/bin/python3.11");
        };
        assert!(elf.function("_Py_FinishPendingCalls").is_none());
        let finalize = elf.function("Py_FinalizeEx").unwrap();
        let probes = plan_finalize(&elf);
        assert_eq!(probes.len(), 2);
        assert_eq!(
            (probes[0].cookie, probes[0].delta_from_entry),
            (FINALIZE_MARK, 0)
        );
        let joined = &probes[1];
        assert_eq!(joined.cookie, FINALIZE_THREADS_JOINED);
        assert_eq!(
            joined.offset,
            finalize.file_offset + joined.delta_from_entry
        );
        let target = call_before(&finalize, joined.delta_from_entry).expect("after a call");
        assert!(elf.in_section(target, ".text"));
    }

    #[test]
    fn code_dealloc_is_found_from_the_code_type() {
        // pyenv's shared libpythons name it (a local symbol): the probe is in that
        // function, found from `PyCode_Type` alone.
        for (v, elf) in pyenv_libpythons() {
            let named = elf
                .function("code_dealloc")
                .expect("pyenv keeps local symbols");
            let p = plan_code_dealloc(&elf).expect("code_dealloc from PyCode_Type");
            assert_eq!(p.role, ProbeRole::CodeDealloc);
            assert_eq!(p.offset - p.delta_from_entry, named.file_offset, "{v}");
        }
        // Debian's LTO executable has no local symbols: found all the same, in code.
        let debian = Path::new("/usr/bin/python3.11");
        let Ok(elf) = ElfFile::open(debian) else {
            return skip("no /usr/bin/python3.11");
        };
        assert!(elf.function("code_dealloc").is_none());
        let p = plan_code_dealloc(&elf).expect("code_dealloc from PyCode_Type");
        let ty = elf.data_symbol("PyCode_Type").unwrap();
        let f = elf.initial_pointer(ty + TP_DEALLOC).unwrap();
        assert!(elf.is_code(f));
        assert_eq!(
            elf.function_at(f).unwrap().file_offset,
            p.offset - p.delta_from_entry
        );
        // A file without CPython has none.
        let libc = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ]
        .into_iter()
        .find_map(|l| ElfFile::open(Path::new(l)).ok())
        .expect("libc");
        assert!(plan_code_dealloc(&libc).is_none());
    }

    #[test]
    fn replacement_mallocs_are_recognised_by_name() {
        for f in [
            "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
            "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
            "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0",
        ] {
            assert!(is_malloc_replacement(Path::new(f)), "{f}");
        }
        for f in [
            "/lib/libc.so.6",
            "/usr/lib/libjemalloc_pic.a",
            "/usr/bin/python3",
        ] {
            assert!(!is_malloc_replacement(Path::new(f)), "{f}");
        }
    }
}
