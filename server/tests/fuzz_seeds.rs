//! Replays the fuzz targets' committed seeds (`fuzz/corpus/TARGET`) through the targets' own
//! checks, so a decoder or router change that breaks an invariant on a known input fails
//! `cargo test`, and the fuzz crate cannot fall out of step with the server's API unnoticed
//! (it is its own workspace, built only by `make fuzz`).

use std::path::PathBuf;

/// Runs every seed of `target` through `run`; returns how many there were.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    seeds.sort();
    for seed in &seeds {
        let data = std::fs::read(seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
        // Printed so that a failing seed is named in the test's output.
        println!("{target}: {}", seed.display());
        run(&data);
    }
    seeds.len()
}

#[test]
fn v2_json_seeds_keep_the_decoders_invariants() {
    assert!(replay("v2_json", kubemaas_fuzz::v2_json::run) >= 10);
}

#[test]
fn v2_binary_seeds_keep_the_decoders_invariants() {
    assert!(replay("v2_binary", kubemaas_fuzz::v2_binary::run) >= 10);
}

#[test]
fn v1_json_seeds_keep_the_decoders_invariants() {
    assert!(replay("v1_json", kubemaas_fuzz::v1_json::run) >= 10);
}

#[test]
fn router_seeds_keep_the_routers_invariants() {
    assert!(replay("router", kubemaas_fuzz::router::run) >= 10);
}
