//! Probes where a CPython free list hands a block out again: `_Py_NewReference` (every
//! object's first reference, `Objects/object.c`, a function since 3.9) and the return of
//! `new_keys_object` (`Objects/dictobject.c`, which takes small dict keys tables off their
//! own free list). A block dropped by one line and taken again by another is then counted
//! under the line that took it, as tracemalloc's `_PyTraceMalloc_NewReference` does.
//!
//! Dict keys tables come off their free list in `new_keys_object`, which the build inlines
//! into `insert_to_emptydict` (a literal `{"a": x}` starts empty and gets its table at the
//! first insert): there the table is read from the dict when `insert_to_emptydict` returns.
//!
//! CPython 3.8 inlines `_Py_NewReference` everywhere, and an LTO build (Debian's 3.11)
//! inlines most calls to it. There each inlined copy is found by its first step, the
//! tracemalloc check (`if (_Py_tracemalloc_config.tracing)
//! _PyTraceMalloc_NewReference(op);`, `Objects/object.c` 3.9–3.11; `_PyRuntime`'s copy of
//! the flag in 3.12+): a load of the flag the exported function loads, a conditional jump,
//! and on the tracing branch a call of the function it calls with `op` in `rdi`, which
//! names the register `op` is in at the jump ([`inline_new_references`]).

use pyleak_common::{holder_cookie, object_cookie, AllocKind, Layer, ProbeCookie};

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory};
use pyleak_common::site_object_cookie;

use super::{
    elf::{ElfFile, Function},
    fallback::{walk_to_call, Callee, Code_, Src},
    file_offset,
    prologue::{choose_attach_point, is_emulated, AttachPoint},
    ProbeRole, ProbeSpec,
};

/// The function an object gets its first reference in.
pub const NEW_REFERENCE: &str = "_Py_NewReference";
/// The function that makes (or takes off its free list) a dict keys table; GCC may give
/// its copy a suffix (`new_keys_object.constprop.0` in 3.13).
pub const NEW_KEYS: &str = "new_keys_object";

/// The function that gives an empty dict its first keys table.
pub const INSERT_TO_EMPTY: &str = "insert_to_emptydict";
/// `offsetof(PyDictObject, ma_keys)`, 3.8–3.14 (`Include/cpython/dictobject.h`: the object
/// head, `ma_used`, the version or watcher tag, then `ma_keys`).
const MA_KEYS: u32 = 32;

/// The argument `insert_to_emptydict` takes its dict in: `(mp, key, hash, value)` up to
/// 3.11, `(interp, mp, key, hash, value)` from 3.12 (`Objects/dictobject.c`).
fn dict_argument(version: (u8, u8)) -> u32 {
    if version >= (3, 12) {
        1
    } else {
        0
    }
}

/// The reuse probes of a file holding CPython, for the pymalloc layer: none when it has
/// neither function.
pub fn plan_reuse(elf: &ElfFile) -> Vec<ProbeSpec> {
    let mut out = Vec::new();
    let version = object::File::parse(elf.data())
        .ok()
        .and_then(|obj| crate::python::release::version_of(&obj));
    let Some(version) = version else {
        return out;
    };
    let preheader = crate::python::versions::for_version(version)
        .map(|v| v.pymalloc().preheader_flags)
        .filter(|&f| f <= u64::from(u16::MAX));
    if let (Some(f), Some(preheader)) = (elf.function(NEW_REFERENCE), preheader) {
        // `op` in rdi until the attach point.
        let point = choose_attach_point(&f.code, f.address, 1, false);
        let delta = object_cookie(point.stack_delta as u32, preheader as u32);
        out.push(probe(
            elf,
            NEW_REFERENCE,
            &f,
            point,
            ProbeRole::ReuseObject,
            delta,
        ));
        out.extend(inline_new_references(elf, &f, preheader as u32));
    }
    if let Some(f) = elf.function_or_clone(NEW_KEYS) {
        // A return probe: where the return address is still on top.
        let point = choose_attach_point(&f.code, f.address, 0, true);
        out.push(probe(elf, NEW_KEYS, &f, point, ProbeRole::ReuseBlock, 0));
    }
    if let Some(f) = elf.function_or_clone(INSERT_TO_EMPTY) {
        let arg = dict_argument(version);
        // The dict still in its register, and the return address on top.
        let point = choose_attach_point(&f.code, f.address, arg as usize + 1, true);
        let delta = holder_cookie(arg, MA_KEYS);
        out.push(probe(
            elf,
            INSERT_TO_EMPTY,
            &f,
            point,
            ProbeRole::ReuseHolder,
            delta,
        ));
    }
    out
}

/// Instructions between the load of the tracemalloc flag and the jump on it.
const FLAG_TO_JUMP: usize = 3;

/// The copies of `_Py_NewReference` (`new_ref`, the exported function) inlined into the
/// file's other functions: a probe on each copy's conditional jump on the tracemalloc flag,
/// `op` in the register the tracing branch passes in `rdi` to the function `new_ref`
/// calls. None when `new_ref` does not load a flag rip-relative and call a function (a
/// shared library reaches the flag through its GOT: built without LTO, its copies are
/// few), nor for its own jump, probed at its entry already.
pub fn inline_new_references(elf: &ElfFile, new_ref: &Function, preheader: u32) -> Vec<ProbeSpec> {
    let Some((flag, tracer)) = tracemalloc_check(new_ref) else {
        return Vec::new();
    };
    let Ok(file) = object::File::parse(elf.data()) else {
        return Vec::new();
    };
    let code = Code_::of(&file);
    let own = new_ref.address..new_ref.address + new_ref.code.len() as u64;
    let mut factory = InstructionInfoFactory::new();
    let mut out = Vec::new();
    for &(start, bytes) in &code.ranges {
        let mut last_load: Option<u64> = None;
        let mut since_load = 0;
        for i in Decoder::with_ip(64, bytes, start, DecoderOptions::NONE).iter() {
            since_load += 1;
            if reads_flag(&i, flag) {
                (last_load, since_load) = (Some(i.ip()), 0);
                continue;
            }
            let near = last_load.is_some() && since_load <= FLAG_TO_JUMP;
            if i.flow_control() != FlowControl::ConditionalBranch || !near || own.contains(&i.ip())
            {
                if !matches!(i.flow_control(), FlowControl::Next) {
                    last_load = None;
                }
                continue;
            }
            last_load = None;
            // The tracing branch is taken or falls through, as the compiler laid it out.
            let reg = [i.near_branch64(), i.next_ip()]
                .into_iter()
                .find_map(|from| {
                    match walk_to_call(&code, &mut factory, from, Callee::Function(tracer))?.0[5] {
                        Src::Reg(r) if r != 7 => Some(r),
                        _ => None,
                    }
                });
            let (Some(reg), Some(offset)) = (reg, file_offset(&file, i.ip())) else {
                log::trace!(
                    "tracemalloc check at {:#x}: no call of {tracer:#x} found",
                    i.ip()
                );
                continue;
            };
            log::trace!(
                "inlined {NEW_REFERENCE} at {:#x}, op in register {reg}",
                i.ip()
            );
            let emulated = code
                .bytes(i.ip(), i.len())
                .is_some_and(|b| is_emulated(&i, b));
            out.push(ProbeSpec {
                path: elf.path().to_owned(),
                symbol: "_Py_NewReference (inlined)",
                offset,
                role: ProbeRole::ReuseObject,
                cookie: ProbeCookie {
                    kind: AllocKind::SiteReuseObject as u32,
                    layer: Layer::Pymalloc as u32,
                    stack_delta: site_object_cookie(reg, preheader),
                }
                .encode(),
                emulated,
                delta_from_entry: 0,
                site: None,
            });
        }
    }
    log::debug!(
        "{}: {} inlined copies of {NEW_REFERENCE}",
        elf.path().display(),
        out.len()
    );
    out
}

/// The flag `_Py_NewReference` checks first (its link-time address, loaded rip-relative)
/// and the function it calls when the flag is set.
fn tracemalloc_check(new_ref: &Function) -> Option<(u64, u64)> {
    let mut flag = None;
    for i in Decoder::with_ip(64, &new_ref.code, new_ref.address, DecoderOptions::NONE).iter() {
        if flag.is_none() && i.is_ip_rel_memory_operand() && !i.is_invalid() {
            flag = Some(i.ip_rel_memory_address());
        }
        if i.flow_control() == FlowControl::Call && i.op0_kind() == iced_x86::OpKind::NearBranch64 {
            return Some((flag?, i.near_branch64()));
        }
    }
    None
}

/// Whether `i` reads the flag at `flag` (rip-relative): a load into a register
/// (`mov r32, [flag]`, `movsxd`, `test`) or `cmp [flag], imm`; not a store to it.
fn reads_flag(i: &Instruction, flag: u64) -> bool {
    use iced_x86::{Mnemonic, OpKind};
    i.is_ip_rel_memory_operand()
        && i.ip_rel_memory_address() == flag
        && (i.op0_kind() == OpKind::Register
            || matches!(i.mnemonic(), Mnemonic::Cmp | Mnemonic::Test))
}

/// One reuse probe of the pymalloc layer at `point` of `f`; `stack_delta` is the cookie's
/// field as its `role` reads it.
fn probe(
    elf: &ElfFile,
    symbol: &'static str,
    f: &Function,
    point: AttachPoint,
    role: ProbeRole,
    stack_delta: u32,
) -> ProbeSpec {
    let kind = match role {
        ProbeRole::ReuseObject => AllocKind::ReuseObject,
        ProbeRole::ReuseBlock => AllocKind::ReuseBlock,
        _ => AllocKind::ReuseHolder,
    };
    ProbeSpec {
        path: elf.path().to_owned(),
        symbol,
        offset: f.file_offset + point.offset,
        role,
        cookie: ProbeCookie {
            kind: kind as u32,
            layer: Layer::Pymalloc as u32,
            stack_delta,
        }
        .encode(),
        emulated: point.emulated,
        delta_from_entry: point.offset,
        site: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's LTO executable inlines `_Py_NewReference` into ~260 callers; each copy is
    /// probed with the register its object is in. `PyFloat_FromDouble`'s copy (floats off
    /// their free list) has it in rax: `mov _Py_tracemalloc_config+4(%rip),%edx; test
    /// %edx,%edx; jne` to `mov %rax,%rdi; …; call _PyTraceMalloc_NewReference`.
    #[test]
    fn inlined_new_references_are_found_with_their_register() {
        let Ok(elf) = ElfFile::open(std::path::Path::new("/usr/bin/python3.11")) else {
            assert!(std::env::var_os("CI").is_none(), "required under CI");
            return eprintln!("!!! SKIPPED: no /usr/bin/python3.11");
        };
        let new_ref = elf.function(NEW_REFERENCE).expect("exported");
        let probes = inline_new_references(&elf, &new_ref, 0);
        assert!(probes.len() >= 200, "{}", probes.len());
        let float = elf.function("PyFloat_FromDouble").expect("exported");
        let inside = float.file_offset..float.file_offset + float.code.len() as u64;
        let copy = probes
            .iter()
            .find(|p| inside.contains(&p.offset))
            .expect("PyFloat_FromDouble's copy");
        let cookie = ProbeCookie::decode(copy.cookie);
        assert_eq!(cookie.kind, AllocKind::SiteReuseObject as u32);
        assert_eq!(cookie.stack_delta & 0xff, 0, "op in rax");
        // The function's own check is its entry probe's.
        let own = new_ref.file_offset..new_ref.file_offset + new_ref.code.len() as u64;
        assert!(probes.iter().all(|p| !own.contains(&p.offset)));
    }

    #[test]
    fn the_dict_argument_moved_in_3_12() {
        assert_eq!(dict_argument((3, 8)), 0);
        assert_eq!(dict_argument((3, 11)), 0);
        assert_eq!(dict_argument((3, 12)), 1);
        assert_eq!(dict_argument((3, 13)), 1);
    }
}
