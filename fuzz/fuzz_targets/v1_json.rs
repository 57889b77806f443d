//! The `v1_json` target; what it fuzzes and checks is in `kubemaas_fuzz::v1_json` (fuzz/src/v1_json.rs), which
//! `cargo test` in the main workspace also replays over the committed seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubemaas_fuzz::v1_json::run(data));
