//! `/api/v1/components…`: the component store; `/packages/{sha256}`: downloads;
//! `/api/v1/agents/{id}/plugins`: an agent's own plugin set.

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
use utoipa::{IntoParams, ToSchema};

use super::agents::json_body;
use super::{ApiError, ErrorBody, Principal};
use crate::components::{ComponentError, PackageMeta, Upload};
use crate::policy::DesiredPlugin;
use crate::state::{PushError, ServerState};
use crate::store::{PackageRow, Role};

/// Query of an upload.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Version, 1-64 characters of `[A-Za-z0-9._+-]`.
    version: String,
    /// `exec` or `tar.gz` for plugins; `deb` or `rpm` for keel-agent.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: String,
    /// `any` (default), `x86_64` or `aarch64`.
    #[serde(default = "any")]
    arch: String,
    /// Hex Ed25519 signature to check; without it the server signs.
    #[serde(default)]
    signature: Option<String>,
    /// Hex SHA-256 the upload must have.
    #[serde(default)]
    sha256: Option<String>,
}

fn any() -> String {
    "any".into()
}

/// A package as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
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
            ComponentError::Exists { .. } | ComponentError::InUse { .. } => ApiError::conflict(e.to_string()),
            ComponentError::Invalid(_) | ComponentError::Signature(_) | ComponentError::Content(_) => {
                ApiError::bad_request(e.to_string())
            }
            ComponentError::Store(e) => e.into(),
            ComponentError::Io(_) => ApiError::internal(e.to_string()),
        }
    }
}

/// Uploads a package of a component version; the raw package is the body, streamed
/// to disk while hashed and size-capped.
#[utoipa::path(post, path = "/components/{name}/versions", tag = "components", params(("name" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = PackageView), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody)))]
pub async fn upload(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<(StatusCode, Json<PackageView>), ApiError> {
    who.require(Role::Operator)?;
    let q = super::agents::query(query)?;
    let meta = PackageMeta {
        name,
        version: q.version,
        kind: q.kind,
        arch: q.arch,
        signature: q.signature,
        sha256: q.sha256,
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

/// Every package in the store.
#[utoipa::path(get, path = "/components", tag = "components", responses((status = 200, body = [PackageView])))]
pub async fn list(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
) -> Result<Json<Vec<PackageView>>, ApiError> {
    who.require(Role::Viewer)?;
    Ok(Json(
        state
            .store
            .packages(None)
            .await?
            .into_iter()
            .map(PackageView::from)
            .collect(),
    ))
}

/// The packages of one component.
#[utoipa::path(get, path = "/components/{name}", tag = "components", params(("name" = String, Path)),
    responses((status = 200, body = [PackageView])))]
pub async fn show(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Vec<PackageView>>, ApiError> {
    who.require(Role::Viewer)?;
    Ok(Json(
        state
            .store
            .packages(Some(&name))
            .await?
            .into_iter()
            .map(PackageView::from)
            .collect(),
    ))
}

/// Deletes a version (all its packages); refused while a policy uses it.
#[utoipa::path(delete, path = "/components/{name}/versions/{version}", tag = "components",
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn delete_version(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    who.require(Role::Operator)?;
    match crate::components::delete_version(&state, &name, &version).await? {
        0 => Err(ApiError::not_found(format!("no version {version} of {name}"))),
        _ => Ok(StatusCode::NO_CONTENT),
    }
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

/// One entry of an agent's own plugin set.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DesiredView {
    name: String,
    version: String,
    #[serde(default)]
    detail: String,
}

/// An agent's own plugin set.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginSet {
    agent_id: String,
    /// Whether the server manages this agent's plugins.
    managed: bool,
    plugins: Vec<DesiredView>,
    /// Whether the configuration went out to the agent now.
    sent: bool,
}

/// Largest `detail` accepted.
const MAX_DETAIL: usize = 64 << 10;

/// Replaces an agent's own plugin set (it takes precedence over policies) and sends
/// the agent its effective configuration at once if it is online.
#[utoipa::path(put, path = "/agents/{id}/plugins", tag = "agents", params(("id" = String, Path)), request_body = Vec<DesiredView>,
    responses((status = 200, body = PluginSet), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn put_plugins(
    State(state): State<Arc<ServerState>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Result<Json<Vec<DesiredView>>, JsonRejection>,
) -> Result<Json<PluginSet>, ApiError> {
    who.require(Role::Operator)?;
    let set = json_body(body)?;
    let mut seen = HashSet::new();
    for p in &set {
        if !keel_common::ids::valid_plugin_name(&p.name) {
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
    let agent = state
        .store
        .get_agent(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no agent {id}")))?;
    let entries = crate::policy::effective(&ServerState::facts(&agent), &state.policies(), Some(&desired));
    state.resolve(&id, &entries).await.map_err(|e| match e {
        PushError::NoPackage { .. } | PushError::NoPackageManager(_) => ApiError::bad_request(e.to_string()),
        other => ApiError::internal(other.to_string()),
    })?;
    state.store.set_desired(&id, &desired, &who.token_id, now_ms()).await?;
    let sent = match state.push_config(&id, None).await {
        Ok(sent) => sent,
        Err(e) => {
            tracing::warn!(agent_id = %id, error = %e, "plugin set stored but not sent; it goes out on the next connect");
            false
        }
    };
    tracing::info!(agent_id = %id, plugins = set.len(), sent, by = %who.token_id, "agent plugin set changed");
    Ok(Json(PluginSet {
        agent_id: id,
        managed: true,
        plugins: set,
        sent,
    }))
}

/// An agent's own plugin set.
#[utoipa::path(get, path = "/agents/{id}/plugins", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = PluginSet), (status = 404, body = ErrorBody)))]
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
