//! Compiles the .proto files with protox (pure Rust: no system `protoc`) and generates
//! tonic/prost code plus the encoded descriptor set that gRPC reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/strata/v1/strata.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("strata_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // `bytes` fields as `bytes::Bytes`: decoding slices the received buffer instead of
    // copying record batches, and clones are free.
    tonic_prost_build::configure()
        .bytes(".strata.v1")
        .compile_fds(descriptors)?;
    Ok(())
}
