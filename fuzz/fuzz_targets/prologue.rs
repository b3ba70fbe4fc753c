//! `cargo +nightly fuzz run prologue`: see `pyleak::fuzz::prologue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyleak::fuzz::prologue(data));
