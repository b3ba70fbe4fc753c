//! Stacks as reports show them: the kernel's interned stacks turned into frame names,
//! Python frames first, native frames under them or alone.

use std::collections::HashMap;

use pyleak_common::{StackTrace, STACK_LEAF_IS_IP, STACK_PY_TRUNCATED};

use super::Recorder;
use crate::{python::Resolver, symbolize::Symbolizer};

/// The frames of an interned stack, as reports show them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StackFrames {
    /// Root first.
    pub names: Vec<String>,
    /// Whether Python frames were cut off (the first name is then `[truncated]`).
    pub truncated: bool,
    /// How many names, at the leaf end, are native frames.
    pub native: usize,
}

/// Marks a native frame under Python frames.
pub const NATIVE_MARK: &str = " [native]";

/// Frames of an interned stack, root first: the Python frames when there are any (then,
/// with `native`, the native frames below the leaf Python frame, marked [`NATIVE_MARK`]),
/// else the native frames.
pub fn frames_of(
    rec: &Recorder,
    syms: &Symbolizer,
    py: &Resolver,
    native: bool,
    pid: u32,
    stack_id: u64,
) -> StackFrames {
    let lost = || StackFrames {
        names: vec!["[stack lost]".to_owned()],
        truncated: false,
        native: 0,
    };
    if stack_id == 0 {
        return lost();
    }
    let Some(st) = rec.stack(stack_id) else {
        return lost();
    };
    let n = (st.py_len as usize).min(st.py.len());
    let truncated = st.flags & STACK_PY_TRUNCATED != 0;
    if n == 0 {
        let names = native_frames(syms, pid, &st);
        let native = names.len();
        return StackFrames {
            names,
            truncated,
            native,
        };
    }
    let mut names: Vec<String> = Vec::with_capacity(n + 1);
    if truncated {
        names.push("[truncated]".to_owned());
    }
    names.extend(
        st.py[..n]
            .iter()
            .enumerate()
            .rev()
            .map(|(i, f)| py.frame(pid, stack_id, i, f)),
    );
    let mut below = Vec::new();
    if native {
        below = under_python(native_frames(syms, pid, &st));
        names.extend(below.iter().map(|f| format!("{f}{NATIVE_MARK}")));
    }
    StackFrames {
        names,
        truncated,
        native: below.len(),
    }
}

/// Of a thread's native frames (root first), those under its leaf Python frame: the ones
/// below the leaf-most frame of CPython's eval loop. The eval loop and everything above it
/// (the interpreter's own calls between Python frames, `main`) are what the Python frames
/// stand for, so they are trimmed; the leaf, the allocator's caller, always stays (the
/// eval loop itself when it allocated). A frame-pointer walk seldom gets that far (CPython
/// and libffi are built without frame pointers here), and then every frame is kept.
pub fn under_python(frames: Vec<String>) -> Vec<String> {
    let is_eval_loop = |f: &String| {
        let name = f.split_once(" (").map_or(f.as_str(), |(n, _)| n);
        name.starts_with("_PyEval_EvalFrame") || name.starts_with("PyEval_EvalFrame")
    };
    let above_leaf = &frames[..frames.len().saturating_sub(1)];
    match above_leaf.iter().rposition(is_eval_loop) {
        Some(i) => frames[i + 1..].to_vec(),
        None => frames,
    }
}

/// Stands for native frames none of which is code pyleak can name (an address in no
/// mapping): such an address is never shown as a function.
pub const UNKNOWN_NATIVE: &str = "[unknown native code]";

/// Native frames of a stack, root first. An address in no known mapping (a stack address,
/// a walk gone astray: `0x7fffffffe000 ([unknown])`) is not a function and is left out;
/// when nothing is left, [`UNKNOWN_NATIVE`] stands for the frames.
pub fn native_frames(syms: &Symbolizer, pid: u32, st: &StackTrace) -> Vec<String> {
    let n = (st.native_len as usize).min(st.native.len());
    let leaf_is_ip = st.flags & STACK_LEAF_IS_IP != 0;
    let mut out = Vec::with_capacity(n);
    for (i, &ip) in st.native[..n].iter().enumerate() {
        // Past the first frame, an address outside every mapping of code means the
        // frame-pointer walk went astray (code without frame pointers): the rest is noise.
        if i > 0 && !syms.is_code(pid, ip) {
            break;
        }
        let name = syms.frame(pid, ip, !(i == 0 && leaf_is_ip));
        if !name.ends_with(" ([unknown])") {
            out.push(name);
        }
    }
    if out.is_empty() && n > 0 {
        out.push(UNKNOWN_NATIVE.to_owned());
    }
    out.reverse();
    out
}

/// The frames of every stack in `keys`, by (pid, stack id): the symbolized stacks the
/// analysis reads.
pub fn frames_of_all(
    rec: &Recorder,
    syms: &Symbolizer,
    py: &Resolver,
    native: bool,
    keys: impl IntoIterator<Item = (u32, u64)>,
) -> HashMap<(u32, u64), StackFrames> {
    let mut out = HashMap::new();
    for (pid, id) in keys {
        out.entry((pid, id))
            .or_insert_with(|| frames_of(rec, syms, py, native, pid, id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_frames_under_python_stop_at_the_leaf_eval_loop() {
        let v = |f: &[&str]| f.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        // A walk through a CPython built with frame pointers: the eval loop of the leaf
        // Python frame and all above it are the Python frames; below it stays.
        let walked = v(&[
            "_start (python3.12)",
            "Py_RunMain (libpython3.12.so.1.0)",
            "_PyEval_EvalFrameDefault (libpython3.12.so.1.0)",
            "_PyFunction_Vectorcall (libpython3.12.so.1.0)",
            "_PyEval_EvalFrameDefault.cold (libpython3.12.so.1.0)",
            "PyCFuncPtr_call (_ctypes.cpython-312-x86_64-linux-gnu.so)",
            "ffi_call_unix64 (libffi.so.8)",
            "leak_outer (libleak.so)",
            "leak_inner (libleak.so)",
        ]);
        assert_eq!(
            under_python(walked),
            v(&[
                "PyCFuncPtr_call (_ctypes.cpython-312-x86_64-linux-gnu.so)",
                "ffi_call_unix64 (libffi.so.8)",
                "leak_outer (libleak.so)",
                "leak_inner (libleak.so)",
            ])
        );
        // 3.8-3.10 and a walk that never reaches the eval loop (no frame pointers there).
        assert_eq!(
            under_python(v(&["PyEval_EvalFrameEx (libpython2.7.so)", "f (x.so)"])),
            v(&["f (x.so)"])
        );
        let short = v(&["0x6f79 (libffi.so.8.1.2)", "leak_inner (libleak.so)"]);
        assert_eq!(under_python(short.clone()), short);
        // An allocation the eval loop made itself: the leaf stays.
        assert_eq!(
            under_python(v(&[
                "_PyEval_EvalFrameDefault (python3.11)",
                "_PyEval_EvalFrameDefault (python3.11)"
            ])),
            v(&["_PyEval_EvalFrameDefault (python3.11)"])
        );
        assert!(under_python(Vec::new()).is_empty());
    }

    #[test]
    fn an_address_in_no_mapping_is_never_a_function() {
        // SAFETY: StackTrace is plain old data; all zeroes is a valid (empty) stack.
        let mut st: StackTrace = unsafe { std::mem::zeroed() };
        st.native[0] = 0x7fff_ffff_e000;
        st.native_len = 1;
        let names = native_frames(&Symbolizer::default(), 1, &st);
        assert_eq!(names, [UNKNOWN_NATIVE]);
        assert!(!names.iter().any(|n| n.contains("0x7fffffffe000")));
        st.native_len = 0;
        assert!(native_frames(&Symbolizer::default(), 1, &st).is_empty());
    }
}
