//! The transfer stream: who may open one, what the server does with batches.

use keel_proto::grpc::EncodedRecord;
use keel_tests::{
    Agent, Server, ServerOptions, agent_pair, batch, ca_signed, eventually, foreign_signed, raw_channel, raw_stream,
    stream_refusal,
};
use time::OffsetDateTime;

#[tokio::test]
async fn certificates_the_server_did_not_issue_are_refused() {
    let server = Server::start(ServerOptions::default()).await;
    let now = OffsetDateTime::now_utc();

    stream_refusal(&server, Some(&foreign_signed("intruder-1")), "intruder-1").await;
    stream_refusal(&server, None, "anonymous-1").await;
    let expired = ca_signed(
        &server,
        "expired-1",
        now - time::Duration::days(2),
        now - time::Duration::days(1),
    );
    stream_refusal(&server, Some(&expired), "expired-1").await;

    let log = server.log();
    for reason in [
        "client certificate is not issued by the Keel CA",
        "no client certificate",
        "client certificate has expired",
    ] {
        assert!(log.contains(reason), "server log lacks {reason:?}:\n{log}");
    }
    assert!(server.api().agents().await.is_empty(), "nothing may be registered");
}

#[tokio::test]
async fn agent_id_must_match_the_certificate() {
    let server = Server::start(ServerOptions::default()).await;
    let now = OffsetDateTime::now_utc();
    let pair = ca_signed(
        &server,
        "honest-1",
        now - time::Duration::minutes(1),
        now + time::Duration::hours(1),
    );
    let mut s = raw_stream(&server, Some(&pair)).await.expect("stream");
    s.tx.send(batch("victim-1", 1, 7, Vec::new())).await.unwrap();
    let status = s.rx.message().await.expect_err("mismatch must end the stream");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("does not match the client certificate"),
        "{status:?}"
    );
    assert!(server.log().contains("agent_id differs from the client certificate"));
    assert!(server.api().agents().await.is_empty(), "neither ID may be registered");
}

fn record(n: u8) -> EncodedRecord {
    EncodedRecord {
        data_type: 6100,
        timestamp: 1_700_000_000,
        data: bytes::Bytes::from(vec![n; 4]),
        ..Default::default()
    }
}

#[tokio::test]
async fn batches_are_acknowledged_and_resends_are_not_stored_twice() {
    let server = Server::start(ServerOptions::default()).await;
    let agent = Agent::enrolled(&server, "raw-1");
    let pair = agent_pair(&agent);
    let epoch = 0x5eed;
    let mut s = raw_stream(&server, Some(&pair)).await.unwrap();
    for _ in 0..2 {
        s.tx.send(batch("raw-1", 1, epoch, vec![record(1), record(2)]))
            .await
            .unwrap();
        let ack = s.rx.message().await.unwrap().unwrap().ack.expect("an ack");
        assert_eq!((ack.epoch, ack.seq), (epoch, 1));
    }
    // A batch without a seq (an Elkeid agent) is stored but never acknowledged.
    s.tx.send(batch("raw-1", 0, 0, vec![record(3)])).await.unwrap();
    s.tx.send(batch("raw-1", 2, epoch, vec![record(4)])).await.unwrap();
    let ack = s.rx.message().await.unwrap().unwrap().ack.expect("an ack");
    assert_eq!(ack.seq, 2, "the unnumbered batch got no ack of its own");

    // A new stream resending seq 2 is deduplicated across connections too.
    drop(s);
    let mut s = raw_stream(&server, Some(&pair)).await.unwrap();
    s.tx.send(batch("raw-1", 2, epoch, vec![record(4)])).await.unwrap();
    assert_eq!(s.rx.message().await.unwrap().unwrap().ack.unwrap().seq, 2);

    let payloads: Vec<String> = server
        .sink_lines()
        .into_iter()
        .filter(|l| l["data_type"] == 6100)
        .map(|l| l["data"].as_str().unwrap().to_owned())
        .collect();
    // base64 of [n; 4]
    assert_eq!(payloads, ["AQEBAQ==", "AgICAg==", "AwMDAw==", "BAQEBA=="]);
}

#[tokio::test]
async fn a_second_stream_of_the_same_agent_replaces_the_first() {
    let server = Server::start(ServerOptions::default()).await;
    let agent = Agent::enrolled(&server, "twice-1");
    let pair = agent_pair(&agent);
    let mut first = raw_stream(&server, Some(&pair)).await.unwrap();
    first.tx.send(batch("twice-1", 1, 1, vec![record(1)])).await.unwrap();
    assert!(first.rx.message().await.unwrap().unwrap().ack.is_some());
    let mut second = raw_stream(&server, Some(&pair)).await.unwrap();
    second.tx.send(batch("twice-1", 1, 2, vec![record(2)])).await.unwrap();
    assert!(second.rx.message().await.unwrap().unwrap().ack.is_some());
    let status = first.rx.message().await.expect_err("the first stream must be closed");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert_eq!(server.api().agent("twice-1").await.unwrap()["online"], true);
}

#[tokio::test]
async fn revocation_closes_the_open_stream_and_refuses_reconnects() {
    let server = Server::start(ServerOptions::default()).await;
    let api = server.api();
    let mut by_api = Agent::enrolled(&server, "revoke-api");
    let mut by_cli = Agent::enrolled(&server, "revoke-cli");
    by_api.start();
    by_cli.start();
    api.online("revoke-api").await;
    api.online("revoke-cli").await;

    let (status, body) = api
        .post("/api/v1/agents/revoke-api/revoke", &serde_json::json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    eventually("the revoked agent to go offline", || async {
        api.agent("revoke-api").await.filter(|a| a["online"] == false)
    })
    .await;

    // Revocation from another process (the CLI) reaches the running server too.
    server.cli(&["ca", "revoke", "--agent", "revoke-cli"]);
    eventually("the CLI-revoked agent to go offline", || async {
        api.agent("revoke-cli").await.filter(|a| a["online"] == false)
    })
    .await;

    // Both keep trying and keep being refused at the handshake.
    eventually("a refused reconnect in the server log", || async {
        let log = server.log();
        (log.matches("client certificate is revoked").count() >= 2).then_some(())
    })
    .await;
    assert_eq!(api.agent("revoke-api").await.unwrap()["online"], false);
    assert_eq!(api.agent("revoke-cli").await.unwrap()["online"], false);
}

/// Read as `PackagedData`, its field 1 (`records`) holds bytes that are no record.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbled {
    #[prost(bytes = "vec", tag = "1")]
    records: Vec<u8>,
}

#[tokio::test]
async fn a_message_the_server_cannot_take_ends_the_stream_with_the_reason() {
    let server = Server::start(ServerOptions::default()).await;
    let agent = Agent::enrolled(&server, "bad-msg-1");
    let pair = agent_pair(&agent);

    // Bytes that do not decode: INVALID_ARGUMENT, saying so.
    let mut grpc = tonic::client::Grpc::new(raw_channel(&server, Some(&pair)).await.unwrap());
    grpc.ready().await.unwrap();
    let garbled = tokio_stream::iter(vec![Garbled { records: vec![0xff; 8] }]);
    let mut rx = grpc
        .streaming(
            tonic::Request::new(garbled),
            tonic::codegen::http::uri::PathAndQuery::from_static("/grpc.Transfer/Transfer"),
            keel_proto::codec::LeanCodec::<Garbled, keel_proto::grpc::Command>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    let status = rx.message().await.expect_err("the stream is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");

    // A message over grpc.max_message_bytes (16 MiB): RESOURCE_EXHAUSTED.
    let mut s = raw_stream(&server, Some(&pair)).await.unwrap();
    let huge = EncodedRecord {
        data_type: 6100,
        timestamp: 1_700_000_000,
        data: bytes::Bytes::from(vec![7u8; 17 << 20]),
        ..Default::default()
    };
    s.tx.send(batch("bad-msg-1", 1, 1, vec![huge])).await.unwrap();
    let status = s.rx.message().await.expect_err("the stream is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");

    // Both are in the server's log, at warn, with the agent's identity.
    let refusals: Vec<String> = eventually("both refusals in the server's log", || async {
        let lines: Vec<String> = server
            .log()
            .lines()
            .filter(|l| l.contains("refused a message the stream cannot take"))
            .map(str::to_owned)
            .collect();
        (lines.len() == 2).then_some(lines)
    })
    .await;
    assert!(
        refusals.iter().all(|l| l.contains("WARN") && l.contains("bad-msg-1")),
        "{refusals:?}"
    );
    // The agent's own stream still works.
    let mut s = raw_stream(&server, Some(&pair)).await.unwrap();
    s.tx.send(batch("bad-msg-1", 1, 1, vec![record(1)])).await.unwrap();
    assert!(s.rx.message().await.unwrap().unwrap().ack.is_some());
}
