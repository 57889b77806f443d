//! Writes `crds/generated/*.yaml` from the Rust types (`--check` fails if the files drift).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("generated")
        .join("modeldeployments.kubemaas.io.yaml");
    let yaml = match kubemaas_crds::crds_yaml() {
        Ok(y) => y,
        Err(e) => {
            eprintln!("crdgen: failed to serialise the CRD: {e}");
            return ExitCode::FAILURE;
        }
    };
    if check {
        return match std::fs::read_to_string(&path) {
            Ok(committed) if committed == yaml => ExitCode::SUCCESS,
            _ => {
                eprintln!(
                    "crdgen: {} is stale; run `cargo run -p kubemaas-crds --bin crdgen`",
                    path.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let written = path
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .and_then(|_| std::fs::write(&path, yaml));
    match written {
        Ok(()) => {
            println!("wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: failed to write {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
