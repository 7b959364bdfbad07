//! The component store: signed plugin (and later agent) packages, kept by content
//! under `<data_dir>/packages/<sha256>` and listed in the registry.

use std::io::Write;
use std::path::{Path, PathBuf};

use keel_common::ids::valid_plugin_name;
use keel_common::time::now_ms;
use sha2::{Digest, Sha256};

use crate::state::ServerState;
use crate::store::{PackageRow, StoreError};

/// Why a package was refused.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    /// Bad name, version, type or arch.
    #[error("{0}")]
    Invalid(String),
    /// Over the size cap.
    #[error("package larger than {0} bytes")]
    TooLarge(u64),
    /// The signature is refused.
    #[error(transparent)]
    Signature(#[from] crate::release::SignatureError),
    /// The version is used by a policy and may not change.
    #[error("{name} {version} is used by policy {policies}; upload a new version instead")]
    InUse {
        /// Component.
        name: String,
        /// Version.
        version: String,
        /// The policies using it.
        policies: String,
    },
    /// The bytes are not what the type says, or not what the caller said.
    #[error("{0}")]
    Content(String),
    /// That package exists already.
    #[error("{name} {version} already has a {kind} package for {arch}")]
    Exists {
        /// Component.
        name: String,
        /// Version.
        version: String,
        /// Type.
        kind: String,
        /// Architecture.
        arch: String,
    },
    /// Local storage failed.
    #[error("package store: {0}")]
    Io(#[from] std::io::Error),
    /// The registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a package is.
#[derive(Debug, Clone)]
pub struct PackageMeta {
    /// Component name.
    pub name: String,
    /// Version.
    pub version: String,
    /// `exec` or `tar.gz`.
    pub kind: String,
    /// `any`, `x86_64` or `aarch64`.
    pub arch: String,
    /// A signature to check instead of signing.
    pub signature: Option<String>,
    /// A SHA-256 the upload must have, if the caller knows it.
    pub sha256: Option<String>,
    /// Token ID of the uploader.
    pub by: String,
}

fn valid_version(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}

impl PackageMeta {
    /// Checks the fields, naming the one at fault.
    pub fn validate(&self) -> Result<(), ComponentError> {
        let bad = |m: String| Err(ComponentError::Invalid(m));
        if !valid_plugin_name(&self.name) {
            return bad(format!(
                "invalid component name {:?}: must match ^[A-Za-z0-9_-]+$",
                self.name
            ));
        }
        if !valid_version(&self.version) {
            return bad(format!(
                "invalid version {:?}: 1-64 characters of [A-Za-z0-9._+-]",
                self.version
            ));
        }
        let kinds: &[&str] = if self.name == keel_proto::product::KEEL_AGENT {
            &["deb", "rpm"]
        } else {
            &["exec", "tar.gz"]
        };
        if !kinds.contains(&self.kind.as_str()) {
            return bad(format!(
                "invalid type {:?} for {}: expected {}",
                self.kind,
                self.name,
                kinds.join(" or ")
            ));
        }
        if let Some(sha) = &self.sha256
            && !keel_common::fingerprint::is_hex(sha, 32)
        {
            return bad(format!("invalid sha256 {sha:?}: 64 hex digits"));
        }
        if !matches!(self.arch.as_str(), "any" | "x86_64" | "aarch64") {
            return bad(format!("invalid arch {:?}: expected any, x86_64 or aarch64", self.arch));
        }
        Ok(())
    }
}

/// Where packages are kept.
pub fn dir(state: &ServerState) -> PathBuf {
    state.config.data_dir.join("packages")
}

/// Writes chunks to a temporary file in the store while hashing and counting,
/// refusing more than the cap.
#[derive(Debug)]
pub struct Upload {
    path: PathBuf,
    file: std::fs::File,
    hasher: Sha256,
    size: u64,
    cap: u64,
}

impl Upload {
    /// Starts an upload into the store of `state`.
    pub fn start(state: &ServerState) -> Result<Self, ComponentError> {
        let dir = dir(state);
        keel_common::fsutil::create_dir(&dir, 0o700)?;
        let path = dir.join(format!(".upload-{}", uuid::Uuid::new_v4().simple()));
        let file = std::fs::File::create(&path)?;
        Ok(Self {
            path,
            file,
            hasher: Sha256::new(),
            size: 0,
            cap: state.config.components.max_package_bytes,
        })
    }

    /// Adds a chunk.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), ComponentError> {
        self.size += chunk.len() as u64;
        if self.size > self.cap {
            return Err(ComponentError::TooLarge(self.cap));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk)?;
        Ok(())
    }

    /// Verifies or signs the package, files it by hash and records it.
    pub async fn finish(self, state: &ServerState, meta: &PackageMeta) -> Result<PackageRow, ComponentError> {
        let Upload {
            path,
            file,
            hasher,
            size,
            ..
        } = self;
        let result = async {
            meta.validate()?;
            if size == 0 {
                return Err(ComponentError::Invalid("empty package".into()));
            }
            file.sync_all()?;
            let sha256 = hex::encode(hasher.finalize());
            if let Some(expected) = &meta.sha256
                && !expected.eq_ignore_ascii_case(&sha256) {
                    return Err(ComponentError::Content(format!("sha256 mismatch: the upload has {sha256}, expected {expected}")));
                }
            let in_use = state.store.policies_using(&meta.name, &meta.version).await?;
            if !in_use.is_empty() {
                return Err(ComponentError::InUse { name: meta.name.clone(), version: meta.version.clone(), policies: in_use.join(", ") });
            }
            let bytes = std::fs::read(&path)?;
            check_content(&meta.kind, &bytes)?;
            let signature = state.release.signature_for(&bytes, meta.signature.as_deref())?;
            let row = PackageRow {
                name: meta.name.clone(),
                version: meta.version.clone(),
                arch: meta.arch.clone(),
                kind: meta.kind.clone(),
                sha256: sha256.clone(),
                signature,
                size: i64::try_from(size).unwrap_or(i64::MAX),
                created_at: now_ms(),
                created_by: meta.by.clone(),
            };
            std::fs::rename(&path, dir(state).join(&sha256))?;
            if !state.store.package_add(&row).await? {
                return Err(ComponentError::Exists {
                    name: meta.name.clone(),
                    version: meta.version.clone(),
                    kind: meta.kind.clone(),
                    arch: meta.arch.clone(),
                });
            }
            tracing::info!(component = %row.name, version = %row.version, sha256 = %row.sha256, size, by = %row.created_by, "package stored");
            Ok(row)
        }
        .await;
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Abandons the upload.
    pub fn abort(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Checks that the bytes are what the package type says.
fn check_content(kind: &str, bytes: &[u8]) -> Result<(), ComponentError> {
    let ok = match kind {
        "deb" => bytes.starts_with(b"!<arch>\n"),
        "rpm" => bytes.starts_with(&[0xed, 0xab, 0xee, 0xdb]),
        "tar.gz" => bytes.starts_with(&[0x1f, 0x8b]),
        "exec" => bytes.starts_with(b"\x7fELF") || bytes.starts_with(b"#!"),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(ComponentError::Content(format!("the upload is not a {kind} package")))
    }
}

/// Deletes every package of a version, unless a policy uses it.
pub async fn delete_version(state: &ServerState, name: &str, version: &str) -> Result<usize, ComponentError> {
    let in_use = state.store.policies_using(name, version).await?;
    if !in_use.is_empty() {
        return Err(ComponentError::InUse {
            name: name.into(),
            version: version.into(),
            policies: in_use.join(", "),
        });
    }
    let hashes = state.store.version_delete(name, version).await?;
    for sha in &hashes {
        if !state.store.package_sha_known(sha).await? {
            let _ = std::fs::remove_file(dir(state).join(sha));
        }
    }
    Ok(hashes.len())
}

/// Stores a package from a file on this machine (the quickstart's plugins).
pub async fn store_file(state: &ServerState, path: &Path, meta: &PackageMeta) -> Result<PackageRow, ComponentError> {
    let bytes = std::fs::read(path)?;
    let mut up = Upload::start(state)?;
    if let Err(e) = up.write(&bytes) {
        up.abort();
        return Err(e);
    }
    up.finish(state, meta).await
}
