//! The HTTP(S) listener: the console API under `/api/v1/` (bearer tokens with
//! roles, every change written to the audit log, an OpenAPI document at
//! `/api/v1/openapi.json`), enrollment under `/enroll`, package downloads, service
//! discovery and `/healthz`.

mod agents;
mod audit;
mod components;
mod console;
mod enroll;
mod files;
mod inventory;
mod metrics;
mod policies;
mod tasks;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, OriginalUri, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keel_common::time::now_ms;
use serde::Serialize;
use tracing::warn;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::ServerState;
use crate::store::{AuditEntry, Role, StoreError};

/// Largest request body accepted by the API and enrollment (package uploads have
/// their own cap).
pub const MAX_BODY_BYTES: usize = 256 << 10;

/// An API error: a status and a message that says what was wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

/// The message of an error response, for the audit log.
#[derive(Debug, Clone)]
struct ErrorMessage(String);

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

    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
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

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What was wrong.
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message.clone(),
            }),
        )
            .into_response();
        resp.extensions_mut().insert(ErrorMessage(self.message));
        resp
    }
}

/// The longest error text kept when an error that is not JSON yet (from axum's
/// extractors and router) is turned into JSON.
const MAX_ERROR_TEXT: usize = 4096;

/// Makes every error answer the JSON `{"error": …}`, including those axum gives
/// itself: a path that does not decode, an unknown route (404, empty), a method
/// a route does not take (405), a body over the limit. What the handlers answer
/// as JSON passes unchanged.
async fn json_errors(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let error = if text.is_empty() {
        format!("{reason}: {method} {path}")
    } else {
        text
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&ErrorBody { error: error.clone() }).unwrap_or_default();
    parts.extensions.insert(ErrorMessage(error));
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// A task's `timeout_secs` (default 600, 1 to 604800) in milliseconds.
fn timeout_ms(secs: Option<u64>) -> Result<i64, ApiError> {
    const DEFAULT: u64 = 600;
    const MAX: u64 = 7 * 86400;
    match secs.unwrap_or(DEFAULT) {
        s @ 1..=MAX => Ok(i64::try_from(s * 1000).unwrap_or(i64::MAX)),
        _ => Err(ApiError::bad_request(format!(
            "timeout_secs must be between 1 and {MAX}"
        ))),
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
            let who = Principal { token_id, role };
            req.extensions_mut().insert(who.clone());
            let mut resp = next.run(req).await;
            resp.extensions_mut().insert(who);
            resp
        }
        Ok(None) => {
            warn!(path = %req.uri().path(), "refused API call: unknown, expired or revoked token");
            ApiError::new(StatusCode::UNAUTHORIZED, "unknown, expired or revoked token").into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// Appends every change (a non-GET call) to the audit log: who, what, the target
/// and the outcome, including refusals.
async fn audit_changes(State(state): State<Arc<ServerState>>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let action = format!(
        "{} {}",
        req.method(),
        if route.is_empty() { req.uri().path() } else { &route }
    );
    // Inside the /api/v1 nest the URI has its prefix stripped; the original is whole.
    let target = req
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| req.uri().path().to_owned(), |u| u.path().to_owned());
    let resp = next.run(req).await;
    let actor = resp
        .extensions()
        .get::<Principal>()
        .map_or_else(|| "anonymous".to_owned(), |p| p.token_id.clone());
    let outcome = match resp.extensions().get::<ErrorMessage>() {
        Some(ErrorMessage(m)) => m.clone(),
        None if resp.status().is_success() => "ok".to_owned(),
        None => resp.status().to_string(),
    };
    let entry = AuditEntry {
        id: uuid::Uuid::new_v4().to_string(),
        at: now_ms(),
        actor,
        action,
        target,
        status: i64::from(resp.status().as_u16()),
        outcome,
    };
    if let Err(e) = state.store.audit(&entry).await {
        tracing::error!(error = %e, action = %entry.action, "cannot write the audit log");
    }
    resp
}

/// Writes an audit entry for a change made outside `/api/v1` (enrollment).
pub(crate) async fn audit_event(
    state: &ServerState,
    actor: &str,
    action: &str,
    target: &str,
    status: StatusCode,
    outcome: &str,
) {
    let entry = AuditEntry {
        id: uuid::Uuid::new_v4().to_string(),
        at: now_ms(),
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        status: i64::from(status.as_u16()),
        outcome: outcome.to_owned(),
    };
    if let Err(e) = state.store.audit(&entry).await {
        tracing::error!(error = %e, action, "cannot write the audit log");
    }
}

#[derive(Serialize)]
struct Health {
    /// `ok`, or `degraded` with the problems named.
    status: &'static str,
    instance: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    problems: Vec<String>,
}

/// Whether this instance can do its work: 200 `ok`, or 503 `degraded` naming
/// what is wrong (a sink that refuses records, an unreachable registry or NATS).
/// Agents stay connected while degraded; their records wait in their spools.
async fn healthz(State(state): State<Arc<ServerState>>) -> (StatusCode, Json<Health>) {
    let mut problems = Vec::new();
    if let Some(t) = state.sink.trouble() {
        problems.push(t);
    }
    if let Err(e) = state.store.ping().await {
        problems.push(format!("registry: {e}"));
    }
    if let Some(nats) = state.cluster.nats()
        && nats.connection_state() != async_nats::connection::State::Connected
    {
        problems.push("cluster: NATS is not connected; commands reach only this instance's agents".into());
    }
    let status = if problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let health = Health {
        status: if problems.is_empty() { "ok" } else { "degraded" },
        instance: state.cluster.instance.clone(),
        problems,
    };
    (status, Json(health))
}

#[derive(Serialize)]
struct Discovery {
    /// Where to dial, the least loaded instance first.
    grpc: Vec<String>,
    /// The live instances, the fewest agents first.
    instances: Vec<DiscoveredInstance>,
}

#[derive(Serialize)]
struct DiscoveredInstance {
    id: String,
    grpc: String,
    agents: i64,
}

/// Where agents should dial: the live instances' advertised gRPC addresses, those
/// holding the fewest agents first, so that agents spread out. An instance
/// without `grpc.advertise` listening on all addresses is named by the host this
/// request was sent to.
async fn discovery(
    State(state): State<Arc<ServerState>>,
    headers: axum::http::HeaderMap,
) -> Result<Json<Discovery>, ApiError> {
    let asked_host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
        .map(|a| a.host().to_owned());
    let name = |addr: &str| -> String {
        match (addr.parse::<SocketAddr>(), &asked_host) {
            (Ok(a), Some(host)) if a.ip().is_unspecified() => format!("{host}:{}", a.port()),
            _ => addr.to_owned(),
        }
    };
    let live = state.store.live_instances(now_ms()).await?;
    let mut grpc: Vec<String> = Vec::new();
    let mut instances = Vec::with_capacity(live.len());
    for i in live {
        let addr = name(&i.grpc);
        if !grpc.contains(&addr) {
            grpc.push(addr.clone());
        }
        instances.push(DiscoveredInstance {
            id: i.id,
            grpc: addr,
            agents: i.agents,
        });
    }
    for a in &state.config.grpc.advertise {
        if !grpc.contains(a) {
            grpc.push(a.clone());
        }
    }
    if grpc.is_empty() {
        grpc.push(name(&state.advertised_grpc()));
    }
    Ok(Json(Discovery { grpc, instances }))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Keel API", description = "The Keel console API. Every call needs `Authorization: Bearer <token>`."),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The `/api/v1` routes and their OpenAPI document.
fn api() -> (Router<Arc<ServerState>>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(agents::list))
        .routes(routes!(agents::show, agents::delete))
        .routes(routes!(agents::create_task))
        .routes(routes!(agents::revoke))
        .routes(routes!(agents::set_tags))
        .routes(routes!(agents::add_tag, agents::remove_tag))
        .routes(routes!(agents::config))
        .routes(routes!(agents::activity))
        .routes(routes!(components::get_plugins, components::put_plugins))
        .routes(routes!(components::list))
        .routes(routes!(components::show))
        .routes(routes!(components::delete_version))
        .routes(routes!(policies::list, policies::create))
        .routes(routes!(policies::update, policies::delete))
        .routes(routes!(tasks::list, tasks::create))
        .routes(routes!(tasks::show))
        .routes(routes!(tasks::pause))
        .routes(routes!(tasks::resume))
        .routes(routes!(tasks::cancel))
        .routes(routes!(tokens::list, tokens::create))
        .routes(routes!(tokens::revoke))
        .routes(routes!(audit::list))
        .routes(routes!(inventory::scan))
        .routes(routes!(inventory::certificates))
        .routes(routes!(inventory::findings))
        .routes(routes!(inventory::history))
        .routes(routes!(inventory::schedule, inventory::schedules))
        .routes(routes!(inventory::unschedule))
        .routes(routes!(inventory::discover))
        .routes(routes!(files::inventories))
        .routes(routes!(files::show_push))
        .routes(routes!(files::status))
        // Pushes carry every agent's sealed files, up to their own limit.
        .merge(
            OpenApiRouter::new()
                .routes(routes!(files::create_push))
                .routes(routes!(files::add_shares))
                .layer(axum::extract::DefaultBodyLimit::max(files::MAX_PUSH_REQUEST)),
        )
        // Uploads are streamed and capped by the component store itself.
        .merge(
            OpenApiRouter::new()
                .routes(routes!(components::upload))
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .split_for_parts();
    let mut prefixed = utoipa::openapi::path::Paths::new();
    for (path, mut item) in std::mem::take(&mut doc.paths.paths) {
        document_errors(&mut item);
        prefixed.paths.insert(format!("/api/v1{path}"), item);
    }
    doc.paths = prefixed;
    let components = doc.components.get_or_insert_with(Default::default);
    components
        .schemas
        .insert("ErrorBody".into(), <ErrorBody as utoipa::PartialSchema>::schema());
    (router, doc)
}

/// Every operation may answer any 4xx or 5xx with an [`ErrorBody`]: said once
/// here, for all of them, as the `4XX` and `5XX` ranges.
fn document_errors(item: &mut utoipa::openapi::PathItem) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    for op in [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
    {
        let responses = &mut op.responses.responses;
        responses
            .entry("4XX".into())
            .or_insert_with(|| error("The request was refused; `error` says why."));
        responses
            .entry("5XX".into())
            .or_insert_with(|| error("The server could not serve it now; `error` says why."));
    }
}

/// The whole HTTP application.
pub fn router(state: Arc<ServerState>) -> Router {
    let (api, doc) = api();
    let doc = Arc::new(doc);
    let api = api
        .route("/openapi.json", get(move || std::future::ready(Json((*doc).clone()))))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), authenticate))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), audit_changes));
    Router::new()
        .merge(console::routes())
        .nest("/api/v1", api)
        .route("/enroll", post(enroll::enroll))
        .route("/enroll/ca.pem", get(enroll::ca_pem))
        .route("/enroll/challenge", post(enroll::challenge))
        .route("/enroll/key", post(enroll::by_key))
        .route("/discovery", get(discovery))
        .route("/packages/{sha256}", get(components::download))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::scrape))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            metrics::count_requests,
        ))
        .with_state(state)
}

/// The peer address of a request, where known.
pub type Peer = axum::extract::ConnectInfo<SocketAddr>;
