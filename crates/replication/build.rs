//! Compiles `proto/replication.proto` with prost-build, parsed by protox (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/replication.proto");
    let fds = protox::compile(["replication.proto"], ["../../proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
