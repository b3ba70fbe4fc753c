//! Roots in the threads' frames: each local variable of each Python frame of each
//! thread, named `thread NAME: FUNCTION() local VAR` (the thread's name from
//! `threading._active`, else `MainThread` or its thread id). The frame chain is the one the stack walk
//! follows (`walk_layout`: thread list, current frame, previous frame, code object,
//! owner); where the locals sit is the version's [`FrameLocals`].

use std::collections::HashMap;

use pyleak_common::NO_OFFSET;

use super::layout::FrameLocals;
use super::objects::Heap;
use crate::python::PythonRuntime;

/// Threads and frames followed at most (a cycle in garbage stops there).
const MAX_THREADS: usize = 4096;
const MAX_FRAMES: usize = 1024;
/// Locals per frame read at most.
const MAX_LOCALS: u64 = 4096;
/// `FRAME_OWNED_BY_CSTACK` (3.12, 3.13): an entry frame with no code of its own.
const OWNED_BY_CSTACK: u8 = 3;

/// (label, object) for every local of every frame, innermost frames first.
/// `modules` is `sys.modules`.
pub fn locals(
    pid: u32,
    heap: &mut Heap,
    rt: &PythonRuntime,
    interp: u64,
    modules: u64,
) -> Vec<(String, u64)> {
    let w = rt.walk;
    let names = thread_names(heap, modules);
    let mut out = Vec::new();
    let mut tstate = heap
        .img
        .word(interp + u64::from(w.tstate_head))
        .unwrap_or(0);
    for _ in 0..MAX_THREADS {
        if tstate == 0 {
            break;
        }
        let ident = heap.img.word(tstate + u64::from(w.tstate_thread_id));
        // Its name in `threading`, else "MainThread" or its thread id (the kernel's: the
        // thread state's on 3.11+, glibc's `struct pthread` before).
        let tid = if w.tstate_native_tid != NO_OFFSET {
            heap.img.bytes(tstate + u64::from(w.tstate_native_tid), 4)
        } else {
            ident.and_then(|i| heap.img.bytes(i + u64::from(w.pthread_tid), 4))
        }
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let thread = match (ident.and_then(|i| names.get(&i)), tid) {
            (Some(name), _) => name.clone(),
            (None, Some(tid)) if tid == pid => "MainThread".to_owned(),
            (None, Some(tid)) => format!("{tid}"),
            (None, None) => format!("{:#x}", ident.unwrap_or(0)),
        };
        let mut frame = heap
            .img
            .word(tstate + u64::from(w.tstate_frame))
            .unwrap_or(0);
        if w.cframe_frame != NO_OFFSET && frame != 0 {
            frame = heap
                .img
                .word(frame + u64::from(w.cframe_frame))
                .unwrap_or(0);
        }
        for _ in 0..MAX_FRAMES {
            if frame == 0 {
                break;
            }
            frame_locals(heap, rt, frame, &thread, &mut out);
            frame = heap.img.word(frame + u64::from(w.frame_back)).unwrap_or(0);
        }
        tstate = heap
            .img
            .word(tstate + u64::from(w.tstate_next))
            .unwrap_or(0);
    }
    out
}

/// The locals of one frame, labelled.
fn frame_locals(
    heap: &mut Heap,
    rt: &PythonRuntime,
    frame: u64,
    thread: &str,
    out: &mut Vec<(String, u64)>,
) {
    let w = rt.walk;
    if w.frame_owner != NO_OFFSET {
        let owner = heap.img.bytes(frame + u64::from(w.frame_owner), 1);
        if owner.is_none_or(|o| o[0] >= OWNED_BY_CSTACK) {
            return;
        }
    }
    let Some(code) = heap.img.word(frame + u64::from(w.frame_code)) else {
        return;
    };
    let Some(ty) = heap.type_of(code) else {
        return;
    };
    if heap.types[ty as usize].name != "code" {
        return;
    }
    let name_at = rt.code.qualname.unwrap_or(rt.code.name) as u64;
    let function = heap
        .img
        .word(code + name_at)
        .and_then(|n| heap.str_value(n))
        .unwrap_or_else(|| "?".to_owned());
    let (slots, count, names) = match heap.layout.frame_locals {
        FrameLocals::Object {
            localsplus,
            nlocals,
            varnames,
        } => (frame + localsplus, code + nlocals, code + varnames),
        FrameLocals::Interpreter {
            localsplus,
            nlocalsplus,
            names,
        } => (frame + localsplus, code + nlocalsplus, code + names),
    };
    let Some(n) = heap.img.bytes(count, 4) else {
        return;
    };
    let n = u64::from(u32::from_le_bytes([n[0], n[1], n[2], n[3]])).min(MAX_LOCALS);
    let Some(names) = heap.img.word(names) else {
        return;
    };
    let fixed = heap.layout.fixed;
    for i in 0..n {
        let Some(v) = heap.img.word(slots + i * 8).filter(|&v| v != 0) else {
            continue;
        };
        let var = heap
            .img
            .word(names + fixed.tuple_items + i * 8)
            .and_then(|s| heap.str_value(s))
            .unwrap_or_else(|| format!("#{i}"));
        out.push((format!("thread {thread}: {function}() local {var}"), v));
    }
}

/// Thread idents → names, from `threading._active` (threads started by `threading`,
/// and the main thread once `threading` is imported).
fn thread_names(heap: &mut Heap, modules: u64) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    let entries = heap.dict_entries(modules).unwrap_or_default();
    let threading = entries
        .into_iter()
        .find_map(|(k, v)| (heap.str_value(k).as_deref() == Some("threading")).then_some(v));
    let Some(threading) = threading else {
        return out;
    };
    let Some(active) = heap.attr(threading, "_active") else {
        return out;
    };
    for (k, v) in heap.dict_entries(active).unwrap_or_default() {
        let ident = heap.int_value(k);
        let name = heap.attr(v, "_name").and_then(|n| heap.str_value(n));
        if let (Some(ident), Some(name)) = (ident, name) {
            out.insert(ident, name);
        }
    }
    out
}
