//! TLS for both listeners, and the accept loop of the gRPC listener.
//!
//! The gRPC listener requires a client certificate that chains to the Keel CA, has
//! the clientAuth usage, is within its validity, and is not revoked. Handshakes run
//! concurrently, bounded in number and time, and every refusal is logged with the
//! peer and a plain reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_common::backoff::Backoff;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::connections::Revocations;
use crate::pki;

/// The TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsSetupError(String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks the client certificate against the CA, then against the revocation list.
#[derive(Debug)]
struct AgentVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for AgentVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let Some(peer) = pki::peer_cert(end_entity) else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        };
        if self.revocations.contains(&peer.serial) {
            warn!(agent_id = %peer.agent_id, serial = %peer.serial, "refused a revoked client certificate");
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the mutual-TLS listeners check a client certificate against: the CA it
/// must chain to and the serials revoked since; and the server's own identity.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The Keel CA's certificate.
    pub ca: CertificateDer<'static>,
    /// Revoked serials, shared with whoever revokes.
    pub revocations: Arc<Revocations>,
    /// Where the server's certificate and key are (`pki.dir`).
    pub identity_dir: PathBuf,
}

fn server_identity(dir: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsSetupError> {
    pki::server_identity(dir).map_err(|e| TlsSetupError(e.to_string()))
}

/// The gRPC listener's TLS: mutual, HTTP/2.
pub fn grpc_config(trust: &Trust) -> Result<rustls::ServerConfig, TlsSetupError> {
    mutual_config(trust, b"h2")
}

/// Mutual TLS speaking `alpn`: only agents' certificates from the Keel CA, not revoked.
pub fn mutual_config(trust: &Trust, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(trust.ca.clone())
        .map_err(|e| TlsSetupError(format!("CA certificate: {e}")))?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsSetupError(e.to_string()))?;
    let verifier = Arc::new(AgentVerifier {
        inner,
        revocations: Arc::clone(&trust.revocations),
    });
    let (chain, key) = server_identity(&trust.identity_dir)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError(format!("server certificate: {e}")))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The HTTPS listener's TLS: server authentication only.
pub fn http_config(identity_dir: &Path) -> Result<rustls::ServerConfig, TlsSetupError> {
    let (chain, key) = server_identity(identity_dir)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsSetupError(format!("server certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Where refused handshakes are counted: the listener's label in
/// `keel_tls_handshakes_refused`.
#[derive(Debug, Clone)]
pub struct Refusals {
    /// The counter family.
    pub family: prometheus_client::metrics::family::Family<
        crate::metrics::Refusal,
        prometheus_client::metrics::counter::Counter,
    >,
    /// `grpc` or `tunnel`.
    pub listener: &'static str,
}

impl Refusals {
    fn count(&self, reason: &'static str) {
        self.family
            .get_or_create(&crate::metrics::Refusal {
                listener: self.listener,
                reason,
            })
            .inc();
    }
}

/// The reason label of a failed handshake.
pub fn handshake_refusal(e: &std::io::Error) -> &'static str {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return "io";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "expired"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_valid_yet",
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        _ => "protocol",
    }
}

/// A plain explanation of a failed handshake, for the log.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no client certificate".into(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "client certificate is not issued by the Keel CA".into()
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "client certificate has expired".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "client certificate is not valid yet".into(),
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => "client certificate is revoked".into(),
        other => other.to_string(),
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, handing
/// finished streams to the gRPC server through the returned channel.
pub fn accept_loop(
    listener: TcpListener,
    config: rustls::ServerConfig,
    max_handshakes: usize,
    handshake_timeout: Duration,
    refusals: Refusals,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(max_handshakes.max(1));
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let permits = Arc::new(Semaphore::new(max_handshakes.max(1)));
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1), 0.5);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => {
                    backoff.reset();
                    a
                }
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                break;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(reason) = handshake(acceptor, tcp, peer, handshake_timeout, tx).await {
                    refusals.count(reason);
                }
            });
        }
        debug!("gRPC accept loop stopped");
    });
    rx
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    limit: Duration,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) -> Option<&'static str> {
    match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            let _ = tx.send(Ok(tls)).await;
            None
        }
        Ok(Err(e)) => {
            warn!(%peer, reason = %describe_handshake_error(&e), "refused connection: TLS handshake failed");
            Some(handshake_refusal(&e))
        }
        Err(_) => {
            warn!(%peer, "refused connection: TLS handshake timed out");
            Some("timeout")
        }
    }
}
