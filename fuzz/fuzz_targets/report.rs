//! `cargo +nightly fuzz run report`: see `pyleak::fuzz::report`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyleak::fuzz::report(data));
