//! The TLS inventory, the server's audit engine: for each target, a 6100 job to
//! an agent's proxy plugin, which connects to the target (if the host's own allow
//! list lets it) and back to the tunnel endpoint; the server then makes a TLS
//! handshake with the target through that tunnel and records the certificate it
//! presents.
//!
//! The handshake trusts nothing: it records whatever the target sends, checks only
//! that the target holds the key of the certificate it shows (the handshake
//! signature), and never sends application data.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use keel_proto::data_type::PROXY_JOB;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use crate::certinfo;
use crate::connections::{Outbound, TaskCommand};
use crate::findings::{self, Trust};
use crate::state::ServerState;
use crate::store::{CertRow, NewTask};

/// The proxy plugin's name.
pub const PROXY: &str = "proxy";

/// One target's outcome.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScanResult {
    /// `host:port`.
    pub target: String,
    /// `ok` or `failed`.
    pub status: &'static str,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The certificate recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertRow>,
}

/// Checks a target: `host:port`, the host a DNS name or an IP address.
pub fn check_target(target: &str) -> Result<(), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("{target:?} is not host:port"))?;
    if !port.parse::<u16>().is_ok_and(|p| p > 0) {
        return Err(format!("{target:?}: {port:?} is not a port"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if target.len() > 255 || ServerName::try_from(host).is_err() {
        return Err(format!("{target:?}: {host:?} is not a host name or an IP address"));
    }
    Ok(())
}

/// Scans `targets` through `agent_id`'s proxy, `scan_concurrency` at a time.
pub async fn scan_all(state: &Arc<ServerState>, agent_id: &str, targets: &[String], by: &str) -> Vec<ScanResult> {
    futures::stream::iter(targets.iter().cloned())
        .map(|target| {
            let state = Arc::clone(state);
            let agent_id = agent_id.to_owned();
            let by = by.to_owned();
            async move {
                match scan(&state, &agent_id, &target, &by).await {
                    Ok(cert) => ScanResult {
                        target,
                        status: "ok",
                        error: None,
                        certificate: Some(cert),
                    },
                    Err(e) => ScanResult {
                        target,
                        status: "failed",
                        error: Some(e),
                        certificate: None,
                    },
                }
            }
        })
        .buffered(state.config.tunnel.scan_concurrency)
        .collect()
        .await
}

/// Scans one target through `agent_id`'s proxy and records its certificate.
pub async fn scan(state: &ServerState, agent_id: &str, target: &str, by: &str) -> Result<CertRow, String> {
    check_target(target)?;
    let job = uuid::Uuid::new_v4().to_string();
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no entropy: {e}"))?;
    let secret = hex::encode(secret);
    let wait = state.config.tunnel.wait;
    let tunnel = crate::tunnel::expect(state, &job, agent_id, &secret, target, wait).await?;
    let task_token = uuid::Uuid::new_v4().to_string();
    let answers = state.cluster.wait(&task_token, agent_id).await;
    let ids = JobIds {
        job: &job,
        secret: &secret,
        task_token: &task_token,
    };
    let outcome = run(state, agent_id, target, &ids, (tunnel, answers), by).await;
    crate::tunnel::forget(state, &job).await;
    let (cert, save) = outcome?;
    if save {
        state.store.save_certificate(&cert).await.map_err(|e| e.to_string())?;
    }
    Ok(cert)
}

/// A job's identifiers: its ID, its one-time secret and its task's token.
#[derive(Debug)]
struct JobIds<'a> {
    job: &'a str,
    secret: &'a str,
    task_token: &'a str,
}

/// Sends the job and waits for its tunnel (or its refusal, or its outcome from
/// the instance the tunnel reached). Returns the certificate and whether it is
/// still to be stored.
async fn run(
    state: &ServerState,
    agent_id: &str,
    target: &str,
    ids: &JobIds<'_>,
    (tunnel, mut answers): (crate::tunnel::TunnelWait, crate::cluster::ReplyWait),
    by: &str,
) -> Result<(CertRow, bool), String> {
    let JobIds {
        job,
        secret,
        task_token,
    } = *ids;
    let data = serde_json::json!({"job": job, "target": target, "token": secret}).to_string();
    // The stored copy leaves the one-time token out.
    let stored = serde_json::json!({"job": job, "target": target, "token": "<redacted>"}).to_string();
    state
        .store
        .task_sent(
            &NewTask {
                token: task_token,
                agent_id,
                data_type: PROXY_JOB,
                object_name: PROXY,
                data: &stored,
                created_by: by,
                timeout_ms: i64::try_from(state.config.tunnel.wait.as_millis()).unwrap_or(i64::MAX),
            },
            keel_common::time::now_ms(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let cmd = TaskCommand {
        data_type: PROXY_JOB,
        object_name: PROXY.to_owned(),
        data,
        token: task_token.to_owned(),
    };
    state
        .send(agent_id, Outbound::Task(cmd))
        .await
        .map_err(|e| e.to_string())?;
    let wait = state.config.tunnel.wait;
    let crate::tunnel::TunnelWait { local, remote } = tunnel;
    let remote_outcome = async move {
        match remote {
            Some(mut sub) => match sub.next().await {
                Some(msg) => serde_json::from_slice::<Result<CertRow, String>>(&msg.payload)
                    .unwrap_or_else(|e| Err(format!("undecodable outcome from another instance: {e}"))),
                None => Err("the cluster connection ended".to_owned()),
            },
            None => std::future::pending().await,
        }
    };
    // What the agent said of a job that succeeded, for the error if the outcome
    // from the tunnel's side then never comes.
    let mut agent_said = None;
    let refusal = async {
        while let Some(reply) = answers.recv().await {
            if reply.data_type != keel_proto::data_type::TASK_RESULT {
                continue;
            }
            let msg = reply.fields.get("msg").map_or("no message", String::as_str);
            // A job that succeeded ended after its tunnel closed; the outcome
            // comes from the tunnel's side, which may be another instance whose
            // word arrives after the agent's.
            if reply.fields.get("status").is_some_and(|s| s == "succeeded") {
                agent_said = Some(msg.to_owned());
                continue;
            }
            return format!("agent {agent_id}: {msg}");
        }
        std::future::pending().await
    };
    let stream = tokio::select! {
        t = local => t.map_err(|_| "the job was dropped".to_owned())?,
        outcome = remote_outcome => return outcome.map(|cert| (cert, false)),
        msg = refusal => return Err(msg),
        () = tokio::time::sleep(wait) => {
            return Err(match agent_said {
                Some(msg) => format!(
                    "agent {agent_id} reports \"{msg}\", but no outcome came from the instance its tunnel reached within {} s",
                    wait.as_secs()
                ),
                None => format!("agent {agent_id}'s proxy did not connect back within {} s", wait.as_secs()),
            });
        }
    };
    let chain = handshake(stream, target, wait).await?;
    describe(
        agent_id,
        target,
        &chain,
        keel_common::time::now_ms(),
        &state.inventory_trust,
    )
    .map(|cert| (cert, true))
}

/// Runs another instance's job whose tunnel landed here: the handshake, the
/// inventory row, and the outcome published to the instance waiting for it.
pub async fn run_for(state: &ServerState, job: &crate::store::TunnelJobRow, tunnel: crate::tunnel::Tunnel) {
    let wait = state.config.tunnel.wait;
    let outcome = match handshake(tunnel, &job.target, wait).await {
        Ok(chain) => describe(
            &job.agent_id,
            &job.target,
            &chain,
            keel_common::time::now_ms(),
            &state.inventory_trust,
        ),
        Err(e) => Err(e),
    };
    let outcome = match outcome {
        Ok(cert) => match state.store.save_certificate(&cert).await {
            Ok(()) => Ok(cert),
            Err(e) => Err(format!("registry: {e}")),
        },
        Err(e) => Err(e),
    };
    if let Some(nats) = state.cluster.nats()
        && let Ok(body) = serde_json::to_vec(&outcome)
        && let Err(e) = nats.publish(state.cluster.tunnel_subject(&job.job), body.into()).await
    {
        tracing::warn!(job = %job.job, error = %e, "cannot publish an audit job's outcome");
    }
}

/// A TLS handshake with `target` over `stream` that records the certificate chain
/// the target presents (and checks only the handshake signature), then closes.
pub async fn handshake<S>(stream: S, target: &str, limit: Duration) -> Result<Vec<CertificateDer<'static>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host_of(target).to_owned()).map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(recording_config()));
    let mut tls = tokio::time::timeout(limit, connector.connect(name, stream))
        .await
        .map_err(|_| format!("{target}: TLS handshake timed out"))?
        .map_err(|e| format!("{target}: TLS handshake failed: {e}"))?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
        .unwrap_or_default();
    let _ = tls.shutdown().await;
    Ok(chain)
}

/// The host of a `host:port` target, without an IPv6 address's brackets.
fn host_of(target: &str) -> &str {
    let (host, _) = target.rsplit_once(':').unwrap_or((target, ""));
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What a certificate chain says, as an inventory row: the leaf's fields in the
/// row, every certificate's in `chain` ([`crate::certinfo`]), and what an auditor
/// would flag ([`crate::findings`]).
pub fn describe(
    agent_id: &str,
    target: &str,
    chain: &[CertificateDer<'_>],
    now: i64,
    trust: &Trust,
) -> Result<CertRow, String> {
    if chain.is_empty() {
        return Err(format!("{target}: no certificate"));
    }
    let infos = chain
        .iter()
        .enumerate()
        .map(|(i, der)| certinfo::describe(der.as_ref()).map_err(|e| format!("{target}: certificate {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let findings = findings::assess(chain, &infos, host_of(target), now, trust);
    let leaf = &infos[0];
    // The row's names are those a hostname is matched against.
    let names = leaf
        .sans
        .iter()
        .filter_map(|n| n.strip_prefix("DNS:").or_else(|| n.strip_prefix("IP Address:")))
        .map(str::to_owned)
        .collect();
    Ok(CertRow {
        agent_id: agent_id.to_owned(),
        target: target.to_owned(),
        fingerprint: leaf.fingerprint.clone(),
        subject: leaf.subject.clone(),
        issuer: leaf.issuer.clone(),
        names,
        serial: leaf.serial.clone(),
        not_before: leaf.not_before,
        not_after: leaf.not_after,
        public_key: format!("{} {}", leaf.key_type, leaf.key_bits),
        signature: leaf.signature.clone(),
        chain_length: i64::try_from(chain.len()).unwrap_or(i64::MAX),
        self_signed: leaf.self_signed,
        first_seen: now,
        last_seen: now,
        findings,
        chain: infos,
    })
}

/// A client that records the certificate instead of judging it, but still checks
/// the handshake signature against it.
fn recording_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(keel_common::tls::AnyCertificate::new());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("the ring provider supports the default versions"))
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use sha2::{Digest, Sha256};

    use super::*;

    #[test]
    fn targets_are_host_and_port() {
        for good in ["db.internal:5432", "10.1.2.3:443", "[fd00::1]:443"] {
            check_target(good).unwrap();
        }
        for bad in ["db.internal", "db:0", "db:x", "a b:443", ":443", "db:65536"] {
            assert!(check_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_certificate_is_described() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["db.internal".into(), "10.1.2.3".into()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "db.internal");
        let cert = params.self_signed(&key).unwrap();
        let nobody = Trust::load(false, None).unwrap();
        let now = keel_common::time::now_ms();
        let row = describe("a1", "db.internal:443", &[cert.der().clone()], now, &nobody).unwrap();
        assert_eq!(row.subject, "CN=db.internal");
        assert!(row.self_signed);
        assert_eq!(row.names, ["db.internal", "10.1.2.3"]);
        assert_eq!(row.public_key, "EC 256");
        assert_eq!(row.signature, "ecdsa-with-SHA256");
        assert_eq!(row.fingerprint, hex::encode(Sha256::digest(cert.der().as_ref())));
        assert!(row.not_after > row.not_before);
        assert_eq!(
            row.findings.iter().map(|f| f.code.as_str()).collect::<Vec<_>>(),
            ["untrusted_root", "self_signed"]
        );
        assert_eq!(row.chain.len(), 1);
        assert_eq!(row.chain[0].sans, ["DNS:db.internal", "IP Address:10.1.2.3"]);
        assert!(
            describe("a1", "x:1", &[], now, &nobody)
                .unwrap_err()
                .contains("no certificate")
        );
    }
}
