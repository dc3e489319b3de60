//! `strata-proto`: Strata's gRPC protocol, generated from `proto/strata/v1/strata.proto`
//! at build time without a system `protoc`. Only the wire contract lives here.

/// Generated messages, clients (`admin_client`, `broker_client`) and servers.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("strata.v1");
    include!(concat!(env!("OUT_DIR"), "/decode_checks.rs"));
}

pub mod codec;

/// The encoded `FileDescriptorSet` of the protocol, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/strata_descriptor.bin"));

mod partitioner;
pub use partitioner::{murmur2, partition_for_key};
