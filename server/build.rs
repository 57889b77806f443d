//! Generates the gRPC code (messages, server and client stubs) from `proto/` with protox, a
//! protobuf compiler written in Rust, so building needs no `protoc` on the machine; and the ONNX
//! model messages `compress` reads and writes (`proto/onnx.proto`, no service).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/inference.proto", "proto/health.proto", "proto/onnx.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Raw tensor contents stay `Bytes`, so decoding a request does not copy them.
        .bytes(".inference")
        .compile_fds(descriptors)?;
    Ok(())
}
