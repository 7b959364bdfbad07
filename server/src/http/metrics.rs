//! `GET /metrics`, and the count of every HTTP request.
//!
//! The metrics are readable without a token from a loopback address (unless
//! `http.open_metrics_on_loopback` is false, or the request names a client it
//! was forwarded for), and otherwise with any valid API token: a viewer token
//! is enough.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keel_common::time::now_ms;
use tracing::warn;

use super::{ApiError, Peer};
use crate::metrics::{RegistryFigures, RolloutProgress, Route};
use crate::state::ServerState;
use crate::states::{JobState, SubtaskState};

/// Running and paused tasks whose progress is exported, the newest first.
const MAX_ROLLOUTS: i64 = 50;

/// Counts a request by its route pattern, method and status, and times it.
pub async fn count_requests(State(state): State<Arc<ServerState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(req.method()).to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    state.metrics.http_request(
        Route { route, method },
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// A request method as a label: the standard ones by name, any other as
/// `other`, so that requests cannot make series without bound.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Whether a scrape may go without a token: from a loopback address, when that
/// is allowed, and not forwarded by a proxy (a proxy on the same host would
/// otherwise open the metrics to whoever reaches the proxy).
fn open_scrape(state: &ServerState, peer: std::net::IpAddr, headers: &axum::http::HeaderMap) -> bool {
    state.config.http.open_metrics_on_loopback
        && peer.to_canonical().is_loopback()
        && !headers.contains_key("x-forwarded-for")
        && !headers.contains_key(header::FORWARDED)
}

/// `GET /metrics`: Prometheus (OpenMetrics) text.
pub async fn scrape(
    State(state): State<Arc<ServerState>>,
    peer: Peer,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    if !open_scrape(&state, peer.0.ip(), &headers) {
        let secret = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "metrics need a bearer token from outside loopback (Authorization: Bearer <token>)",
                )
            })?;
        if state.store.authenticate(secret).await?.is_none() {
            warn!(peer = %peer.0, "refused a scrape: unknown, expired or revoked token");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unknown, expired or revoked token",
            ));
        }
    }
    let figures = registry_figures(&state).await?;
    let text = state
        .metrics
        .scrape(state.connections.len(), figures)
        .await
        .map_err(|_| ApiError::internal("cannot encode the metrics"))?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// What the registry says now: agents, tasks and the progress of rollouts.
async fn registry_figures(state: &ServerState) -> Result<RegistryFigures, ApiError> {
    let (agents_known, agents_online) = state.store.agent_counts(now_ms()).await?;
    let tasks = state.store.jobs_by_state().await?;
    let mut rollouts = Vec::new();
    for s in [JobState::Running, JobState::Paused] {
        for job in state.store.jobs(Some(s), MAX_ROLLOUTS).await? {
            let c = state.store.job_counts(&job.id).await?;
            rollouts.push(RolloutProgress {
                id: job.id,
                counts: vec![
                    (SubtaskState::Pending.as_str(), c.pending),
                    (SubtaskState::Sent.as_str(), c.sent),
                    (SubtaskState::Succeeded.as_str(), c.succeeded),
                    (SubtaskState::Failed.as_str(), c.failed),
                    (SubtaskState::TimedOut.as_str(), c.timed_out),
                    (SubtaskState::Cancelled.as_str(), c.cancelled),
                ],
                failure_threshold: job.failure_threshold,
            });
        }
    }
    Ok(RegistryFigures {
        agents_known,
        agents_online,
        tasks,
        rollouts,
    })
}
