//! The `router` target; what it fuzzes and checks is in `kubemaas_fuzz::router` (fuzz/src/router.rs), which
//! `cargo test` in the main workspace also replays over the committed seeds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kubemaas_fuzz::router::run(data));
