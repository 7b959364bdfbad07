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
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use crate::certinfo;
use crate::findings::{self, Trust};
use crate::ocsp;
use crate::state::{PluginTask, ServerState};
use crate::store::CertRow;
use crate::tlsprobe::{self, Answer, Legacy, Profile, ProtocolSeen};

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

/// Scans one target through `agent_id`'s proxy and records its certificate and
/// what it accepts: every [`Probe`] over its own tunnel, all at once.
pub async fn scan(state: &ServerState, agent_id: &str, target: &str, by: &str) -> Result<CertRow, String> {
    check_target(target)?;
    let seen = futures::future::join_all(Probe::ALL.map(|p| look_through(state, agent_id, target, p, by))).await;
    let now = keel_common::time::now_ms();
    let outcome = assemble(agent_id, target, &seen, now, &state.inventory_trust);
    if let Ok(cert) = &outcome {
        state.store.save_certificate(cert).await.map_err(|e| e.to_string())?;
    }
    // Every scan goes into the history, a failed one too.
    let codes: Vec<String> = outcome
        .iter()
        .flat_map(|c| c.findings.iter().map(|f| f.code.clone()))
        .collect();
    let recorded = match &outcome {
        Ok(cert) => Ok((cert.fingerprint.as_str(), codes.as_slice())),
        Err(e) => Err(e.as_str()),
    };
    match state.store.scan_recorded(agent_id, target, now, recorded).await {
        Ok(true) => tracing::info!(%agent_id, %target, "the target's certificate changed"),
        Ok(false) => {}
        Err(e) => tracing::warn!(%agent_id, %target, error = %e, "cannot record a scan in the history"),
    }
    outcome
}

/// One connection's worth of questions to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// A full handshake by rustls (TLS 1.3, else 1.2): what a modern client gets.
    Handshake,
    /// A ClientHello for exactly this version, with ordinary suites.
    Version(Legacy),
    /// A ClientHello up to TLS 1.2 offering only weak suites.
    WeakSuites,
}

impl Probe {
    /// What a scan asks, newest protocol first.
    pub const ALL: [Probe; 6] = [
        Probe::Handshake,
        Probe::Version(Legacy::Tls12),
        Probe::Version(Legacy::Tls11),
        Probe::Version(Legacy::Tls10),
        Probe::Version(Legacy::Ssl3),
        Probe::WeakSuites,
    ];
}

/// What one probe saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The version and suite the target chose; none when it refused.
    pub chose: Option<(String, String)>,
    /// How it refused.
    pub refused: Option<String>,
    /// The chain it sent (DER, leaf first).
    pub chain: Vec<Vec<u8>>,
    /// The OCSP response it stapled (DER).
    pub ocsp: Option<Vec<u8>>,
}

impl Seen {
    fn refused(why: String) -> Self {
        Seen {
            refused: Some(why),
            ..Seen::default()
        }
    }
}

/// Runs one probe through its own job and tunnel. An error is the job's (the
/// proxy refused, the tunnel never came); a target that refuses is a [`Seen`].
async fn look_through(
    state: &ServerState,
    agent_id: &str,
    target: &str,
    probe: Probe,
    by: &str,
) -> Result<Seen, String> {
    let _slot = state.tunnels.job_slot(agent_id).await;
    let job = uuid::Uuid::new_v4().to_string();
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no entropy: {e}"))?;
    let secret = hex::encode(secret);
    let wait = state.config.tunnel.wait;
    let expected = crate::tunnels::Expected {
        job: &job,
        agent_id,
        token: &secret,
        target,
        probe: &probe,
        wait,
    };
    let tunnel = crate::tunnels::expect(&state.store, &state.cluster, &state.tunnels, &expected).await?;
    let task_token = uuid::Uuid::new_v4().to_string();
    let answers = state.cluster.wait(&task_token, agent_id).await;
    let ids = JobIds {
        job: &job,
        secret: &secret,
        task_token: &task_token,
    };
    let outcome = run(state, agent_id, target, probe, &ids, (tunnel, answers), by).await;
    crate::tunnels::forget(&state.store, &state.tunnels, &job).await;
    outcome
}

/// A job's identifiers: its ID, its one-time secret and its task's token.
#[derive(Debug)]
struct JobIds<'a> {
    job: &'a str,
    secret: &'a str,
    task_token: &'a str,
}

/// Sends the job and waits for its tunnel (or its refusal, or what the instance
/// the tunnel reached saw).
async fn run(
    state: &ServerState,
    agent_id: &str,
    target: &str,
    probe: Probe,
    ids: &JobIds<'_>,
    (tunnel, mut answers): (crate::tunnels::TunnelWait, crate::cluster::ReplyWait),
    by: &str,
) -> Result<Seen, String> {
    let JobIds {
        job,
        secret,
        task_token,
    } = *ids;
    let data = serde_json::json!({"job": job, "target": target, "token": secret}).to_string();
    // The stored copy leaves the one-time token out, and says what was asked.
    let stored = serde_json::json!({"job": job, "target": target, "probe": probe, "token": "<redacted>"}).to_string();
    let task = PluginTask {
        object_name: PROXY,
        data_type: PROXY_JOB,
        token: task_token,
        sent: data,
        stored: &stored,
        timeout: state.config.tunnel.wait,
    };
    state.send_task(agent_id, task, by).await.map_err(|e| e.to_string())?;
    let wait = state.config.tunnel.wait;
    let crate::tunnels::TunnelWait { local, remote } = tunnel;
    let remote_outcome = async move {
        match remote {
            Some(mut sub) => match sub.next().await {
                Some(msg) => serde_json::from_slice::<Result<Seen, String>>(&msg.payload)
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
        while let Some(fields) = answers.task_result().await {
            let msg = fields.get("msg").map_or("no message", String::as_str);
            // A job that succeeded ended after its tunnel closed; the outcome
            // comes from the tunnel's side, which may be another instance whose
            // word arrives after the agent's.
            if fields.get("status").is_some_and(|s| s == "succeeded") {
                agent_said = Some(msg.to_owned());
                continue;
            }
            return format!("agent {agent_id}: {msg}");
        }
        std::future::pending().await
    };
    let came = tokio::select! {
        t = local => Ok(t.map_err(|_| "the job was dropped".to_owned())?),
        outcome = remote_outcome => Err(outcome),
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
    let outcome = match came {
        Ok(stream) => look(probe, stream, target, wait).await,
        Err(outcome) => outcome,
    };
    if agent_said.is_none() {
        // The proxy frees its slot for the job only once its side of the tunnel
        // has closed too: holding this instance's slot until the agent's result
        // keeps the next job from finding the proxy full (`busy`).
        let _ = tokio::time::timeout(JOB_END_WAIT, answers.task_result()).await;
    }
    outcome
}

/// How long a probe's job slot is held after its outcome, waiting for the
/// agent's word that the job ended.
const JOB_END_WAIT: Duration = Duration::from_secs(2);

/// Runs another instance's probe whose tunnel landed here, and publishes what it
/// saw to the instance waiting for it.
pub async fn run_for(state: &ServerState, job: &crate::store::TunnelJobRow, tunnel: crate::tunnels::Tunnel) {
    let outcome = match serde_json::from_str::<Probe>(&job.probe) {
        Ok(probe) => look(probe, tunnel, &job.target, state.config.tunnel.wait).await,
        Err(e) => Err(format!("unknown probe {:?}: {e}", job.probe)),
    };
    if let Some(nats) = state.cluster.nats()
        && let Ok(body) = serde_json::to_vec(&outcome)
        && let Err(e) = nats.publish(state.cluster.tunnel_subject(&job.job), body.into()).await
    {
        tracing::warn!(job = %job.job, error = %e, "cannot publish an audit job's outcome");
    }
}

/// Asks `target` one probe's questions over `stream`, within `limit`.
pub async fn look<S>(probe: Probe, mut stream: S, target: &str, limit: Duration) -> Result<Seen, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let host = host_of(target);
    // SNI carries names, never addresses.
    let sni = host.parse::<std::net::IpAddr>().is_err().then_some(host);
    let asked = async {
        match probe {
            Probe::Handshake => Ok(handshake(stream, target).await),
            // What the target sent that is not TLS is its answer too.
            Probe::Version(v) => Ok(tlsprobe::probe(&mut stream, v, tlsprobe::ORDINARY, sni, true)
                .await
                .map_or_else(Seen::refused, seen)),
            Probe::WeakSuites => Ok(tlsprobe::probe(&mut stream, Legacy::Tls12, tlsprobe::WEAK, sni, false)
                .await
                .map_or_else(Seen::refused, seen)),
        }
    };
    tokio::time::timeout(limit, asked)
        .await
        .map_err(|_| format!("{target}: no answer within {} s", limit.as_secs()))?
}

fn seen(answer: Answer) -> Seen {
    match answer {
        Answer::Accepted(h) => Seen {
            chose: Some((version_name(h.version), tlsprobe::suite_name(h.suite))),
            refused: None,
            chain: h.chain,
            ocsp: h.ocsp,
        },
        Answer::Refused(why) => Seen::refused(why),
    }
}

fn version_name(v: u16) -> String {
    Legacy::ALL
        .iter()
        .find(|l| l.wire() == v)
        .map_or_else(|| format!("0x{v:04X}"), |l| l.name().to_owned())
}

/// A TLS handshake with `target` over `stream` that records what the target
/// chose, its chain and its staple (and checks only the handshake signature),
/// then closes. A failed handshake is what the target refused.
pub async fn handshake<S>(stream: S, target: &str) -> Seen
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let name = match ServerName::try_from(host_of(target).to_owned()) {
        Ok(n) => n,
        Err(e) => return Seen::refused(e.to_string()),
    };
    let (config, staple) = recording_config();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = match connector.connect(name, stream).await {
        Ok(tls) => tls,
        Err(e) => return Seen::refused(format!("TLS handshake failed: {e}")),
    };
    let conn = tls.get_ref().1;
    let chose = conn
        .protocol_version()
        .zip(conn.negotiated_cipher_suite())
        .map(|(v, s)| {
            let version = match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
                other => version_name(u16::from(other)),
            };
            (version, tlsprobe::suite_name(u16::from(s.suite())))
        });
    let chain = conn
        .peer_certificates()
        .map(|c| c.iter().map(|d| d.as_ref().to_vec()).collect())
        .unwrap_or_default();
    let _ = tls.shutdown().await;
    Seen {
        chose,
        refused: None,
        chain,
        ocsp: staple.take(),
    }
}

/// Puts a scan's probes together: the chain a modern client gets (else the one
/// the newest accepted version sent), what each version was answered, the weak
/// suite taken, the staple; the row, with its findings.
pub fn assemble(
    agent_id: &str,
    target: &str,
    seen: &[Result<Seen, String>],
    now: i64,
    trust: &Trust,
) -> Result<CertRow, String> {
    let by = |p: Probe| {
        Probe::ALL
            .iter()
            .position(|q| *q == p)
            .and_then(|i| seen.get(i))
            .and_then(|r| r.as_ref().ok())
    };
    let handshake = by(Probe::Handshake);
    let modern = handshake.and_then(|s| s.chose.as_ref()).map(|(v, _)| v.as_str());
    let mut protocols = Vec::new();
    for v in Legacy::ALL {
        let got = by(Probe::Version(v));
        let chose = got
            .and_then(|s| s.chose.clone())
            .or_else(|| handshake.and_then(|s| s.chose.clone()).filter(|(hv, _)| hv == v.name()));
        protocols.push(ProtocolSeen {
            version: v.name().to_owned(),
            accepted: chose.is_some(),
            // TLS 1.2 is also asked by the handshake.
            probed: got.is_some() || (v == Legacy::Tls12 && handshake.is_some()),
            suite: chose.map(|(_, s)| s),
            refused: got.and_then(|s| s.refused.clone()),
        });
    }
    protocols.push(ProtocolSeen {
        version: "TLSv1.3".to_owned(),
        accepted: modern == Some("TLSv1.3"),
        probed: handshake.is_some(),
        suite: handshake
            .and_then(|s| s.chose.clone())
            .filter(|(v, _)| v == "TLSv1.3")
            .map(|(_, s)| s),
        refused: match handshake {
            Some(s) if modern != Some("TLSv1.3") => s.refused.clone().or_else(|| modern.map(|v| format!("chose {v}"))),
            _ => None,
        },
    });
    let weak = by(Probe::WeakSuites).and_then(|s| s.chose.clone());
    // Probes that could not run (the proxy was busy, the tunnel never came):
    // what they would have asked is unknown, not refused.
    let probe_errors: Vec<String> = Probe::ALL
        .iter()
        .zip(seen)
        .filter_map(|(p, r)| r.as_ref().err().map(|e| format!("{}: {e}", probe_name(*p))))
        .collect();
    if !probe_errors.is_empty() {
        tracing::warn!(%agent_id, %target, errors = ?probe_errors, "probes of a scan could not run");
    }
    // The chain: what a modern client is sent, else the newest version's
    // (`Probe::ALL` is in that order).
    let Some(source) = Probe::ALL.iter().filter_map(|p| by(*p)).find(|s| !s.chain.is_empty()) else {
        let why: Vec<String> = Probe::ALL
            .iter()
            .zip(seen)
            .filter_map(|(p, r)| match r {
                Err(e) => Some(format!("{}: {e}", probe_name(*p))),
                Ok(s) => s.refused.as_ref().map(|w| format!("{}: {w}", probe_name(*p))),
            })
            .collect();
        return Err(format!("{target}: no certificate ({})", why.join("; ")));
    };
    let ocsp = Probe::ALL
        .iter()
        .filter_map(|p| by(*p))
        .find_map(|s| s.ocsp.as_deref())
        .map(|der| ocsp::read(der).unwrap_or_else(|e| ocsp::Staple::unreadable(&e)));
    let profile = Profile {
        protocols,
        weak_suite: weak.map(|(v, s)| format!("{s} ({v})")),
        ocsp,
        probe_errors,
    };
    let chain: Vec<CertificateDer<'_>> = source
        .chain
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    describe(agent_id, target, &chain, profile, now, trust)
}

fn probe_name(p: Probe) -> String {
    match p {
        Probe::Handshake => "handshake".to_owned(),
        Probe::Version(v) => v.name().to_owned(),
        Probe::WeakSuites => "weak suites".to_owned(),
    }
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
    tls: Profile,
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
    let mut findings = findings::assess(chain, &infos, host_of(target), now, trust);
    findings.extend(findings::of_profile(&tls, now));
    findings::order(&mut findings);
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
        tls,
    })
}

/// A client that records the certificate instead of judging it, but still checks
/// the handshake signature against it; and where the staple it is sent will be.
fn recording_config() -> (rustls::ClientConfig, Arc<Recorder>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let recorder = Arc::new(Recorder::default());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| unreachable!("the ring provider supports the default versions"))
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&recorder) as Arc<dyn rustls::client::danger::ServerCertVerifier>)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (config, recorder)
}

/// Accepts any certificate (checking the handshake signature) and keeps the OCSP
/// response stapled to it.
#[derive(Debug, Default)]
struct Recorder {
    any: keel_common::tls::AnyCertificate,
    staple: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Recorder {
    fn take(&self) -> Option<Vec<u8>> {
        self.staple
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

impl rustls::client::danger::ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if !ocsp_response.is_empty() {
            *self.staple.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ocsp_response.to_vec());
        }
        self.any
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.any.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.any.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.any.supported_verify_schemes()
    }
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
        let row = describe(
            "a1",
            "db.internal:443",
            &[cert.der().clone()],
            Profile::default(),
            now,
            &nobody,
        )
        .unwrap();
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
            describe("a1", "x:1", &[], Profile::default(), now, &nobody)
                .unwrap_err()
                .contains("no certificate")
        );
    }

    #[test]
    fn a_probe_that_could_not_run_is_unknown_not_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.internal".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let tls10 = Seen {
            chose: Some(("TLSv1.0".into(), "TLS_RSA_WITH_AES_128_CBC_SHA".into())),
            chain: vec![cert.der().to_vec()],
            ..Seen::default()
        };
        let refused = || Ok(Seen::refused("protocol_version".into()));
        // In `Probe::ALL`'s order: the handshake and the TLS 1.2 probe could not run.
        let seen = [
            Err("busy: 8 jobs are running (max_jobs)".to_owned()),
            Err("busy: 8 jobs are running (max_jobs)".to_owned()),
            refused(),
            Ok(tls10),
            refused(),
            refused(),
        ];
        let nobody = Trust::load(false, None).unwrap();
        let row = assemble("a1", "db.internal:443", &seen, keel_common::time::now_ms(), &nobody).unwrap();
        assert_eq!(row.tls.probe_errors.len(), 2, "{:?}", row.tls);
        assert!(row.tls.probe_errors[0].starts_with("handshake: busy"), "{:?}", row.tls);
        let by = |v: &str| row.tls.protocols.iter().find(|p| p.version == v).unwrap();
        assert!(!by("TLSv1.2").probed && !by("TLSv1.3").probed);
        assert!(by("TLSv1.1").probed && !by("TLSv1.1").accepted);
        assert!(by("TLSv1.0").accepted);
        let codes: Vec<&str> = row.findings.iter().map(|f| f.code.as_str()).collect();
        assert!(codes.contains(&"tls10_enabled"), "{codes:?}");
        assert!(
            !codes.contains(&"no_current_protocol"),
            "not asked is not refused: {codes:?}"
        );
    }
}
