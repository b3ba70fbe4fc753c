//! pyleak's kernel side: probes on every layer of CPython's allocator stack, aggregating in
//! maps that userspace reads (see `pyleak-common` for the shared types).
#![no_std]
#![no_main]
// BPF has compare-and-swap (since v5.12) but Rust's target does not expose `AtomicU64`'s.
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Map values are passed by reference on purpose: by value, LLVM copies them onto the
// 512-byte BPF stack (a ThreadState or StackTrace does not fit).
#![allow(clippy::needless_borrows_for_generic_args)]

mod alloc;
mod lifecycle;
mod maps;
mod pages;
mod pystack;
mod reuse;
mod sampling;
mod sites;
mod stack;
mod thread;
mod vm;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Never reached: the verifier rejects programs that could panic.
    loop {}
}

/// GPL-compatible, for `bpf_probe_read_user` and friends.
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
