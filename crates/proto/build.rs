fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    // protox compiles the .proto in pure Rust, so a fresh machine needs no protoc.
    let fds = protox::compile(["proto/agent.proto"], ["proto"])?;
    // Small per-stream buffers (see src/codec.rs): kas holds several idle streams per agent.
    tonic_build::configure()
        .bytes(["."])
        .codec_path("crate::codec::KasCodec")
        .compile_fds(fds)?;
    Ok(())
}
