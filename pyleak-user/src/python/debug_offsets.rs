//! `_Py_DebugOffsets` (3.13+): the offsets CPython writes at the start of `_PyRuntime` for
//! out-of-process tools. The table is statically initialised in the file's `.PyRuntime`
//! section, so it is read from the file, before the process runs. When it is valid (its
//! cookie, the version detected, a build with the GIL, offsets inside their structs),
//! its offsets replace the version module's table, which is then only a fallback.

use object::{Object, ObjectSection};
use pyleak_common::PyProc;

use super::{code::CodeLayout, versions::PyVersion};

/// `_Py_Debug_Cookie`.
const COOKIE: &[u8; 8] = b"xdebugpy";
/// Largest struct size believed (`_PyRuntimeState` is ~280 KiB in 3.13).
const MAX_STRUCT_SIZE: u64 = 1 << 24;
/// `PyASCIIObject.length` and `.state`, which pyleak's string reader assumes.
const UNICODE_LENGTH: u64 = 16;
const UNICODE_STATE: u64 = 32;

/// Where the fields pyleak uses sit in one version's `_Py_DebugOffsets`, as indexes of
/// its 64-bit words: word 0 is the cookie, 1 `version` (`PY_VERSION_HEX`), 2
/// `free_threaded`; each group of offsets starts with its struct's `size`. From
/// `Include/internal/pycore_debug_offsets.h` (`pycore_runtime.h` in 3.13).
#[derive(Debug)]
pub struct DebugOffsetsLayout {
    /// `runtime_state`: `size`, `interpreters_head`.
    pub runtime: [usize; 2],
    /// `interpreter_state`: `size`, `next`, `threads_head`.
    pub interp: [usize; 3],
    /// `thread_state`: `size`, `next`, `current_frame`, `thread_id`, `native_thread_id`.
    pub tstate: [usize; 5],
    /// `interpreter_frame`: `size`, `previous`, `executable`, `instr_ptr`, `owner`.
    pub frame: [usize; 5],
    /// `code_object`: `size`, `filename`, `name`, `qualname`, `linetable`, `firstlineno`,
    /// `co_code_adaptive`.
    pub code: [usize; 7],
    /// `unicode_object`: `size`, `state`, `length`, `asciiobject_size`.
    pub unicode: [usize; 4],
}

/// Why a file's `_Py_DebugOffsets` were not used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// No section holds `_PyRuntime` with data.
    #[error("no _Py_DebugOffsets in the file")]
    Missing,
    /// The first 8 bytes are not `xdebugpy`.
    #[error("_Py_DebugOffsets has no xdebugpy cookie")]
    Cookie,
    /// `version` names another CPython.
    #[error("_Py_DebugOffsets says version {0:#x}")]
    Version(u64),
    /// A free-threaded build (`Py_GIL_DISABLED`), whose objects pyleak does not read.
    #[error("a free-threaded build")]
    FreeThreaded,
    /// A field outside its struct, or a struct of absurd size.
    #[error("_Py_DebugOffsets has an implausible {0}")]
    Implausible(&'static str),
}

/// Reads the `_Py_DebugOffsets` at `_PyRuntime` (link-time address `runtime_vaddr`) of
/// `obj`, a CPython `version` whose table is laid out as `layout`, into `walk` and `code`.
/// Returns the fields that differ from what they held (`name table→file`); on error
/// leaves them as they were.
pub fn read(
    obj: &object::File<'_>,
    runtime_vaddr: u64,
    version: PyVersion,
    layout: &DebugOffsetsLayout,
    walk: &mut PyProc,
    code: &mut CodeLayout,
) -> Result<Vec<String>, Problem> {
    let sec = obj
        .section_by_name(".PyRuntime")
        .or_else(|| {
            obj.sections()
                .find(|s| s.address() <= runtime_vaddr && runtime_vaddr - s.address() < s.size())
        })
        .ok_or(Problem::Missing)?;
    let off = runtime_vaddr
        .checked_sub(sec.address())
        .ok_or(Problem::Missing)?;
    let data = sec.data().map_err(|_| Problem::Missing)?;
    let table = data.get(usize::try_from(off).map_err(|_| Problem::Missing)?..);
    parse(table.ok_or(Problem::Missing)?, version, layout, walk, code)
}

/// [`read`] on the table's bytes.
pub fn parse(
    table: &[u8],
    version: PyVersion,
    layout: &DebugOffsetsLayout,
    walk: &mut PyProc,
    code: &mut CodeLayout,
) -> Result<Vec<String>, Problem> {
    let word = |i: usize| -> Result<u64, Problem> {
        let b = table.get(i * 8..i * 8 + 8).ok_or(Problem::Missing)?;
        Ok(u64::from_le_bytes(
            b.try_into().map_err(|_| Problem::Missing)?,
        ))
    };
    if table.get(..8) != Some(COOKIE.as_slice()) {
        return Err(Problem::Cookie);
    }
    let hex = word(1)?;
    if ((hex >> 24) as u8, (hex >> 16) as u8) != version {
        return Err(Problem::Version(hex));
    }
    if word(2)? != 0 {
        return Err(Problem::FreeThreaded);
    }
    let [_, interp_head] = group(&word, "runtime_state", layout.runtime)?;
    let [_, interp_next, threads_head] = group(&word, "interpreter_state", layout.interp)?;
    let [_, next, current_frame, thread_id, native_tid] =
        group(&word, "thread_state", layout.tstate)?;
    let [_, previous, executable, instr_ptr, owner] =
        group(&word, "interpreter_frame", layout.frame)?;
    let [_, filename, name, qualname, linetable, firstlineno, adaptive] =
        group(&word, "code_object", layout.code)?;
    let [_, state, length, ascii_size] = group(&word, "unicode_object", layout.unicode)?;
    if (state, length) != (UNICODE_STATE, UNICODE_LENGTH) {
        return Err(Problem::Implausible("unicode_object"));
    }
    let (mut w, mut c, mut diffs) = (*walk, *code, Vec::new());
    let mut qual = c.qualname.unwrap_or(0);
    let mut set = |name: &str, file: u64, field: &mut dyn Field| {
        let table = field.get();
        if table != file {
            diffs.push(format!("{name} {table}→{file}"));
        }
        field.set(file);
    };
    set("interpreters_head", interp_head, &mut w.interp_head);
    set("interpreters.next", interp_next, &mut w.interp_next);
    set("threads_head", threads_head, &mut w.tstate_head);
    set("tstate.next", next, &mut w.tstate_next);
    set("tstate.current_frame", current_frame, &mut w.tstate_frame);
    set("tstate.thread_id", thread_id, &mut w.tstate_thread_id);
    set(
        "tstate.native_thread_id",
        native_tid,
        &mut w.tstate_native_tid,
    );
    set("frame.previous", previous, &mut w.frame_back);
    set("frame.executable", executable, &mut w.frame_code);
    set("frame.instr_ptr", instr_ptr, &mut w.frame_lasti);
    set("frame.owner", owner, &mut w.frame_owner);
    set("code.firstlineno", firstlineno, &mut w.code_firstlineno);
    set("code.firstlineno", firstlineno, &mut c.firstlineno);
    set("code.filename", filename, &mut c.filename);
    set("code.name", name, &mut c.name);
    set("code.qualname", qualname, &mut qual);
    set("code.linetable", linetable, &mut c.linetable);
    set("code.co_code_adaptive", adaptive, &mut c.code_adaptive);
    set("unicode.asciiobject_size", ascii_size, &mut c.sizeof_ascii);
    c.qualname = Some(qual);
    diffs.dedup();
    (*walk, *code) = (w, c);
    Ok(diffs)
}

/// The words at `idx` of one group (its struct's size first), its offsets checked to lie
/// inside the struct.
fn group<const N: usize>(
    word: &dyn Fn(usize) -> Result<u64, Problem>,
    name: &'static str,
    idx: [usize; N],
) -> Result<[u64; N], Problem> {
    let mut words = [0u64; N];
    for (w, i) in words.iter_mut().zip(idx) {
        *w = word(i)?;
    }
    let size = words[0];
    let inside = size <= MAX_STRUCT_SIZE && words[1..].iter().all(|&o| o < size);
    inside.then_some(words).ok_or(Problem::Implausible(name))
}

/// An offset field of either layout, whatever its integer type (every value was checked
/// to lie inside its struct, far below any of these types' limits).
trait Field {
    fn get(&self) -> u64;
    fn set(&mut self, v: u64);
}

impl Field for u32 {
    fn get(&self) -> u64 {
        u64::from(*self)
    }
    fn set(&mut self, v: u64) {
        *self = v as u32;
    }
}

impl Field for usize {
    fn get(&self) -> u64 {
        *self as u64
    }
    fn set(&mut self, v: u64) {
        *self = v as usize;
    }
}

impl Field for u64 {
    fn get(&self) -> u64 {
        *self
    }
    fn set(&mut self, v: u64) {
        *self = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::{release, versions};
    use object::ObjectSymbol;

    /// pyenv's 3.13.0 libpython, or None (said loudly; a failure under CI).
    fn libpython_3_13() -> Option<Vec<u8>> {
        let root = std::process::Command::new("pyenv").arg("root").output();
        let root = root.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let path = format!(
            "{}/versions/3.13.0/lib/libpython3.13.so.1.0",
            root.unwrap_or_default()
        );
        if let Ok(data) = std::fs::read(&path) {
            return Some(data);
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "required under CI: {path}"
        );
        eprintln!("!!!!!!!! NOT RUN: {path} is not installed on this machine !!!!!!!!");
        None
    }

    /// Layouts with every offset the table gives zeroed (the rest as the module says).
    fn blank(walk: PyProc, code: CodeLayout) -> (PyProc, CodeLayout) {
        let w = PyProc {
            cframe_frame: walk.cframe_frame,
            lasti_is_ptr: walk.lasti_is_ptr,
            pthread_tid: walk.pthread_tid,
            tstate_datastack: walk.tstate_datastack,
            chunk_data: walk.chunk_data,
            ..PyProc::default()
        };
        let c = CodeLayout {
            firstlineno: 0,
            filename: 0,
            name: 0,
            qualname: None,
            linetable: 0,
            code_adaptive: 0,
            sizeof_ascii: 0,
            ..code
        };
        (w, c)
    }

    #[test]
    fn pyenv_3_13_0_debug_offsets_equal_the_table() {
        let Some(data) = libpython_3_13() else {
            return;
        };
        let obj = object::File::parse(&*data).unwrap();
        let runtime = release::defined(&obj, "_PyRuntime").unwrap().address();
        let cp = versions::for_version((3, 13)).unwrap();
        let layout = cp.debug_offsets().expect("3.13 has _Py_DebugOffsets");
        let (table_walk, table_code) = (cp.walk_layout(), cp.code_layout());
        // Read into blank layouts: everything must come from the file...
        let (mut walk, mut code) = blank(table_walk, table_code);
        read(&obj, runtime, (3, 13), layout, &mut walk, &mut code).unwrap();
        // ...and equal pyleak's table (DWARF of the same build).
        assert_eq!(walk, table_walk);
        assert_eq!(code, table_code);
        let (mut walk, mut code) = (table_walk, table_code);
        let diffs = read(&obj, runtime, (3, 13), layout, &mut walk, &mut code);
        assert_eq!(diffs, Ok(vec![]));
    }

    #[test]
    fn the_3_14_word_indexes_fill_every_field() {
        // No 3.14 binary here: a table written at 3.14's indexes with the values of the
        // 3.14 module's own table must read back as that table, every field in its place.
        let cp = versions::for_version((3, 14)).unwrap();
        let (l, walk, code) = (
            cp.debug_offsets().unwrap(),
            cp.walk_layout(),
            cp.code_layout(),
        );
        let mut words = vec![0u64; 96];
        words[1] = 0x030e_00f0;
        let mut put = |idx: &[usize], size: u64, values: &[u64]| {
            words[idx[0]] = size;
            for (&i, &v) in idx[1..].iter().zip(values) {
                words[i] = v;
            }
        };
        put(&l.runtime, 1 << 20, &[walk.interp_head.into()]);
        put(
            &l.interp,
            1 << 20,
            &[walk.interp_next.into(), walk.tstate_head.into()],
        );
        let t = [
            walk.tstate_next,
            walk.tstate_frame,
            walk.tstate_thread_id,
            walk.tstate_native_tid,
        ];
        put(&l.tstate, 4096, &t.map(u64::from));
        let f = [
            walk.frame_back,
            walk.frame_code,
            walk.frame_lasti,
            walk.frame_owner,
        ];
        put(&l.frame, 96, &f.map(u64::from));
        let c = [
            code.filename,
            code.name,
            code.qualname.unwrap(),
            code.linetable,
            code.firstlineno,
        ];
        let mut c = c.map(|v| v as u64).to_vec();
        c.push(code.code_adaptive.into());
        put(&l.code, 256, &c);
        put(
            &l.unicode,
            64,
            &[UNICODE_STATE, UNICODE_LENGTH, code.sizeof_ascii],
        );
        let mut table: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        table[..8].copy_from_slice(COOKIE);
        let (mut w, mut c) = blank(walk, code);
        parse(&table, (3, 14), l, &mut w, &mut c).unwrap();
        assert_eq!(
            (w, c),
            (
                PyProc {
                    code_tag_mask: 0,
                    ..walk
                },
                code
            )
        );
    }

    #[test]
    fn invalid_tables_are_refused() {
        let Some(data) = libpython_3_13() else {
            return;
        };
        let obj = object::File::parse(&*data).unwrap();
        let sec = obj.section_by_name(".PyRuntime").unwrap();
        let good = sec.data().unwrap()[..1024].to_vec();
        let cp = versions::for_version((3, 13)).unwrap();
        let layout = cp.debug_offsets().unwrap();
        let (walk, code) = (cp.walk_layout(), cp.code_layout());
        let try_parse = |table: &[u8], version| {
            let (mut w, mut c) = (walk, code);
            let r = parse(table, version, layout, &mut w, &mut c);
            if r.is_err() {
                assert_eq!((w, c), (walk, code), "left as it was");
            }
            r
        };
        assert_eq!(try_parse(&good, (3, 13)), Ok(vec![]));
        assert_eq!(try_parse(&good, (3, 14)), Err(Problem::Version(0x030d00f0)));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(try_parse(&bad, (3, 13)), Err(Problem::Cookie));
        let mut bad = good.clone();
        bad[16] = 1;
        assert_eq!(try_parse(&bad, (3, 13)), Err(Problem::FreeThreaded));
        // The frame's owner past the end of the frame.
        let mut bad = good.clone();
        bad[layout.frame[4] * 8..][..8].copy_from_slice(&4096u64.to_le_bytes());
        let r = try_parse(&bad, (3, 13));
        assert_eq!(r, Err(Problem::Implausible("interpreter_frame")));
        // Another owner inside the frame: used, and said.
        let mut moved = good.clone();
        moved[layout.frame[4] * 8..][..8].copy_from_slice(&71u64.to_le_bytes());
        let r = try_parse(&moved, (3, 13));
        assert_eq!(r, Ok(vec!["frame.owner 70→71".to_owned()]));
        assert_eq!(try_parse(&good[..100], (3, 13)), Err(Problem::Missing));
    }
}
