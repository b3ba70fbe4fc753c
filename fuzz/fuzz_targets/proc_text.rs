//! `cargo +nightly fuzz run proc_text`: see `pyleak::fuzz::proc_text`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyleak::fuzz::proc_text(data));
