//! Generates the client stubs from the repository's `proto/` with protox (a pure-Rust protobuf
//! compiler, so no system `protoc` is needed). The server's stubs are the server crate's business.

use std::error::Error;

const PROTO_ROOT: &str = "../../proto";
const PROTOS: &[&str] = &[
    "../../proto/idempotency/v1/idempotency.proto",
    "../../proto/idempotency/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::compile(PROTOS, [PROTO_ROOT])?;
    tonic_prost_build::configure()
        .build_server(false)
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
