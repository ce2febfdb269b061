//! The gRPC surface: generated code, proto <-> domain conversions, the one mapping from
//! domain errors to statuses, and thin service handlers.

pub mod admin;
pub mod checkout;
pub mod codec;
pub mod convert;
pub mod guard;
pub mod status;

/// Code generated from `proto/flashsale/v1` by `build.rs`.
pub mod pb {
    tonic::include_proto!("flashsale.v1");

    /// The encoded descriptors of `proto/`, served by server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/flashsale_descriptor.bin"));
}
