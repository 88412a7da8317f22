//! Compiles proto/ into the tonic service and prost messages, with no system `protoc`:
//! protox parses the files in Rust and hands tonic-prost-build a descriptor set.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/sidecast/v1/control.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // Served by gRPC server reflection, so grpcurl and grpcui work without the proto file.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("sidecast_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
