//! `keel-agent enroll`: trade an enrollment token and a CSR for a certificate.
//!
//! 1. Fetch the server's CA certificate and check its SHA-256 against the pinned
//!    fingerprint. Without `--ca-fingerprint` the agent refuses, printing the
//!    fingerprint it saw, unless `--trust-on-first-use` makes it accept loudly.
//! 2. Generate the key locally and send only a CSR, over TLS verified against the
//!    pinned CA (or plain HTTP to a loopback address).
//! 3. Check that the certificate is for our key and ID, and store key (0600),
//!    certificate and CA.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use keel_common::fingerprint;
use keel_common::secret::Secret;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::{id, pki};

const TIMEOUT: Duration = Duration::from_secs(30);

/// How to enroll.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// Base URL of the server's HTTP endpoint, e.g. `https://keel.example:6752`.
    pub server: String,
    /// The enrollment token.
    pub token: Secret,
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

#[derive(Deserialize)]
struct EnrollResponse {
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

/// Verifies the handshake signature but trusts any certificate. Used only to
/// download the CA certificate, whose fingerprint is then checked.
#[derive(Debug)]
struct FetchOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for FetchOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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

/// A TLS client configuration that trusts only `ca_pem`.
pub fn pinned_tls(ca_pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.context("pinned CA is not PEM")?)
            .context("pinned CA is not a usable certificate")?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
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
        .with_custom_certificate_verifier(Arc::new(FetchOnly(provider())))
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
    let (agent_id, source) = id::resolve(&config.agent.id, &config.agent.host_root, state_dir)?;
    tracing::info!(%agent_id, ?source, "enrolling");
    let request = pki::new_key_request(&agent_id)?;
    let body = EnrollRequest {
        token: opts.token.expose(),
        agent_id: &agent_id,
        hostname: &hostname(),
        csr: &request.csr_pem,
    };
    let url = base.join("enroll")?;
    let resp = client(pinned_tls(&ca_pem)?)?
        .post(url.clone())
        .json(&body)
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
    let answer: EnrollResponse = resp.json().await.context("invalid enrollment answer")?;
    if ca_fingerprint(&answer.ca)? != seen {
        bail!("the enrollment answer carries a different CA than the pinned one");
    }
    let info = pki::check_issued(&answer.certificate, &request.key_pem, &agent_id)
        .map_err(|e| anyhow::anyhow!("invalid certificate from the server: {e}"))?;
    pki::store_enrollment(state_dir, &request.key_pem, &answer.certificate, &ca_pem)?;
    tracing::info!(%agent_id, serial = %info.serial, "enrolled");
    Ok(agent_id)
}

#[cfg(test)]
mod tests {
    use super::*;

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
