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
    // Every message gets the codec's decode check; ProduceRequest's own is in
    // src/codec.rs, every other takes the default (no check).
    let mut checks = String::new();
    for file in &descriptors.file {
        for message in &file.message_type {
            let name = message.name();
            if name != "ProduceRequest" {
                checks.push_str(&format!("impl crate::codec::DecodeCheck for {name} {{}}\n"));
            }
        }
    }
    std::fs::write(out_dir.join("decode_checks.rs"), checks)?;
    // `bytes` fields as `bytes::Bytes`: decoding slices the received buffer instead of
    // copying record batches, and clones are free. Requests are decoded by our codec,
    // which checks what a request costs decoded before it decodes it.
    tonic_prost_build::configure()
        .bytes(".strata.v1")
        .codec_path("crate::codec::Codec")
        .compile_fds(descriptors)?;
    Ok(())
}
