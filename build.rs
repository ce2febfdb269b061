//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates the
//! tonic/prost code plus the encoded descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_FILES: &[&str] = &[
    "proto/flashsale/v1/types.proto",
    "proto/flashsale/v1/checkout.proto",
    "proto/flashsale/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `embed_migrations!` reads migrations/ at compile time; a new migration must rebuild.
    println!("cargo:rerun-if-changed=migrations");
    let descriptors = protox::compile(PROTO_FILES, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("flashsale_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::grpc::codec::CompactCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
