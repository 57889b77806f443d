//! Generates the gRPC code (messages, server and client stubs) from `proto/` with protox, a
//! protobuf compiler written in Rust, so building needs no `protoc` on the machine; and the ONNX
//! model messages `compress` reads and writes (`proto/onnx.proto`, no service).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/inference.proto", "proto/health.proto", "proto/onnx.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // The descriptors, for reading Triton's config.pbtxt (text format) into the same messages.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Raw tensor contents stay `Bytes`, so decoding a request does not copy them.
        .bytes(".inference")
        // prost's codec with a bound on what a request's entries take once decoded.
        .codec_path("crate::grpc::wire::BoundedCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
