//! Enrollment: an agent trades an enrollment token and a CSR for its certificate.
//!
//! The private key never leaves the agent; only the CSR's public key is used.
//! Enrolling an ID again revokes that ID's earlier certificates, so exactly one key
//! speaks for an agent ID at a time.

use std::net::IpAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use keel_common::ids::valid_agent_id;
use keel_common::secret::Secret;
use keel_common::time::{now_ms, rfc3339_ms};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::agents::json_body;
use super::{ApiError, Peer};
use crate::keyenroll::{self, Challenge, KeyEnrollRequest};
use crate::state::{IssueError, ServerState};
use crate::store::TokenRefusal;

/// The header in which proxies name the addresses a request came through.
const FORWARDED_FOR: &str = "x-forwarded-for";

/// Body of `POST /enroll`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    token: Secret,
    agent_id: String,
    #[serde(default)]
    hostname: String,
    csr: String,
}

/// Answer to a successful enrollment.
#[derive(Debug, Serialize)]
pub struct EnrollResponse {
    agent_id: String,
    /// The key database's name for the agent (enrollment by key only).
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    certificate: String,
    ca: String,
    not_after: String,
}

/// `GET /enroll/ca.pem`: the CA certificate. An agent checks it against the
/// fingerprint it was given before trusting anything else from this server.
pub async fn ca_pem(State(state): State<Arc<ServerState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.ca.cert_pem().to_owned(),
    )
}

/// `POST /enroll`
pub async fn enroll(
    State(state): State<Arc<ServerState>>,
    peer: Peer,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let peer = peer.0.to_string();
    let req = json_body(body).inspect_err(|e| count(&state, "token", e.status))?;
    let target = format!("/enroll/{}", req.agent_id);
    let refuse = |status: StatusCode, reason: String| {
        warn!(%peer, agent_id = %req.agent_id, %reason, "enrollment refused");
        ApiError::new(status, reason)
    };
    let result = enroll_checked(&state, &req, &peer, refuse).await;
    let (status, outcome) = match &result {
        Ok(_) => (StatusCode::OK, "ok".to_owned()),
        Err(e) => (e.status, e.message.clone()),
    };
    count(&state, "token", status);
    super::audit_event(
        &state,
        &format!("enrollment from {peer}"),
        "POST /enroll",
        &target,
        status,
        &outcome,
    )
    .await;
    result
}

async fn enroll_checked(
    state: &Arc<ServerState>,
    req: &EnrollRequest,
    peer: &str,
    refuse: impl Fn(StatusCode, String) -> ApiError,
) -> Result<Json<EnrollResponse>, ApiError> {
    if !valid_agent_id(&req.agent_id) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("invalid agent_id {:?}", req.agent_id),
        ));
    }
    if req.hostname.len() > 255 {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "hostname is longer than 255 bytes".into(),
        ));
    }
    // Check the CSR before spending a token use on it.
    if let Err(e) = crate::pki::check_csr(&req.csr, &req.agent_id, &state.config.pki.allowed_key_types) {
        return Err(refuse(StatusCode::BAD_REQUEST, e.to_string()));
    }
    let token_id = match state.store.consume_enrollment_token(req.token.expose()).await? {
        Ok(id) => id,
        Err(r @ TokenRefusal::Unknown) => {
            return Err(refuse(StatusCode::UNAUTHORIZED, r.to_string()));
        }
        Err(r) => return Err(refuse(StatusCode::FORBIDDEN, r.to_string())),
    };
    let issued = match state.issue(&req.agent_id, &req.csr, false).await {
        Ok(i) => i,
        Err(IssueError::Store(e)) => return Err(e.into()),
        Err(e) => return Err(refuse(StatusCode::BAD_REQUEST, e.to_string())),
    };
    let reason = format!("re-enrolled with token {token_id}");
    let older = state.revoke_agent(&req.agent_id, &reason, Some(&issued.serial)).await?;
    if !older.is_empty() {
        warn!(agent_id = %req.agent_id, revoked = older.len(), "re-enrollment revoked earlier certificates");
    }
    state
        .store
        .agent_enrolled(&req.agent_id, &req.hostname, now_ms())
        .await?;
    info!(%peer, agent_id = %req.agent_id, token = %token_id, serial = %issued.serial, "agent enrolled");
    Ok(Json(EnrollResponse {
        agent_id: req.agent_id.clone(),
        name: String::new(),
        certificate: issued.pem,
        ca: state.ca.cert_pem().to_owned(),
        not_after: rfc3339_ms(issued.not_after_ms),
    }))
}

/// Counts an enrollment answered with `status` in `keel_enrollments`.
fn count(state: &ServerState, method: &'static str, status: StatusCode) {
    let outcome = crate::metrics::enrollment_outcome(status.as_u16());
    state
        .metrics
        .enrollments
        .get_or_create(&crate::metrics::Enrollment { method, outcome })
        .inc();
}

/// `POST /enroll/challenge`: a one-time nonce for enrollment by key.
pub async fn challenge(State(state): State<Arc<ServerState>>, peer: Peer) -> Result<Json<Challenge>, ApiError> {
    keyenroll::challenge(&state).await.map(Json).map_err(|r| {
        warn!(peer = %peer.0, reason = %r, "key enrollment challenge refused");
        ApiError::new(keyenroll::status(&r), r.to_string())
    })
}

/// Where an enrollment by key comes from: the peer, or what a trusted proxy's
/// `X-Forwarded-For` says (see [`keyenroll::source_address`]).
fn source(state: &ServerState, peer: &Peer, headers: &HeaderMap) -> Result<IpAddr, ApiError> {
    let mut values = Vec::new();
    for v in headers.get_all(FORWARDED_FOR) {
        let v = v
            .to_str()
            .map_err(|_| ApiError::bad_request("X-Forwarded-For is not ASCII text"))?;
        values.push(v);
    }
    let forwarded = (!values.is_empty()).then(|| values.join(","));
    let trusted = &state.config.key_enrollment.trusted_proxies;
    keyenroll::source_address(peer.0.ip(), forwarded.as_deref(), trusted).map_err(|e| {
        warn!(peer = %peer.0, reason = %e, "enrollment by key refused");
        ApiError::bad_request(e)
    })
}

/// `POST /enroll/key`: enrollment by key (see `keyenroll`).
pub async fn by_key(
    State(state): State<Arc<ServerState>>,
    peer: Peer,
    headers: HeaderMap,
    body: Result<Json<KeyEnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    let req = json_body(body).inspect_err(|e| count(&state, "key", e.status))?;
    let ip = source(&state, &peer, &headers).inspect_err(|e| count(&state, "key", e.status))?;
    let from = if ip == peer.0.ip() {
        peer.0.to_string()
    } else {
        format!("{ip} (via proxy {})", peer.0)
    };
    let asked = if req.id.is_empty() {
        format!("ip {ip}")
    } else {
        format!("id {}", req.id)
    };
    let result = keyenroll::enroll(&state, &req, ip).await;
    let (status, outcome, target) = match &result {
        Ok(e) => (StatusCode::OK, "ok".to_owned(), format!("/enroll/key/{}", e.agent_id)),
        Err(r) => {
            warn!(peer = %from, lookup = %asked, reason = %r, "enrollment by key refused");
            (keyenroll::status(r), r.to_string(), format!("/enroll/key/{asked}"))
        }
    };
    count(&state, "key", status);
    super::audit_event(
        &state,
        &format!("enrollment by key from {from}"),
        "POST /enroll/key",
        &target,
        status,
        &outcome,
    )
    .await;
    let e = result.map_err(|r| ApiError::new(status, r.to_string()))?;
    Ok(Json(EnrollResponse {
        agent_id: e.agent_id,
        name: e.name,
        certificate: e.issued.pem,
        ca: state.ca.cert_pem().to_owned(),
        not_after: rfc3339_ms(e.issued.not_after_ms),
    }))
}
