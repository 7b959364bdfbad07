//! The generated code in `src/generated/` is committed, so that building a plugin
//! never compiles a protobuf compiler. This test generates it again from
//! `proto/grpc.proto` (with the pure-Rust `protox`, no system `protoc`) and fails
//! when the committed files differ, rewriting them: commit the result.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;

/// Generates `grpc.rs` into `out`: the messages, and with `transport` the tonic
/// client and server of `grpc.Transfer`.
fn generate(out: &Path, transport: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["grpc.proto"], [root.join("proto")]).expect("grpc.proto compiles");
    tonic_prost_build::configure()
        .build_client(transport)
        .build_server(transport)
        // Payload bytes are forwarded without a copy from pipe to stream to sink.
        .bytes(".grpc.EncodedRecord.data")
        // Small initial buffers: a server holds one mostly idle stream per agent.
        .codec_path("crate::codec::LeanCodec")
        .out_dir(out)
        .compile_fds(fds)
        .expect("code generated");
}

#[test]
fn the_committed_code_is_what_grpc_proto_generates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut stale = Vec::new();
    for (transport, name) in [(false, "grpc.rs"), (true, "grpc_transport.rs")] {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), transport);
        let fresh = std::fs::read_to_string(dir.path().join("grpc.rs")).unwrap();
        let committed = root.join("src/generated").join(name);
        if std::fs::read_to_string(&committed).ok().as_deref() != Some(fresh.as_str()) {
            std::fs::write(&committed, fresh).unwrap();
            stale.push(committed.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "out of date with proto/grpc.proto, now rewritten (commit them): {stale:?}"
    );
}
