//! The HTTP(S) listener: console API under `/api/v1/` (bearer tokens), enrollment
//! under `/enroll`, service discovery, and `/healthz`.

mod agents;
mod components;
mod enroll;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tracing::warn;

use crate::state::ServerState;
use crate::store::{Role, StoreError};

/// Largest request body accepted by the API and enrollment.
pub const MAX_BODY_BYTES: usize = 256 << 10;

/// An API error: a status and a message that says what was wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        tracing::error!(%message, "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "request failed in the registry");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "registry unavailable")
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: &self.message })).into_response()
    }
}

/// Who is calling, from a valid bearer token.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The API token's ID (never its secret).
    pub token_id: String,
    /// Its role.
    pub role: Role,
}

impl Principal {
    /// Refuses with 403 unless the role is at least `needed`.
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this needs the {needed} role; token {} has {}",
                    self.token_id, self.role
                ),
            ))
        }
    }
}

async fn authenticate(State(state): State<Arc<ServerState>>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(secret) = presented else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>)",
        )
        .into_response();
    };
    match state.store.authenticate(secret).await {
        Ok(Some((token_id, role))) => {
            req.extensions_mut().insert(Principal { token_id, role });
            next.run(req).await
        }
        Ok(None) => {
            warn!(path = %req.uri().path(), "refused API call: unknown, expired or revoked token");
            ApiError::new(StatusCode::UNAUTHORIZED, "unknown, expired or revoked token").into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok"
}

#[derive(Serialize)]
struct Discovery {
    grpc: Vec<String>,
}

/// Where agents should dial: the advertised addresses, or this host at the gRPC port.
async fn discovery(State(state): State<Arc<ServerState>>, headers: axum::http::HeaderMap) -> Json<Discovery> {
    let grpc = if state.config.grpc.advertise.is_empty() {
        let port = state.grpc_addr().port();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
            .map(|a| a.host().to_owned())
            .unwrap_or_else(|| state.grpc_addr().ip().to_string());
        vec![format!("{host}:{port}")]
    } else {
        state.config.grpc.advertise.clone()
    };
    Json(Discovery { grpc })
}

/// The whole HTTP application.
pub fn router(state: Arc<ServerState>) -> Router {
    let api = Router::new()
        .route("/agents", get(agents::list))
        .route("/agents/{id}", get(agents::show))
        .route("/agents/{id}/tasks", post(agents::create_task))
        .route("/agents/{id}/revoke", post(agents::revoke))
        .route(
            "/agents/{id}/plugins",
            get(components::get_plugins).put(components::put_plugins),
        )
        .route("/tasks/{token}", get(agents::show_task))
        .route("/components", get(components::list))
        .route("/components/{name}", get(components::list))
        .route(
            "/components/{name}/versions",
            post(components::upload).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .layer(middleware::from_fn_with_state(Arc::clone(&state), authenticate));
    Router::new()
        .nest("/api/v1", api)
        .route("/enroll", post(enroll::enroll))
        .route("/enroll/ca.pem", get(enroll::ca_pem))
        .route("/discovery", get(discovery))
        .route("/packages/{sha256}", get(components::download))
        .route("/healthz", get(healthz))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The peer address of a request, where known.
pub type Peer = axum::extract::ConnectInfo<SocketAddr>;
