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
//! inlines most calls to it: there only the calls left out of line are seen.

use pyleak_common::{holder_cookie, object_cookie, AllocKind, Layer, ProbeCookie};

use super::{
    elf::{ElfFile, Function},
    prologue::{choose_attach_point, AttachPoint},
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

    #[test]
    fn the_dict_argument_moved_in_3_12() {
        assert_eq!(dict_argument((3, 8)), 0);
        assert_eq!(dict_argument((3, 11)), 0);
        assert_eq!(dict_argument((3, 12)), 1);
        assert_eq!(dict_argument((3, 13)), 1);
    }
}
