//! The offline subcommands, `ca …` and `token …`. They work on the data directory
//! directly, so they also run while a server is serving; a running server picks
//! up revocations within a second.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use keel_common::time::now_ms;

use crate::config::ServerConfig;
use crate::pki::{self, Ca};
use crate::store::{NewToken, Role, Store, TokenRow};

/// `ca init`: creates the CA and server certificate. Returns the CA fingerprint.
pub fn ca_init(config: &ServerConfig, extra_sans: &[String]) -> anyhow::Result<String> {
    keel_common::tls::install_crypto_provider();
    let mut sans = config.pki.server_sans.clone();
    for s in extra_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    let ca = pki::init(&config.pki_dir(), &sans)?;
    Ok(ca.fingerprint().to_owned())
}

/// `ca release-key`: creates the Ed25519 release key. Returns the public key (hex)
/// that agents pin as `plugins.release_public_key`.
pub fn release_key(config: &ServerConfig) -> anyhow::Result<String> {
    Ok(crate::release::generate(&config.pki_dir())?)
}

/// `ca fingerprint`: the SHA-256 fingerprint agents pin.
pub fn ca_fingerprint(config: &ServerConfig) -> anyhow::Result<String> {
    Ok(Ca::load(&config.pki_dir())?.fingerprint().to_owned())
}

async fn store(config: &ServerConfig) -> anyhow::Result<Store> {
    keel_common::fsutil::create_dir(&config.data_dir, 0o700)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    Store::open(&config.database_url())
        .await
        .context("opening the registry")
}

/// What `ca revoke` should revoke.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// Every certificate of an agent.
    Agent(String),
    /// One certificate.
    Serial(String),
}

/// `ca revoke`: returns the serials revoked.
pub async fn ca_revoke(config: &ServerConfig, target: &RevokeTarget, reason: &str) -> anyhow::Result<Vec<String>> {
    let store = store(config).await?;
    let now = now_ms();
    Ok(match target {
        RevokeTarget::Agent(id) => store.revoke_agent_certs(id, reason, None, now).await?,
        RevokeTarget::Serial(s) => {
            let serial = s.to_ascii_lowercase();
            match store.revoke_serial(&serial, reason, now).await? {
                Some(_) => vec![serial],
                None => Vec::new(),
            }
        }
    })
}

/// `token create`: an enrollment token, or an API token when `role` is given.
pub async fn token_create(
    config: &ServerConfig,
    role: Option<Role>,
    ttl: Option<Duration>,
    uses: u32,
    description: &str,
) -> anyhow::Result<NewToken> {
    let store = store(config).await?;
    Ok(match role {
        Some(role) => store.create_api_token(role, ttl, description).await?,
        None => {
            let ttl = ttl.unwrap_or(config.pki.enrollment_token_ttl);
            store.create_enrollment_token(ttl, uses, description).await?
        }
    })
}

/// `token list`
pub async fn token_list(config: &ServerConfig) -> anyhow::Result<Vec<TokenRow>> {
    Ok(store(config).await?.list_tokens().await?)
}

/// `token revoke`
pub async fn token_revoke(config: &ServerConfig, id: &str) -> anyhow::Result<bool> {
    Ok(store(config).await?.revoke_token(id).await?)
}

/// Writes an admin token's secret to `path` (mode 0600).
pub fn write_token_file(path: &Path, token: &NewToken) -> anyhow::Result<()> {
    keel_common::fsutil::write_private(path, format!("{}\n", token.secret.expose()).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
