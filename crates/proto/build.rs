fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    // protox compiles the .proto in pure Rust, so a fresh machine needs no protoc.
    let fds = protox::compile(["proto/agent.proto"], ["proto"])?;
    tonic_build::configure().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
