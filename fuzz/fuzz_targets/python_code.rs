//! `cargo +nightly fuzz run python_code`: see `pyleak::fuzz::python_code`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pyleak::fuzz::python_code(data));
