//! Raw mTLS gRPC to a server's Transfer service: for what a well-behaved agent
//! would never send.

use std::time::Duration;

use keel_proto::grpc::transfer_client::TransferClient;
use keel_proto::grpc::{Command as GrpcCommand, PackagedData};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{Pair, Server};

/// A raw mTLS gRPC channel to `server`, with `identity` as the client (or none).
pub async fn raw_channel(server: &Server, identity: Option<&Pair>) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(server.ca_pem()));
    if let Some(p) = identity {
        tls = tls.identity(Identity::from_pem(&p.cert, &p.key));
    }
    Endpoint::from_shared(format!("https://{}", server.grpc))
        .expect("endpoint")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// An open Transfer stream: send `PackagedData`, read `Command`s.
#[derive(Debug)]
pub struct RawStream {
    /// Outbound half.
    pub tx: mpsc::Sender<PackagedData>,
    /// Inbound half.
    pub rx: tonic::Streaming<GrpcCommand>,
}

/// Opens a Transfer stream as `identity`, or returns why it failed.
pub async fn raw_stream(server: &Server, identity: Option<&Pair>) -> Result<RawStream, String> {
    let channel = raw_channel(server, identity)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let (tx, rx) = mpsc::channel(16);
    let response = TransferClient::new(channel)
        .transfer(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("transfer: {s:?}"))?;
    Ok(RawStream {
        tx,
        rx: response.into_inner(),
    })
}

/// A minimal valid batch for `agent_id`.
pub fn batch(agent_id: &str, seq: u64, epoch: u64, records: Vec<keel_proto::grpc::EncodedRecord>) -> PackagedData {
    PackagedData {
        records,
        agent_id: agent_id.to_owned(),
        hostname: "raw-client".into(),
        version: "test".into(),
        product: "keel-agent".into(),
        seq,
        epoch,
        ..Default::default()
    }
}

/// Tries to open a stream as `identity` and send one batch for `agent_id`; returns
/// how it was refused. Panics if the server accepts it.
pub async fn stream_refusal(server: &Server, identity: Option<&Pair>, agent_id: &str) -> String {
    let mut s = match raw_stream(server, identity).await {
        Err(e) => return e,
        Ok(s) => s,
    };
    // With TLS 1.3 the server checks the client certificate after the client
    // considers the handshake done, so the refusal may surface here instead.
    if s.tx.send(batch(agent_id, 1, 1, Vec::new())).await.is_err() {
        return "send failed".into();
    }
    match tokio::time::timeout(Duration::from_secs(10), s.rx.message()).await {
        Ok(Err(status)) => format!("{status:?}"),
        Ok(Ok(None)) => "stream closed".into(),
        Ok(Ok(Some(cmd))) => panic!("the server accepted the stream and answered {cmd:?}"),
        Err(_) => panic!("the server neither refused nor answered the stream"),
    }
}
