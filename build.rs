//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no system `protoc` is needed),
//! generates the tonic/prost code from the resulting descriptors, and keeps the encoded descriptor
//! set in OUT_DIR for gRPC server reflection.

use std::{env, error::Error, fs, path::PathBuf};

const PROTOS: &[&str] = &[
    "proto/idempotency/v1/idempotency.proto",
    "proto/idempotency/admin/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    // proto/ is also the include path of the vendored google/api protos the RPCs' HTTP options
    // import (protox ships google/protobuf itself).
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(PROTOS)?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // Encoded by protox itself, not through prost_types, which would drop the options' extensions
    // (`google.api.http`, the gateway's routes) as unknown fields.
    fs::write(
        out_dir.join("idempotency_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
