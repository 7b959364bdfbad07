//! Enrollment by key: a host that knows the key a key database holds for it gets
//! a certificate without an enrollment token, and the key never reaches the server.
//!
//! 1. The host asks for a challenge (`POST /enroll/challenge`): a one-time nonce.
//! 2. It sends a CSR, optionally its ID, and `keel_proto::keyproof` over the nonce
//!    and the CSR (`POST /enroll/key`).
//! 3. The server sends a 6001 key-proof task to the first configured provider that
//!    is online: an agent running the key-request plugin, which looks the key up
//!    (by the ID, else by the connection's source address) and checks the proof.
//!    A provider that fails or does not answer in time hands over to the next.
//! 4. With `verified = true` the server checks the source address against the
//!    record's `ip`, refuses a duplicate ID or name (unless `replace`), registers
//!    the agent under the record's ID and name, and issues its certificate.
//!
//! Every refusal says which of these steps refused, in the answer and in the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use keel_common::time::now_ms;
use keel_proto::data_type;
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tracing::{info, warn};

use crate::config::KeyEnrollmentConfig;
use crate::connections::{Outbound, TaskCommand};
use crate::pki::{self, IssuedCert};
use crate::state::{IssueError, ServerState};
use crate::store::{NewTask, StoreError};

/// The CSR subject CN of a host that does not know its ID yet.
pub const UNKNOWN_ID_CN: &str = "keel-key-enrollment";
/// The plugin that answers it.
pub const PLUGIN: &str = "key-request";
/// Longest accepted host name.
const MAX_HOSTNAME: usize = 255;

/// Body of `POST /enroll/key`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEnrollRequest {
    /// The nonce from `/enroll/challenge`, hex.
    pub nonce: String,
    /// The agent ID the key database knows the host by; empty: look it up by the
    /// connection's source address.
    #[serde(default)]
    pub id: String,
    /// The host's name, for the registry.
    #[serde(default)]
    pub hostname: String,
    /// PEM CSR; subject CN the ID, or `keel-key-enrollment` without one.
    pub csr: String,
    /// `keel_proto::keyproof` over the nonce and the CSR, hex.
    pub proof: String,
}

impl std::fmt::Debug for KeyEnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEnrollRequest")
            .field("id", &self.id)
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

/// A challenge.
#[derive(Debug, Serialize)]
pub struct Challenge {
    /// One-time nonce, hex.
    pub nonce: String,
    /// Seconds it stays valid.
    pub expires_in: u64,
}

/// What enrollment by key gave.
#[derive(Debug)]
pub struct KeyEnrolled {
    /// The ID from the key database.
    pub agent_id: String,
    /// The name from the key database.
    pub name: String,
    /// The certificate.
    pub issued: IssuedCert,
}

/// Why an enrollment by key was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Not turned on.
    #[error("enrollment by key is not enabled on this server (key_enrollment.enabled)")]
    Disabled,
    /// Too many at once.
    #[error("{0}; try again shortly")]
    Busy(String),
    /// The request itself is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// The nonce is not one this server issued, or was used, or expired.
    #[error("unknown, used or expired challenge; ask /enroll/challenge for a new one")]
    Challenge,
    /// No provider could be asked.
    #[error("no key provider online (configured: {0})")]
    NoProvider(String),
    /// The providers could not look the key up.
    #[error("key lookup failed: {0}")]
    Lookup(String),
    /// The proof does not match the key on record.
    #[error("key proof for agent {0} does not match the key on record (HMAC mismatch)")]
    Mismatch(String),
    /// The source address is not the record's.
    #[error("source address {peer} is outside {allowed} on record for agent {id}")]
    Address {
        /// The connection's address.
        peer: IpAddr,
        /// The record's `ip`.
        allowed: String,
        /// The agent.
        id: String,
    },
    /// The ID or the name is taken.
    #[error("{0}; set key_enrollment.replace to let a new host take its place")]
    Duplicate(String),
    /// Issuing failed.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// The registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Issues a one-time nonce; the store keeps only its SHA-256.
pub async fn challenge(state: &ServerState) -> Result<Challenge, Refusal> {
    let cfg = &state.config.key_enrollment;
    if !cfg.enabled {
        return Err(Refusal::Disabled);
    }
    let mut bytes = [0u8; keel_proto::keyproof::NONCE_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| Refusal::Busy("the system random source failed".into()))?;
    let nonce = hex::encode(bytes);
    let now = now_ms();
    let ttl = i64::try_from(cfg.challenge_ttl.as_millis()).unwrap_or(i64::MAX);
    let stored = state
        .store
        .challenge_add(&nonce_digest(&nonce), now.saturating_add(ttl), now, cfg.max_challenges)
        .await?;
    if !stored {
        return Err(Refusal::Busy(format!(
            "{} challenges outstanding (key_enrollment.max_challenges)",
            cfg.max_challenges
        )));
    }
    Ok(Challenge {
        nonce,
        expires_in: cfg.challenge_ttl.as_secs(),
    })
}

fn nonce_digest(nonce: &str) -> String {
    hex::encode(sha2::Sha256::digest(nonce.as_bytes()))
}

/// The most addresses an `X-Forwarded-For` may list.
pub const MAX_FORWARDED: usize = 32;

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The address an enrollment by key comes from. The connection's `peer`, unless
/// it is one of the `trusted` proxies: then the right-most address of
/// `forwarded` (every `X-Forwarded-For` value, comma-joined) that is not itself a
/// trusted proxy, since each proxy appends what it saw and only trusted ones can
/// be believed. A header from anyone else is ignored; a malformed one from a
/// trusted proxy is refused, naming the entry.
pub fn source_address(peer: IpAddr, forwarded: Option<&str>, trusted: &[IpNet]) -> Result<IpAddr, String> {
    let peer = unmapped(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let Some(forwarded) = forwarded.filter(|_| is_trusted(&peer)) else {
        return Ok(peer);
    };
    let entries: Vec<&str> = forwarded.split(',').map(str::trim).collect();
    if entries.len() > MAX_FORWARDED {
        return Err(format!(
            "X-Forwarded-For from trusted proxy {peer} lists {} addresses, more than {MAX_FORWARDED}",
            entries.len()
        ));
    }
    let mut chain = Vec::with_capacity(entries.len());
    for entry in entries {
        let ip = entry.parse::<IpAddr>().map_err(|_| {
            let shown: String = entry.chars().take(64).collect();
            format!("X-Forwarded-For from trusted proxy {peer} has {shown:?}, which is not an IP address")
        })?;
        chain.push(unmapped(ip));
    }
    // Every hop trusted: the left-most is the client.
    Ok(chain
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(chain.first())
        .copied()
        .unwrap_or(peer))
}

/// Whether `peer` is within the record's `ip`: an address, a network, or `any`.
fn address_allowed(allowed: &str, peer: IpAddr) -> Result<bool, String> {
    if allowed == "any" {
        return Ok(true);
    }
    let peer = unmapped(peer);
    if let Ok(net) = allowed.parse::<IpNet>() {
        return Ok(net.contains(&peer));
    }
    allowed
        .parse::<IpAddr>()
        .map(|a| a == peer)
        .map_err(|_| format!("the provider answered an invalid ip {allowed:?}"))
}

fn lookup_id_valid(id: &str) -> bool {
    (1..=8).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit())
}

fn name_valid(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks the request, asks the providers, and enrolls.
pub async fn enroll(state: &ServerState, req: &KeyEnrollRequest, peer: IpAddr) -> Result<KeyEnrolled, Refusal> {
    let cfg = &state.config.key_enrollment;
    if !cfg.enabled {
        return Err(Refusal::Disabled);
    }
    let _slot = state.key_enrollments.try_acquire().map_err(|_| {
        Refusal::Busy(format!(
            "{} key enrollments in progress (key_enrollment.max_pending)",
            cfg.max_pending
        ))
    })?;
    let checked = check_request(state, req).await?;
    let (id, name) = look_up(state, cfg, req, peer, &checked).await?;
    make_room(state, cfg, &id, &name).await?;
    let issued = register(state, req, &id, &name, &checked).await?;
    info!(%peer, agent_id = %id, %name, serial = %issued.serial, "agent enrolled by key");
    Ok(KeyEnrolled {
        agent_id: id,
        name,
        issued,
    })
}

/// Spends the nonce (any attempt does, good or bad) and checks the request's
/// fields and its CSR.
async fn check_request(state: &ServerState, req: &KeyEnrollRequest) -> Result<pki::CheckedCsr, Refusal> {
    if !keel_common::fingerprint::is_hex(&req.nonce, keel_proto::keyproof::NONCE_BYTES)
        || !state.store.challenge_spend(&nonce_digest(&req.nonce), now_ms()).await?
    {
        return Err(Refusal::Challenge);
    }
    if !req.id.is_empty() && !lookup_id_valid(&req.id) {
        return Err(Refusal::BadRequest(format!("invalid id {:?}: 1-8 digits", req.id)));
    }
    if req.hostname.len() > MAX_HOSTNAME {
        return Err(Refusal::BadRequest(format!(
            "hostname is longer than {MAX_HOSTNAME} bytes"
        )));
    }
    if !keel_common::fingerprint::is_hex(&req.proof, 32) {
        return Err(Refusal::BadRequest("proof must be 64 hex digits".into()));
    }
    let cn = if req.id.is_empty() { UNKNOWN_ID_CN } else { &req.id };
    pki::check_csr(&req.csr, cn, &state.config.pki.allowed_key_types).map_err(|e| Refusal::BadRequest(e.to_string()))
}

/// Asks the providers for the host's record (by its ID, else by its address)
/// and checks what they answered: a valid record, for the ID asked, with the
/// proof verified, for the connection's address. Returns the ID and name.
async fn look_up(
    state: &ServerState,
    cfg: &KeyEnrollmentConfig,
    req: &KeyEnrollRequest,
    peer: IpAddr,
    checked: &pki::CheckedCsr,
) -> Result<(String, String), Refusal> {
    let (by, value) = if req.id.is_empty() {
        ("ip", unmapped(peer).to_string())
    } else {
        ("id", req.id.clone())
    };
    let task = serde_json::json!({
        "by": by,
        "value": value,
        "nonce": req.nonce,
        "csr_sha256": hex::encode(checked.der_sha256),
        "hmac": req.proof,
    })
    .to_string();
    let record = ask_providers(state, cfg, &task, &format!("{by} {value}")).await?;

    let field = |k: &str| record.get(k).cloned().unwrap_or_default();
    let (id, name, ip) = (field("id"), field("name"), field("ip"));
    if !lookup_id_valid(&id) || !keel_common::ids::valid_agent_id(&id) || !name_valid(&name) {
        return Err(Refusal::Lookup(format!(
            "the provider answered an invalid record (id {id:?}, name {name:?})"
        )));
    }
    if !req.id.is_empty() && id != req.id {
        return Err(Refusal::Lookup(format!(
            "asked for agent {}, the provider answered for {id}",
            req.id
        )));
    }
    if field("verified") != "true" {
        return Err(Refusal::Mismatch(id));
    }
    if !address_allowed(&ip, peer).map_err(Refusal::Lookup)? {
        return Err(Refusal::Address { peer, allowed: ip, id });
    }
    Ok((id, name))
}

/// Refuses a duplicate ID or name, or with `replace` revokes, disconnects and
/// removes the other agents of the same name.
async fn make_room(state: &ServerState, cfg: &KeyEnrollmentConfig, id: &str, name: &str) -> Result<(), Refusal> {
    let existing_id = state.store.get_agent(id).await?.is_some();
    let same_name: Vec<String> = state
        .store
        .agents_named(name)
        .await?
        .into_iter()
        .filter(|other| *other != id)
        .collect();
    if !cfg.replace {
        if existing_id {
            return Err(Refusal::Duplicate(format!("agent {id} is already registered")));
        }
        if let Some(other) = same_name.first() {
            return Err(Refusal::Duplicate(format!(
                "the name {name} is already registered to agent {other}"
            )));
        }
    }
    for other in &same_name {
        let reason = format!("replaced by agent {id} enrolled by key under the name {name}");
        state.revoke_agent(other, &reason, None).await?;
        let _ = state
            .send(other, Outbound::Close(crate::connections::Closing::Revoked))
            .await;
        state.store.agent_delete(other).await?;
        warn!(agent_id = %other, replaced_by = %id, %name, "agent replaced by enrollment by key");
    }
    Ok(())
}

/// Issues the certificate, revokes the agent's earlier ones and records it as
/// enrolled by key.
async fn register(
    state: &ServerState,
    req: &KeyEnrollRequest,
    id: &str,
    name: &str,
    checked: &pki::CheckedCsr,
) -> Result<IssuedCert, Refusal> {
    let issued = state.issue_checked(id, checked, false).await?;
    let older = state
        .revoke_agent(id, "re-enrolled by key", Some(&issued.serial))
        .await?;
    if !older.is_empty() {
        warn!(agent_id = %id, revoked = older.len(), "enrollment by key revoked earlier certificates");
    }
    state
        .store
        .agent_key_enrolled(id, name, &req.hostname, now_ms())
        .await?;
    Ok(issued)
}

/// Sends the key-proof task to each online provider in turn until one answers
/// with a record.
async fn ask_providers(
    state: &ServerState,
    cfg: &KeyEnrollmentConfig,
    task: &str,
    what: &str,
) -> Result<HashMap<String, String>, Refusal> {
    let mut failures = Vec::new();
    let mut asked = 0;
    for provider in &cfg.providers {
        if !state.is_online(provider).await? {
            continue;
        }
        asked += 1;
        let token = uuid::Uuid::new_v4().to_string();
        let mut answers = state.cluster.wait(&token, provider).await;
        state
            .store
            .task_sent(
                &NewTask {
                    token: &token,
                    agent_id: provider,
                    data_type: data_type::KEY_PROOF,
                    object_name: PLUGIN,
                    data: task,
                    created_by: "enrollment by key",
                    timeout_ms: i64::try_from(cfg.provider_timeout.as_millis()).unwrap_or(i64::MAX),
                },
                now_ms(),
            )
            .await?;
        let cmd = TaskCommand {
            data_type: data_type::KEY_PROOF,
            object_name: PLUGIN.to_owned(),
            data: task.to_owned(),
            token: token.clone(),
        };
        let outcome = match state.send(provider, Outbound::Task(cmd)).await {
            Err(e) => Err(e.to_string()),
            Ok(()) => match tokio::time::timeout(cfg.provider_timeout, key_answer(&mut answers)).await {
                Ok(answer) => answer,
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(Duration::from_secs(cfg.provider_timeout.as_secs()))
                )),
            },
        };
        drop(answers);
        match outcome {
            Ok(fields) => return Ok(fields),
            Err(msg) => {
                warn!(%provider, lookup = what, reason = %msg, "key provider failed; trying the next");
                failures.push(format!("{provider}: {msg}"));
            }
        }
    }
    if asked == 0 {
        return Err(Refusal::NoProvider(cfg.providers.join(", ")));
    }
    Err(Refusal::Lookup(failures.join("; ")))
}

/// The provider's key-proof record, or why it failed: the message of a failed
/// 5100. Other answers (a successful 5100) are not the lookup's outcome.
async fn key_answer(answers: &mut crate::cluster::ReplyWait) -> Result<HashMap<String, String>, String> {
    while let Some(reply) = answers.recv().await {
        match reply.data_type {
            data_type::KEY_PROOF => return Ok(reply.fields),
            data_type::TASK_RESULT if reply.fields.get("status").map(String::as_str) == Some("failed") => {
                return Err(reply.fields.get("msg").cloned().unwrap_or_default());
            }
            _ => {}
        }
    }
    Err("the answer was lost".into())
}

/// How the HTTP layer answers a refusal.
pub fn status(r: &Refusal) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    match r {
        Refusal::Disabled => StatusCode::FORBIDDEN,
        Refusal::Busy(_) | Refusal::NoProvider(_) => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
        Refusal::Challenge => StatusCode::UNAUTHORIZED,
        Refusal::Lookup(_) | Refusal::Mismatch(_) | Refusal::Address { .. } => StatusCode::FORBIDDEN,
        Refusal::Duplicate(_) => StatusCode::CONFLICT,
        Refusal::Issue(IssueError::Csr(_)) => StatusCode::BAD_REQUEST,
        Refusal::Issue(_) | Refusal::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_the_peer_unless_a_trusted_proxy_forwarded_the_request() {
        let trusted: Vec<IpNet> = vec!["10.0.0.5/32".parse().unwrap(), "192.168.0.0/16".parse().unwrap()];
        let at = |peer: &str, xff: Option<&str>| {
            source_address(peer.parse().unwrap(), xff, &trusted).map(|ip| ip.to_string())
        };
        // Anyone else's header is ignored: a host cannot claim another's address.
        assert_eq!(at("172.16.1.1", Some("10.1.2.3")).unwrap(), "172.16.1.1");
        assert_eq!(at("172.16.1.1", None).unwrap(), "172.16.1.1");
        // A trusted proxy: the right-most hop it did not add itself.
        assert_eq!(at("10.0.0.5", Some("10.1.2.3")).unwrap(), "10.1.2.3");
        assert_eq!(at("::ffff:10.0.0.5", Some("::ffff:10.1.2.3")).unwrap(), "10.1.2.3");
        assert_eq!(at("10.0.0.5", Some("10.1.2.3, 192.168.4.4")).unwrap(), "10.1.2.3");
        // The client may have sent its own header: what a trusted hop saw wins.
        assert_eq!(at("10.0.0.5", Some("10.9.9.9, 10.1.2.3")).unwrap(), "10.1.2.3");
        // Every hop trusted: the left-most; no header: the proxy itself.
        assert_eq!(at("10.0.0.5", Some("192.168.1.1,192.168.2.2")).unwrap(), "192.168.1.1");
        assert_eq!(at("10.0.0.5", None).unwrap(), "10.0.0.5");
        // A malformed header from a trusted proxy is refused, naming the entry.
        let e = at("10.0.0.5", Some("10.1.2.3, unknown")).unwrap_err();
        assert!(e.contains("\"unknown\", which is not an IP address"), "{e}");
        assert!(at("10.0.0.5", Some("10.1.2.3:5555")).is_err(), "no ports");
        assert!(at("10.0.0.5", Some("")).is_err());
        let long = vec!["10.1.2.3"; MAX_FORWARDED + 1].join(",");
        let e = at("10.0.0.5", Some(&long)).unwrap_err();
        assert!(e.contains("33 addresses, more than 32"), "{e}");
        // Without trusted proxies the header never counts.
        assert_eq!(
            source_address("10.0.0.5".parse().unwrap(), Some("10.1.2.3"), &[]).unwrap(),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn addresses_match_the_record() {
        let peer: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(address_allowed("any", peer).unwrap());
        assert!(address_allowed("10.0.0.0/8", peer).unwrap());
        assert!(address_allowed("10.1.2.3", peer).unwrap());
        assert!(!address_allowed("10.1.2.4", peer).unwrap());
        assert!(!address_allowed("192.168.0.0/16", peer).unwrap());
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert!(
            address_allowed("10.1.2.0/24", mapped).unwrap(),
            "IPv4-mapped IPv6 is IPv4"
        );
        assert!(address_allowed("fd00::/8", "fd00::1".parse().unwrap()).unwrap());
        assert!(address_allowed("nonsense", peer).is_err());
    }
}
