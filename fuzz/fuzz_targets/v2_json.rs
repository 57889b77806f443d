//! The `v2_json` target; what it fuzzes and checks is in `kubemaas_fuzz::v2_json` (fuzz/src/v2_json.rs), which
//! `cargo test` in the main workspace also replays over the committed seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubemaas_fuzz::v2_json::run(data));
