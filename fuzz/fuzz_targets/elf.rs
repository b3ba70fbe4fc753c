//! `cargo +nightly fuzz run elf`: see `pyleak::fuzz::elf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyleak::fuzz::elf(data));
