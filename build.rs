//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so building
//! Outpost needs no protoc on the machine.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/outpost/v1/ingest.proto",
        "proto/outpost/v1/query.proto",
        "proto/outpost/v1/store.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptors serve gRPC reflection (grpcurl).
    std::fs::write(
        out.join("outpost_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Type names let the codec find each message's descriptor, to bound
    // what a message may allocate before it is decoded (agent/wire.rs).
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .codec_path("crate::wire::BoundedCodec")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
