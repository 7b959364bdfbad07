//! `GET /api/v1/audit`: the audit log.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::{Extension, Json};
use keel_common::time::rfc3339_ms;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ErrorBody, Principal};
use crate::state::ServerState;
use crate::store::{AuditFilter, Role};

/// Filters of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// From this time, RFC 3339.
    since: Option<String>,
    /// Until this time, RFC 3339.
    until: Option<String>,
    /// Only this token ID (or `anonymous`).
    actor: Option<String>,
    /// Only targets containing this text.
    target: Option<String>,
    /// At most this many entries, newest first (default 1000).
    limit: Option<i64>,
}

/// One audit entry.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditView {
    at: String,
    actor: String,
    action: String,
    target: String,
    status: i64,
    outcome: String,
}

fn parse_time(key: &str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    v.as_ref()
        .map(|s| {
            OffsetDateTime::parse(s, &Rfc3339)
                .map(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX))
                .map_err(|e| ApiError::bad_request(format!("invalid {key} {s:?}: {e}; expected RFC 3339")))
        })
        .transpose()
}

/// Changes made through the API, newest first.
#[utoipa::path(get, path = "/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = [AuditView]), (status = 400, body = ErrorBody)))]
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditView>>, ApiError> {
    who.require(Role::Operator)?;
    let q = super::agents::query(q)?;
    let filter = AuditFilter {
        since: parse_time("since", &q.since)?,
        until: parse_time("until", &q.until)?,
        actor: q.actor,
        target: q.target,
        limit: q.limit.unwrap_or(1000),
    };
    let rows = state.store.audit_log(&filter).await?;
    Ok(Json(
        rows.into_iter()
            .map(|e| AuditView {
                at: rfc3339_ms(e.at),
                actor: e.actor,
                action: e.action,
                target: e.target,
                status: e.status,
                outcome: e.outcome,
            })
            .collect(),
    ))
}
