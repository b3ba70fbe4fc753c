//! How the kernel finds and walks a process's Python frames: [`PyProc`], filled by
//! userspace per process (the runtime's address and its CPython version's layout).

use crate::MAX_PY_FRAMES;

/// An offset field that does not apply to this CPython version.
pub const NO_OFFSET: u32 = u32::MAX;

/// Index in the `PY_EPOCH` map of the count the kernel adds 1 to (atomically) after each
/// of its own changes to `PY_PROCS`.
pub const PY_EPOCH_KERNEL: u32 = 0;
/// Index in the `PY_EPOCH` map of the count userspace adds 1 to after each of its changes
/// to `PY_PROCS` (the kernel's copies of a layout are taken again once either changed).
pub const PY_EPOCH_USER: u32 = 1;
/// Python threads looked at when searching a thread's state.
pub const MAX_PY_THREADS: u32 = 64;
/// Frames looked at per walk (entry frames are skipped, so a little more than kept).
pub const MAX_PY_WALK: usize = MAX_PY_FRAMES + 16;

/// How to find and walk the Python frames of one process: where its runtime is, and the
/// layout of its CPython version. Filled by userspace; `bias` may be filled by the kernel
/// (the `py_init_enter` probe) for a command started by pyleak.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProc {
    /// Load bias of the file holding `_PyRuntime` (0: not known yet, no walk).
    pub bias: u64,
    /// Link-time address of `_PyRuntime` in that file.
    pub runtime_vaddr: u64,
    /// `_PyRuntime.interpreters.head` (the newest interpreter; see `interp_next`).
    pub interp_head: u32,
    /// `PyInterpreterState` → first thread state.
    pub tstate_head: u32,
    /// `PyThreadState.next`.
    pub tstate_next: u32,
    /// `PyThreadState.native_thread_id` (3.11+), or [`NO_OFFSET`].
    pub tstate_native_tid: u32,
    /// `PyThreadState.thread_id` (the `pthread_t`).
    pub tstate_thread_id: u32,
    /// `PyThreadState` → frame (3.8–3.10: `frame`; 3.11/3.12: `cframe`; 3.13: `current_frame`).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame` when `tstate_frame` leads to a cframe, else [`NO_OFFSET`].
    pub cframe_frame: u32,
    /// Frame → previous frame.
    pub frame_back: u32,
    /// Frame → code object.
    pub frame_code: u32,
    /// Frame → instruction position (`f_lasti`, or the instruction pointer).
    pub frame_lasti: u32,
    /// 1 when `frame_lasti` holds a pointer (3.11+), 0 for an int.
    pub lasti_is_ptr: u32,
    /// Frame → owner byte (entry frames ≥ 3 are skipped), or [`NO_OFFSET`].
    pub frame_owner: u32,
    /// Code object → `co_firstlineno` (the signature kept with each frame).
    pub code_firstlineno: u32,
    /// glibc `struct pthread` → `tid`, for versions without `native_thread_id`.
    pub pthread_tid: u32,
    /// `PyThreadState.datastack_chunk`, followed by `datastack_top` (3.11+: the chunk of
    /// the thread's data stack in use, and the end of its used part; CPython's
    /// `Include/cpython/pystate.h`), or 0: frames are then read one by one.
    pub tstate_datastack: u32,
    /// `_PyStackChunk.data`: where a chunk's frames begin (`Include/internal/pycore_frame.h`).
    pub chunk_data: u32,
    /// Device of the process's pid namespace (`stat /proc/PID/ns/pid`) when it is not
    /// pyleak's: the interpreter records thread ids as that namespace numbers them.
    pub pidns_dev: u64,
    /// Inode of that pid namespace; 0: pyleak's own, thread ids compare as they are.
    pub pidns_ino: u64,
    /// Bits cleared from the pointer at `frame_code` before it is used: 3.14's
    /// `f_executable` is a `_PyStackRef` tagged in its low bits; 0 before 3.14.
    pub code_tag_mask: u64,
    /// 1 when the process's `code_dealloc` is probed (`code_dealloc_enter` bumps the
    /// kernel's code epoch before a code object's memory is freed), so a code object's
    /// `co_firstlineno` may be taken from the kernel's per-CPU cache while the epoch is
    /// unchanged instead of read per frame; 0: read per frame. Set by userspace only once
    /// that probe is in place for the process (or for every process mapping its runtime
    /// file); a forked child's copy is cleared by the kernel until its own probes are in.
    pub line_cache: u32,
    /// `PyInterpreterState.next`: the list of interpreters starts with the newest, so the
    /// main interpreter's threads are found after a subinterpreter's (0 in 3.8–3.12, 7264
    /// in 3.13: `Include/internal/pycore_interp.h`).
    pub interp_next: u32,
}
