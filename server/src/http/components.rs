//! `/api/v1/components…`: the component store, `/packages/{sha256}`: downloads,
//! and `/api/v1/agents/{id}/plugins`: an agent's desired plugin set.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use keel_common::time::{now_ms, rfc3339_ms};
use serde::{Deserialize, Serialize};

use super::agents::json_body;
use super::{ApiError, Principal};
use crate::components::{ComponentError, PackageMeta, Upload};
use crate::state::{PushError, ServerState};
use crate::store::{DesiredPlugin, PackageRow, Role};

/// Query of an upload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    version: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "any")]
    arch: String,
    #[serde(default)]
    signature: Option<String>,
}

fn any() -> String {
    "any".into()
}

/// A package as the API shows it.
#[derive(Debug, Serialize)]
pub struct PackageView {
    name: String,
    version: String,
    arch: String,
    #[serde(rename = "type")]
    kind: String,
    sha256: String,
    signature: String,
    size: i64,
    created_at: String,
    created_by: String,
}

impl From<PackageRow> for PackageView {
    fn from(p: PackageRow) -> Self {
        Self {
            name: p.name,
            version: p.version,
            arch: p.arch,
            kind: p.kind,
            sha256: p.sha256,
            signature: p.signature,
            size: p.size,
            created_at: rfc3339_ms(p.created_at),
            created_by: p.created_by,
        }
    }
}

impl From<ComponentError> for ApiError {
    fn from(e: ComponentError) -> Self {
        match e {
            ComponentError::TooLarge(_) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            ComponentError::Exists { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            ComponentError::Invalid(_) | ComponentError::Signature(_) => ApiError::bad_request(e.to_string()),
            ComponentError::Store(e) => e.into(),
            ComponentError::Io(_) => ApiError::internal(e.to_string()),
        }
    }
}

/// `POST /api/v1/components/{name}/versions?version=V&type=exec|tar.gz[&arch=A][&signature=HEX]`:
/// the raw package is the body, streamed to disk while hashed and size-capped.
pub async fn upload(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<(StatusCode, Json<PackageView>), ApiError> {
    who.require(Role::Operator)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let meta = PackageMeta {
        name,
        version: q.version,
        kind: q.kind,
        arch: q.arch,
        signature: q.signature,
        by: who.token_id,
    };
    // Refuse bad metadata before reading a byte of the body.
    meta.validate()?;
    let mut up = Upload::start(&state)?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let written = match chunk {
            Ok(c) => up.write(&c),
            Err(e) => Err(ComponentError::Invalid(format!("upload interrupted: {e}"))),
        };
        if let Err(e) = written {
            up.abort();
            return Err(e.into());
        }
    }
    let row = up.finish(&state, &meta).await?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// `GET /api/v1/components` and `GET /api/v1/components/{name}`.
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    name: Option<Path<String>>,
) -> Result<Json<Vec<PackageView>>, ApiError> {
    who.require(Role::Viewer)?;
    let rows = state.store.packages(name.as_ref().map(|n| n.0.as_str())).await?;
    Ok(Json(rows.into_iter().map(PackageView::from).collect()))
}

/// `GET /packages/{sha256}`: a package by content. Packages are signed, so they
/// are served without a token; their addresses are their hashes.
pub async fn download(State(state): State<Arc<ServerState>>, Path(sha256): Path<String>) -> Result<Response, ApiError> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(ApiError::not_found("no such package"));
    }
    if !state.store.package_sha_known(&sha256).await? {
        return Err(ApiError::not_found("no such package"));
    }
    let path = crate::components::dir(&state).join(&sha256);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| ApiError::not_found("no such package"))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// One entry of `PUT /api/v1/agents/{id}/plugins`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredView {
    name: String,
    version: String,
    #[serde(default)]
    detail: String,
}

/// Answer of the plugin set calls.
#[derive(Debug, Serialize)]
pub struct PluginSet {
    agent_id: String,
    managed: bool,
    plugins: Vec<DesiredView>,
    sent: bool,
}

/// Largest `detail` accepted.
const MAX_DETAIL: usize = 64 << 10;

/// `PUT /api/v1/agents/{id}/plugins`: replaces the agent's desired plugin set and
/// sends it at once if the agent is online (and on every connect).
pub async fn put_plugins(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<Vec<DesiredView>>, JsonRejection>,
) -> Result<Json<PluginSet>, ApiError> {
    who.require(Role::Operator)?;
    let set = json_body(body)?;
    if state.store.get_agent(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no agent {id}")));
    }
    let mut seen = HashSet::new();
    for p in &set {
        if !crate::components::valid_name(&p.name) {
            return Err(ApiError::bad_request(format!(
                "invalid plugin name {:?}: must match ^[A-Za-z0-9_-]+$",
                p.name
            )));
        }
        if !seen.insert(p.name.clone()) {
            return Err(ApiError::bad_request(format!("plugin {} is listed twice", p.name)));
        }
        if p.detail.len() > MAX_DETAIL {
            return Err(ApiError::bad_request(format!(
                "detail of {} is larger than {MAX_DETAIL} bytes",
                p.name
            )));
        }
    }
    let desired: Vec<DesiredPlugin> = set
        .iter()
        .map(|p| DesiredPlugin {
            name: p.name.clone(),
            version: p.version.clone(),
            detail: p.detail.clone(),
        })
        .collect();
    // Refuse a set that names a version without a package, before storing anything.
    state.resolve_plugins(&id, &desired).await.map_err(|e| match e {
        PushError::NoPackage { .. } => ApiError::bad_request(e.to_string()),
        other => ApiError::internal(other.to_string()),
    })?;
    state.store.set_desired(&id, &desired, &who.token_id, now_ms()).await?;
    let sent = match state.push_plugins(&id).await {
        Ok(sent) => sent,
        Err(e) => {
            tracing::warn!(agent_id = %id, error = %e, "desired plugin set stored but not sent; it goes out on the next connect");
            false
        }
    };
    tracing::info!(agent_id = %id, plugins = set.len(), sent, by = %who.token_id, "desired plugin set changed");
    Ok(Json(PluginSet {
        agent_id: id,
        managed: true,
        plugins: set,
        sent,
    }))
}

/// `GET /api/v1/agents/{id}/plugins`: the desired set.
pub async fn get_plugins(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<PluginSet>, ApiError> {
    who.require(Role::Viewer)?;
    if state.store.get_agent(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("no agent {id}")));
    }
    let desired = state.store.desired(&id).await?;
    let managed = desired.is_some();
    let plugins = desired
        .unwrap_or_default()
        .into_iter()
        .map(|p| DesiredView {
            name: p.name,
            version: p.version,
            detail: p.detail,
        })
        .collect();
    Ok(Json(PluginSet {
        agent_id: id,
        managed,
        plugins,
        sent: false,
    }))
}
