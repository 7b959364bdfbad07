//! What every request handler and stream shares.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use keel_common::time::now_ms;

use crate::config::ServerConfig;
use crate::connections::{Connections, Outbound, PluginCommand, Revocations};
use crate::pki::{self, Ca, CsrError, IssuedCert, PkiError};
use crate::release::Release;
use crate::sink::Sink;
use crate::store::{Store, StoreError};

/// The server's shared state.
#[derive(Debug)]
pub struct ServerState {
    /// Configuration, as loaded.
    pub config: ServerConfig,
    /// The registry.
    pub store: Store,
    /// The CA.
    pub ca: Ca,
    /// Where records go.
    pub sink: Arc<dyn Sink>,
    /// Open streams.
    pub connections: Connections,
    /// Revoked certificate serials.
    pub revocations: Revocations,
    /// Highest persisted batch per agent: (epoch, seq). Flushed to the store when a
    /// stream ends and periodically.
    marks: Mutex<HashMap<String, (u64, u64)>>,
    /// The gRPC address actually bound (the configured port may be 0).
    grpc_bound: OnceLock<SocketAddr>,
    /// The HTTP address actually bound.
    http_bound: OnceLock<SocketAddr>,
    /// The release key for signing packages.
    pub release: Release,
}

/// Why a desired plugin set cannot be sent.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// A version has no package for the agent.
    #[error("component {name} version {version} has no package for {arch}")]
    NoPackage {
        /// Component.
        name: String,
        /// Version.
        version: String,
        /// The agent's architecture.
        arch: String,
    },
    /// The registry failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stream would not take it.
    #[error(transparent)]
    Send(#[from] crate::connections::SendError),
}

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// Renewal was asked for again too soon.
    #[error("renewal refused: the last certificate was issued {0}s ago")]
    TooSoon(i64),
    /// Signing failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Recording failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServerState {
    /// Builds the state from its parts.
    pub fn new(config: ServerConfig, store: Store, ca: Ca, sink: Arc<dyn Sink>, release: Release) -> Self {
        // What the sink itself knows it persisted is the newest truth after a crash.
        let marks = Mutex::new(sink.recovered_marks());
        Self {
            config,
            store,
            ca,
            sink,
            connections: Connections::default(),
            revocations: Revocations::default(),
            marks,
            grpc_bound: OnceLock::new(),
            http_bound: OnceLock::new(),
            release,
        }
    }

    /// Records the bound HTTP address once the listener is up.
    pub fn set_http_bound(&self, addr: SocketAddr) {
        let _ = self.http_bound.set(addr);
    }

    /// How agents reach the HTTP endpoint: `http.public_url`, or the bound address.
    pub fn public_url(&self) -> String {
        if let Some(u) = &self.config.http.public_url {
            return u.trim_end_matches('/').to_owned();
        }
        let addr = self.http_bound.get().copied().unwrap_or(self.config.http.listen);
        let scheme = if self.config.http.tls { "https" } else { "http" };
        let host = if addr.ip().is_unspecified() {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        } else {
            match addr.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            }
        };
        format!("{scheme}://{host}:{}", addr.port())
    }

    /// Resolves an agent's desired plugin set into packages for its architecture.
    pub async fn resolve_plugins(
        &self,
        agent_id: &str,
        set: &[crate::store::DesiredPlugin],
    ) -> Result<Vec<PluginCommand>, PushError> {
        let arch = self
            .store
            .get_agent(agent_id)
            .await?
            .and_then(|a| a.heartbeat.get("arch").and_then(|v| v.as_str()).map(str::to_owned))
            .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
        let base = self.public_url();
        let mut out = Vec::with_capacity(set.len());
        for p in set {
            let pkg = self
                .store
                .package_for(&p.name, &p.version, &arch)
                .await?
                .ok_or_else(|| PushError::NoPackage {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    arch: arch.clone(),
                })?;
            out.push(PluginCommand {
                name: p.name.clone(),
                kind: pkg.kind,
                version: p.version.clone(),
                download_urls: self
                    .config
                    .components
                    .mirrors
                    .iter()
                    .map(|m| format!("{}/{}", m.trim_end_matches('/'), pkg.sha256))
                    .chain(std::iter::once(format!("{base}/packages/{}", pkg.sha256)))
                    .collect(),
                sha256: pkg.sha256,
                signature: pkg.signature,
                detail: p.detail.clone(),
            });
        }
        Ok(out)
    }

    /// Sends the agent its desired plugin set if the server manages it and the agent
    /// is online. Returns whether something was sent.
    pub async fn push_plugins(&self, agent_id: &str) -> Result<bool, PushError> {
        let Some(set) = self.store.desired(agent_id).await? else {
            return Ok(false);
        };
        if !self.connections.is_online(agent_id) {
            return Ok(false);
        }
        let configs = self.resolve_plugins(agent_id, &set).await?;
        self.connections.send(agent_id, Outbound::Configs(configs))?;
        Ok(true)
    }

    /// Records the bound gRPC address once the listener is up.
    pub fn set_grpc_bound(&self, addr: SocketAddr) {
        let _ = self.grpc_bound.set(addr);
    }

    /// The bound gRPC address, or the configured one before binding.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_bound.get().copied().unwrap_or(self.config.grpc.listen)
    }

    /// Checks a CSR and issues a certificate for `agent_id`. With `renewal`, a
    /// certificate issued less than a quarter lifetime ago refuses a new one, so a
    /// looping agent cannot make the CA sign without bound.
    pub async fn issue(&self, agent_id: &str, csr_pem: &str, renewal: bool) -> Result<IssuedCert, IssueError> {
        let checked = pki::check_csr(csr_pem, agent_id, &self.config.pki.allowed_key_types)?;
        let lifetime = self.config.pki.cert_lifetime;
        let now = now_ms();
        if renewal && let Some(last) = self.store.last_cert_issued(agent_id).await? {
            let min_gap = i64::try_from(lifetime.as_millis() / 4).unwrap_or(i64::MAX);
            if now - last < min_gap {
                return Err(IssueError::TooSoon((now - last) / 1000));
            }
        }
        let issued = self.ca.issue_agent(agent_id, &checked, lifetime)?;
        self.store
            .cert_issued(&issued.serial, agent_id, now, issued.not_after_ms)
            .await?;
        Ok(issued)
    }

    /// Revokes every certificate of `agent_id` but `keep`, and closes streams using
    /// them at once. Returns the serials revoked.
    pub async fn revoke_agent(
        &self,
        agent_id: &str,
        reason: &str,
        keep: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let serials = self.store.revoke_agent_certs(agent_id, reason, keep, now_ms()).await?;
        self.apply_revocations(serials.iter().cloned());
        Ok(serials)
    }

    /// Adds revoked serials to the handshake check and closes their streams.
    pub fn apply_revocations(&self, serials: impl IntoIterator<Item = String>) {
        let new = self.revocations.add(serials);
        if !new.is_empty() {
            for agent_id in self.connections.close_serials(&new) {
                tracing::warn!(agent_id, "closed the stream of a revoked certificate");
            }
        }
    }

    /// Loads revocations made since `since` (Unix ms), for example by
    /// `keel-server ca revoke` in another process. Returns the newest time seen.
    pub async fn sync_revocations(&self, since: i64) -> Result<i64, StoreError> {
        let revoked = self.store.revoked_since(since).await?;
        let newest = revoked.iter().map(|(_, at)| *at).max().unwrap_or(since);
        self.apply_revocations(revoked.into_iter().map(|(s, _)| s));
        Ok(newest)
    }

    /// The agent's highest persisted batch, from memory or the store.
    pub async fn mark(&self, agent_id: &str) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some(m) = self.marks_lock().get(agent_id) {
            return Ok(Some(*m));
        }
        self.store.stream_mark(agent_id).await
    }

    /// Records a persisted batch in memory.
    pub fn set_mark(&self, agent_id: &str, epoch: u64, seq: u64) {
        self.marks_lock().insert(agent_id.to_owned(), (epoch, seq));
    }

    /// Writes one agent's mark to the store.
    pub async fn flush_mark(&self, agent_id: &str) -> Result<(), StoreError> {
        let mark = self.marks_lock().get(agent_id).copied();
        if let Some((epoch, seq)) = mark {
            self.store.save_stream_mark(agent_id, epoch, seq).await?;
        }
        Ok(())
    }

    /// Writes every mark to the store.
    pub async fn flush_marks(&self) -> Result<(), StoreError> {
        let marks: Vec<_> = self.marks_lock().iter().map(|(a, m)| (a.clone(), *m)).collect();
        for (agent, (epoch, seq)) in marks {
            self.store.save_stream_mark(&agent, epoch, seq).await?;
        }
        Ok(())
    }

    fn marks_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, u64)>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }
}
