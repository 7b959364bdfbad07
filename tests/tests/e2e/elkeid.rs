//! Elkeid's agent as it is: a raw HTTP/2 client that sends exactly what Elkeid's
//! agent sends (every message snappy-compressed in golang/snappy's framed
//! format, the compressed flag set, `grpc-encoding: snappy`, product
//! `elkeid-agent`, no batch numbers), with a Keel certificate.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use keel_proto::grpc::{Command, EncodedRecord, PackagedData};
use keel_tests::{Agent, Pair, Server, ServerOptions, agent_pair, eventually, test_plugin};
use prost::Message;
use serde_json::json;

/// One Transfer stream, as Elkeid's agent opens it.
struct ElkeidStream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// `grpc-encoding` of the answers.
    answer_encoding: Option<String>,
    buf: BytesMut,
    encoding: &'static str,
}

/// How the server ended a stream: grpc-status and grpc-message.
#[derive(Debug)]
struct Ended(String, String);

async fn open(server: &Server, pair: &Pair, encoding: &'static str) -> Result<ElkeidStream, Ended> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(server.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(pair.cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    // grpc-go lists its registered compressors; Elkeid registers snappy.
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://{}/grpc.Transfer/Transfer", server.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", encoding)
        .header("grpc-accept-encoding", "snappy")
        .header("user-agent", "grpc-go/1.56.3")
        .body(())
        .unwrap();
    let (response, send) = client.send_request(req, false).unwrap();
    let response = response.await.unwrap();
    let status = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|s| {
            Ended(
                s.to_str().unwrap().to_owned(),
                h.get("grpc-message")
                    .map(|m| m.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
            )
        })
    };
    if let Some(ended) = status(response.headers()) {
        return Err(ended);
    }
    let answer_encoding = response
        .headers()
        .get("grpc-encoding")
        .map(|v| v.to_str().unwrap().to_owned());
    Ok(ElkeidStream {
        send,
        recv: response.into_body(),
        answer_encoding,
        buf: BytesMut::new(),
        encoding,
    })
}

fn snappy(bytes: &[u8]) -> Vec<u8> {
    let mut w = snap::write::FrameEncoder::new(Vec::new());
    w.write_all(bytes).unwrap();
    w.into_inner().unwrap()
}

fn unsnappy(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    snap::read::FrameDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    w.write_all(bytes).unwrap();
    w.finish().unwrap()
}

/// A gRPC message with its prefix.
fn message(flag: u8, body: &[u8]) -> Bytes {
    let mut out = vec![flag];
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    Bytes::from(out)
}

impl ElkeidStream {
    fn send(&mut self, pd: &PackagedData) {
        let plain = pd.encode_to_vec();
        let body = match self.encoding {
            "snappy" => snappy(&plain),
            "gzip" => gzip(&plain),
            other => panic!("no encoder for {other}"),
        };
        self.send.send_data(message(1, &body), false).unwrap();
    }

    fn send_raw(&mut self, bytes: Bytes) {
        self.send.send_data(bytes, false).unwrap();
    }

    /// The next command, or how the stream ended.
    async fn next(&mut self) -> Result<Command, Ended> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    let flag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len);
                    let plain = match flag {
                        0 => body.to_vec(),
                        1 => {
                            assert_eq!(self.answer_encoding.as_deref(), Some("snappy"), "flagged, so marked");
                            unsnappy(&body)
                        }
                        f => panic!("compressed flag {f}"),
                    };
                    return Ok(Command::decode(plain.as_slice()).unwrap());
                }
            }
            match tokio::time::timeout(Duration::from_secs(20), self.recv.data()).await {
                Err(_) => panic!("no command within 20 s"),
                Ok(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buf.extend_from_slice(&data);
                }
                Ok(Some(Err(e))) => return Err(Ended("h2".into(), e.to_string())),
                Ok(None) => {
                    let t = self.recv.trailers().await.ok().flatten().unwrap_or_default();
                    let get = |k: &str| t.get(k).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
                    return Err(Ended(get("grpc-status"), get("grpc-message")));
                }
            }
        }
    }

    /// The next command `pick` accepts; the others are skipped.
    async fn next_with(&mut self, what: &str, pick: impl Fn(&Command) -> bool) -> Command {
        loop {
            let cmd = self
                .next()
                .await
                .unwrap_or_else(|e| panic!("waiting for {what}: stream ended {e:?}"));
            if pick(&cmd) {
                return cmd;
            }
        }
    }
}

fn record(data_type: i32, fields: &[(&str, &str)]) -> EncodedRecord {
    EncodedRecord {
        data_type,
        timestamp: 1_700_000_000,
        data: keel_proto::payload::encode(fields.iter().copied()),
        ..Default::default()
    }
}

/// A batch as Elkeid's agent sends it: no epoch, no seq.
fn elkeid_batch(agent_id: &str, records: Vec<EncodedRecord>) -> PackagedData {
    PackagedData {
        records,
        agent_id: agent_id.to_owned(),
        intranet_ipv4: vec!["10.0.0.7".into()],
        hostname: "elkeid-host".into(),
        version: "1.9.1.4".into(),
        product: "elkeid-agent".into(),
        ..Default::default()
    }
}

fn heartbeat() -> EncodedRecord {
    record(
        1000,
        &[
            ("kernel_version", "6.1.0"),
            ("arch", "x86_64"),
            ("platform", "debian"),
            ("state", "running"),
        ],
    )
}

#[tokio::test]
async fn an_elkeid_agent_connects_with_snappy_and_gets_its_plugins_tasks_and_syncs() {
    let server = Server::start(ServerOptions {
        release_key: true,
        ..Default::default()
    })
    .await;
    let api = server.api();
    let pair = agent_pair(&Agent::enrolled(&server, "elkeid-1"));
    let (status, body) = server.upload("collector", "1", "exec", test_plugin()).await;
    assert_eq!(status, 201, "{body}");
    let sha = body["sha256"].as_str().unwrap().to_owned();

    let mut s = open(&server, &pair, "snappy").await.unwrap();
    assert_eq!(
        s.answer_encoding.as_deref(),
        Some("snappy"),
        "answers in snappy when asked"
    );
    s.send(&elkeid_batch("elkeid-1", vec![heartbeat()]));
    let a = api.online("elkeid-1").await;
    assert_eq!(a["product"], "elkeid-agent");
    assert_eq!(a["version"], "1.9.1.4");
    assert_eq!(a["heartbeat"]["kernel_version"], "6.1.0");

    // A plugin set: Elkeid checks the executable against `signature` as a SHA-256.
    assert_eq!(
        server
            .put_plugins("elkeid-1", &json!([{"name": "collector", "version": "1"}]))
            .await
            .0,
        200
    );
    let cmd = s.next_with("the plugin set", |c| !c.configs.is_empty()).await;
    assert_eq!(cmd.configs[0].name, "collector");
    assert_eq!(cmd.configs[0].sha256, sha);
    assert_eq!(
        cmd.configs[0].signature, sha,
        "the executable's SHA-256, which Elkeid checks"
    );

    // A task for the agent itself goes to the name Elkeid's agent answers to.
    let (status, body) = api
        .post(
            "/api/v1/agents/elkeid-1/tasks",
            &json!({"data_type": 1051, "data": "{\"idc\":\"a\"}"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let cmd = s.next_with("the task", |c| c.task.is_some()).await;
    let task = cmd.task.unwrap();
    assert_eq!((task.object_name.as_str(), task.data_type), ("elkeid-agent", 1051));

    // After a reconnect the plugin set comes again, without being asked for.
    drop(s);
    let mut s = open(&server, &pair, "snappy").await.unwrap();
    s.send(&elkeid_batch("elkeid-1", vec![heartbeat()]));
    let cmd = s
        .next_with("the plugin set after a reconnect", |c| !c.configs.is_empty())
        .await;
    assert_eq!(cmd.configs.len(), 1);

    // sync-config: Elkeid sends no 5100 for config_token; its plugin heartbeats
    // showing the set end the subtask.
    let (status, job) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "sync-config", "target": {"agents": ["elkeid-1"]}}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap();
    let cmd = s.next_with("the sync-config", |c| !c.config_token.is_empty()).await;
    assert_eq!(cmd.configs.len(), 1);
    // A round that shows another version does not end it within the grace time.
    s.send(&elkeid_batch(
        "elkeid-1",
        vec![heartbeat(), record(1001, &[("name", "collector"), ("pversion", "0")])],
    ));
    // A second batch of the same round; once it shows, the server has judged the
    // first (a stream's batches are handled in order).
    s.send(&elkeid_batch(
        "elkeid-1",
        vec![record(1001, &[("name", "probe"), ("pversion", "1")])],
    ));
    eventually("the round's second batch", || async {
        let a = api.agent("elkeid-1").await?;
        a["plugins"]
            .as_array()?
            .iter()
            .any(|p| p["name"] == "probe")
            .then_some(())
    })
    .await;
    let (_, t) = api.get(&format!("/api/v1/tasks/{id}")).await;
    assert_eq!(t["state"], "running", "{t}");
    s.send(&elkeid_batch(
        "elkeid-1",
        vec![heartbeat(), record(1001, &[("name", "collector"), ("pversion", "1")])],
    ));
    let t = api.task_in_state(id, "succeeded", Duration::from_secs(20)).await;
    assert_eq!(t["counts"]["succeeded"], 1, "{t}");
    let (_, sub) = api.get(&format!("/api/v1/tasks/{id}")).await;
    assert!(
        sub.to_string().contains("plugin heartbeats show the desired set"),
        "{sub}"
    );
}

#[tokio::test]
async fn encodings_refused_and_bad_snappy_are_named() {
    let server = Server::start(ServerOptions::default()).await;
    let api = server.api();
    let pair = agent_pair(&Agent::enrolled(&server, "elkeid-2"));

    // gzip, which tonic decodes itself.
    let mut s = open(&server, &pair, "gzip").await.unwrap();
    s.send(&elkeid_batch("elkeid-2", vec![heartbeat()]));
    api.online("elkeid-2").await;
    drop(s);

    // An encoding nobody here decodes: refused, and logged with who asked.
    let ended = open(&server, &pair, "br").await.err().expect("br refused");
    assert_eq!(ended.0, "12", "{ended:?}");
    eventually("the refusal in the log", || async {
        let log = server.log();
        log.lines()
            .any(|l| l.contains("encoding the server does not decode") && l.contains("elkeid-2") && l.contains("br"))
            .then_some(())
    })
    .await;

    // Flagged as compressed but not snappy: INVALID_ARGUMENT, named.
    let mut s = open(&server, &pair, "snappy").await.unwrap();
    s.send_raw(message(1, b"this is not snappy"));
    let ended = s.next().await.expect_err("the stream ends");
    assert_eq!(ended.0, "3", "{ended:?}");
    assert!(
        ended.1.contains("does%20not%20decompress") || ended.1.contains("does not decompress"),
        "{ended:?}"
    );

    // A decompression bomb: over grpc.max_message_bytes once decompressed.
    let mut s = open(&server, &pair, "snappy").await.unwrap();
    s.send_raw(message(1, &snappy(&vec![0u8; 20 << 20])));
    let ended = s.next().await.expect_err("the stream ends");
    assert_eq!(ended.0, "8", "RESOURCE_EXHAUSTED: {ended:?}");
}
