//! `keel-agent enroll`: trade an enrollment token, or proof of an agent key, and a
//! CSR for a certificate.
//!
//! 1. Fetch the server's CA certificate and check its SHA-256 against the pinned
//!    fingerprint. Without `--ca-fingerprint` the agent refuses, printing the
//!    fingerprint it saw, unless `--trust-on-first-use` makes it accept loudly.
//! 2. Generate the key locally and send only a CSR, over TLS verified against the
//!    pinned CA (or plain HTTP to a loopback address), with the token, or (with an
//!    agent key) a proof over a server challenge and the CSR: the agent key itself
//!    is never sent. By key, the server assigns the ID.
//! 3. Check that the certificate is for our key and ID, and store key (0600),
//!    certificate and CA.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_common::fingerprint;
use keel_common::secret::Secret;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::{id, pki};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Longest agent key accepted.
const MAX_AGENT_KEY: usize = 128;

/// What the agent proves its right to enroll with.
#[derive(Debug, Clone)]
pub enum Credential {
    /// An enrollment token.
    Token(Secret),
    /// The agent key a key database holds for this host (see [`read_agent_key`]).
    Key(Secret),
}

/// Reads an agent key file: 1-128 printable ASCII characters, one trailing newline
/// allowed. Errors never include the key.
pub fn read_agent_key(path: &std::path::Path) -> anyhow::Result<Secret> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the key file {}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        eprintln!(
            "keel-agent: warning: the key file {} can be read by other users; chmod 600 it",
            path.display()
        );
    }
    let text = std::fs::read(path).with_context(|| format!("cannot read the key file {}", path.display()))?;
    let key = text
        .strip_suffix(b"\r\n")
        .or_else(|| text.strip_suffix(b"\n"))
        .unwrap_or(&text);
    if key.is_empty() || key.len() > MAX_AGENT_KEY {
        bail!(
            "the key file {} must hold 1-{MAX_AGENT_KEY} characters, not {}",
            path.display(),
            key.len()
        );
    }
    if let Some(i) = key.iter().position(|b| !(0x21..=0x7e).contains(b) && *b != b' ') {
        bail!(
            "the key in {} has a character that is not printable ASCII at byte {i}",
            path.display()
        );
    }
    Ok(Secret::new(String::from_utf8_lossy(key).into_owned()))
}

/// How to enroll.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// Base URL of the server's HTTP endpoint, e.g. `https://keel.example:6752`.
    pub server: String,
    /// Token or agent key.
    pub credential: Credential,
    /// SHA-256 of the CA certificate, as `keel-server ca fingerprint` prints it.
    pub ca_fingerprint: Option<String>,
    /// Accept whatever CA the server presents, with a warning.
    pub trust_on_first_use: bool,
}

#[derive(Serialize)]
struct EnrollRequest<'a> {
    token: &'a str,
    agent_id: &'a str,
    hostname: &'a str,
    csr: &'a str,
}

#[derive(Serialize)]
struct KeyEnrollRequest<'a> {
    nonce: &'a str,
    id: &'a str,
    hostname: &'a str,
    csr: &'a str,
    proof: &'a str,
}

#[derive(Deserialize)]
struct Challenge {
    nonce: String,
}

#[derive(Deserialize)]
struct EnrollResponse {
    agent_id: String,
    #[serde(default)]
    name: String,
    certificate: String,
    ca: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client(tls: rustls::ClientConfig) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .context("cannot build the HTTP client")
}

/// Refuses plain HTTP unless the host is a loopback address.
fn check_scheme(url: &reqwest::Url) -> anyhow::Result<()> {
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
                Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                bail!(
                    "refusing to enroll over plain HTTP to {url}: use https (plain HTTP is allowed only to a loopback address)"
                )
            }
        }
        other => bail!("unsupported URL scheme {other:?} in {url}"),
    }
}

async fn fetch_ca(base: &reqwest::Url) -> anyhow::Result<String> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(keel_common::tls::AnyCertificate::new()))
        .with_no_client_auth();
    let url = base.join("enroll/ca.pem")?;
    let resp = client(tls)?
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    if !resp.status().is_success() {
        bail!("{url} answered {}", resp.status());
    }
    Ok(resp.text().await?)
}

fn ca_fingerprint(ca_pem: &str) -> anyhow::Result<String> {
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("the server's CA is not a PEM certificate")?;
    Ok(fingerprint::sha256_hex(&der))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Enrolls; returns the agent ID.
pub async fn enroll(config: &AgentConfig, opts: &EnrollOptions) -> anyhow::Result<String> {
    keel_common::tls::install_crypto_provider();
    let mut base =
        reqwest::Url::parse(&opts.server).with_context(|| format!("invalid --server URL {:?}", opts.server))?;
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    check_scheme(&base)?;

    let ca_pem = fetch_ca(&base).await?;
    let seen = ca_fingerprint(&ca_pem)?;
    match &opts.ca_fingerprint {
        Some(expected) => {
            let expected = fingerprint::normalize(expected)
                .with_context(|| format!("--ca-fingerprint {expected:?} is not a SHA-256 hex fingerprint"))?;
            if expected != seen {
                bail!("CA fingerprint mismatch: the server presented {seen}, expected {expected}; refusing to enroll");
            }
        }
        None if opts.trust_on_first_use => {
            tracing::warn!(fingerprint = %seen, "trusting the server's CA on first use");
            eprintln!("WARNING: trusting the server's CA on first use; its fingerprint is {seen}");
        }
        None => bail!(
            "the server's CA fingerprint is {seen}; check it out of band (`keel-server ca fingerprint`) \
             and pass --ca-fingerprint {seen}, or accept it with --trust-on-first-use"
        ),
    }

    let state_dir = &config.agent.state_dir;
    let http = client(keel_common::tls::pinned_client(ca_pem.as_bytes())?.with_no_client_auth())?;
    let (agent_id, request, answer) = match &opts.credential {
        Credential::Token(token) => {
            let (agent_id, source) = id::resolve(&config.agent.id, &config.agent.host_root, state_dir)?;
            tracing::info!(%agent_id, ?source, "enrolling");
            let request = pki::new_key_request(&agent_id)?;
            let body = EnrollRequest {
                token: token.expose(),
                agent_id: &agent_id,
                hostname: &hostname(),
                csr: &request.csr_pem,
            };
            let answer: EnrollResponse = post(&http, &base.join("enroll")?, &body).await?;
            (agent_id, request, answer)
        }
        Credential::Key(key) => {
            // The ID the key database knows this host by, if configured; else the
            // server looks the key up by this host's address.
            let id = config.agent.id.as_str();
            // Empty (look up by address) or 1-8 digits.
            if id.len() > 8 || !id.bytes().all(|b| b.is_ascii_digit()) {
                bail!("enrollment by key needs the key database's ID (1-8 digits) as --id, or none; {id:?} is not one");
            }
            let challenge: Challenge = post(&http, &base.join("enroll/challenge")?, &serde_json::json!({})).await?;
            let nonce = hex::decode(&challenge.nonce).context("the server's challenge is not hex")?;
            let request = pki::new_key_request(if id.is_empty() { UNKNOWN_ID_CN } else { id })?;
            let proof = keel_proto::keyproof::prove(key.expose(), &nonce, &request.csr_sha256);
            let body = KeyEnrollRequest {
                nonce: &challenge.nonce,
                id,
                hostname: &hostname(),
                csr: &request.csr_pem,
                proof: &proof,
            };
            let answer: EnrollResponse = post(&http, &base.join("enroll/key")?, &body).await?;
            if !id.is_empty() && answer.agent_id != id {
                bail!("asked to enroll as {id}, the server assigned {}", answer.agent_id);
            }
            if !keel_common::ids::valid_agent_id(&answer.agent_id) {
                bail!("the server assigned an invalid agent ID {:?}", answer.agent_id);
            }
            tracing::info!(agent_id = %answer.agent_id, name = %answer.name, "enrolled by key");
            (answer.agent_id.clone(), request, answer)
        }
    };
    if answer.agent_id != agent_id {
        bail!("the server enrolled {:?}, not {agent_id:?}", answer.agent_id);
    }
    if ca_fingerprint(&answer.ca)? != seen {
        bail!("the enrollment answer carries a different CA than the pinned one");
    }
    let info = pki::check_issued(&answer.certificate, &request.key_pem, &agent_id)
        .map_err(|e| anyhow::anyhow!("invalid certificate from the server: {e}"))?;
    pki::store_enrollment(state_dir, &request.key_pem, &answer.certificate, &ca_pem)?;
    pki::mark_assigned_id(state_dir, matches!(opts.credential, Credential::Key(_)))?;
    tracing::info!(%agent_id, serial = %info.serial, "enrolled");
    Ok(agent_id)
}

/// The CSR subject of a host that does not know its ID (the server's
/// `keyenroll::UNKNOWN_ID_CN`).
const UNKNOWN_ID_CN: &str = "keel-key-enrollment";

/// POSTs JSON and reads the JSON answer; a refusal carries the server's message.
async fn post<B: Serialize, T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &reqwest::Url,
    body: &B,
) -> anyhow::Result<T> {
    let resp = http
        .post(url.clone())
        .json(body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let reason = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(text);
        bail!("enrollment refused ({status}): {reason}");
    }
    resp.json().await.with_context(|| format!("invalid answer from {url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_key_files_are_checked_without_showing_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            p
        };
        assert_eq!(
            read_agent_key(&write("ok", b"k3y value\n")).unwrap().expose(),
            "k3y value"
        );
        assert_eq!(read_agent_key(&write("crlf", b"abc\r\n")).unwrap().expose(), "abc");
        let e = read_agent_key(&write("ctl", b"secr\x07t")).unwrap_err().to_string();
        assert!(e.contains("byte 4") && !e.contains("secr"), "{e}");
        let e = read_agent_key(&write("empty", b"\n")).unwrap_err().to_string();
        assert!(e.contains("1-128"), "{e}");
        let e = read_agent_key(&write("long", &[b'a'; 129])).unwrap_err().to_string();
        assert!(e.contains("not 129"), "{e}");
        assert!(read_agent_key(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in [
            "http://127.0.0.1:6752/",
            "http://[::1]:6752/",
            "http://localhost:6752/",
            "https://keel.example/",
        ] {
            assert!(check_scheme(&reqwest::Url::parse(ok).unwrap()).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.1:6752/", "http://keel.example/", "ftp://127.0.0.1/"] {
            let e = check_scheme(&reqwest::Url::parse(bad).unwrap()).unwrap_err();
            assert!(
                e.to_string().contains("refusing") || e.to_string().contains("scheme"),
                "{bad}: {e}"
            );
        }
    }
}
