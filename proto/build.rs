//! Generates the Rust types from `proto/grpc.proto` with the pure-Rust `protox`
//! compiler, so a build never needs a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let transport = std::env::var_os("CARGO_FEATURE_TRANSPORT").is_some();
    println!("cargo:rerun-if-changed=proto/grpc.proto");
    let fds = protox::compile(["grpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(transport)
        .build_server(transport)
        // Payload bytes are forwarded without a copy from pipe to stream to sink.
        .bytes(".grpc.EncodedRecord.data")
        // Small initial buffers: a server holds one mostly idle stream per agent.
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
