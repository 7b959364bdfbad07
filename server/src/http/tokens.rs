//! `/api/v1/tokens…`: API tokens (with roles) and enrollment tokens. Admin only.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use keel_common::time::rfc3339_ms;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::agents::json_body;
use super::{ApiError, ErrorBody, Principal};
use crate::state::ServerState;
use crate::store::Role;

/// A token as listed; secrets are never stored, so never shown again.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    id: String,
    /// `admin`, `operator`, `viewer` or `enrollment`.
    kind: String,
    description: String,
    created_at: String,
    expires_at: Option<String>,
    /// Enrollment tokens: uses so far.
    uses: Option<i64>,
    /// Enrollment tokens: uses allowed.
    max_uses: Option<i64>,
    revoked: bool,
}

/// Body of `POST /api/v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// `admin`, `operator`, `viewer`, or `enrollment` for an enrollment token.
    role: String,
    /// Lifetime in seconds; API tokens without one do not expire.
    #[serde(default)]
    ttl_secs: Option<u64>,
    /// Enrollments allowed (enrollment tokens), default 1.
    #[serde(default)]
    uses: Option<u32>,
    #[serde(default)]
    description: String,
}

/// A token just made: the secret is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    id: String,
    secret: String,
    expires_at: Option<String>,
}

/// Every token.
#[utoipa::path(get, path = "/tokens", tag = "tokens", responses((status = 200, body = [TokenView])))]
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    who.require(Role::Admin)?;
    let rows = state.store.list_tokens().await?;
    Ok(Json(
        rows.into_iter()
            .map(|t| TokenView {
                id: t.id,
                kind: t.kind,
                description: t.description,
                created_at: rfc3339_ms(t.created_at),
                expires_at: t.expires_at.map(rfc3339_ms),
                uses: t.uses.map(|u| u.0),
                max_uses: t.uses.map(|u| u.1),
                revoked: t.revoked_at.is_some(),
            })
            .collect(),
    ))
}

/// Makes a token.
#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = NewToken,
    responses((status = 201, body = TokenCreated), (status = 400, body = ErrorBody)))]
pub async fn create(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    body: Result<Json<NewToken>, JsonRejection>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    who.require(Role::Admin)?;
    let n = json_body(body)?;
    if n.description.len() > 256 {
        return Err(ApiError::bad_request("description is longer than 256 bytes"));
    }
    let ttl = n.ttl_secs.map(Duration::from_secs);
    let made = if n.role == "enrollment" {
        let uses = n.uses.unwrap_or(1);
        if uses == 0 {
            return Err(ApiError::bad_request("uses must be at least 1"));
        }
        state
            .store
            .create_enrollment_token(
                ttl.unwrap_or(state.config.pki.enrollment_token_ttl),
                uses,
                &n.description,
            )
            .await?
    } else {
        let role = Role::parse(&n.role).ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid role {:?}: expected admin, operator, viewer or enrollment",
                n.role
            ))
        })?;
        if n.uses.is_some() {
            return Err(ApiError::bad_request("uses applies to enrollment tokens only"));
        }
        state.store.create_api_token(role, ttl, &n.description).await?
    };
    tracing::info!(token = %made.id, role = %n.role, by = %who.token_id, "token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            id: made.id,
            secret: made.secret.expose().to_owned(),
            expires_at: made.expires_at.map(rfc3339_ms),
        }),
    ))
}

/// Revokes a token.
#[utoipa::path(delete, path = "/tokens/{id}", tag = "tokens", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn revoke(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require(Role::Admin)?;
    if !state.store.revoke_token(&id).await? {
        return Err(ApiError::not_found(format!("no unrevoked token {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}
