//! The `v2_binary` target; what it fuzzes and checks is in `kubemaas_fuzz::v2_binary` (fuzz/src/v2_binary.rs), which
//! `cargo test` in the main workspace also replays over the committed seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubemaas_fuzz::v2_binary::run(data));
