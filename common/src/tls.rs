//! The process-wide rustls crypto provider, the client that trusts only a pinned
//! CA, and the one certificate verifier that trusts any certificate.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Installs ring as rustls's default provider. Safe to call more than once.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Why a pinned CA cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum PinnedCaError {
    /// Its PEM does not parse.
    #[error("not PEM: {0}")]
    Pem(rustls::pki_types::pem::Error),
    /// A certificate in it is not one rustls can use as a root.
    #[error("not a usable CA certificate: {0}")]
    Certificate(rustls::Error),
    /// It holds no certificate at all.
    #[error("no certificate in it")]
    Empty,
    /// The crypto provider refused rustls's safe protocol versions.
    #[error("TLS versions: {0}")]
    Versions(rustls::Error),
}

/// The CA certificates in `pem`: the only roots a pinned client trusts.
pub fn pinned_roots(pem: &[u8]) -> Result<rustls::RootCertStore, PinnedCaError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots
            .add(cert.map_err(PinnedCaError::Pem)?)
            .map_err(PinnedCaError::Certificate)?;
    }
    if roots.is_empty() {
        return Err(PinnedCaError::Empty);
    }
    Ok(roots)
}

/// A TLS client, with ring and rustls's safe protocol versions, that trusts only
/// the CA certificates in `pem`; the caller chooses its client authentication.
pub fn pinned_client(
    pem: &[u8],
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, PinnedCaError> {
    let roots = pinned_roots(pem)?;
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(PinnedCaError::Versions)?
            .with_root_certificates(roots),
    )
}

/// A server-certificate verifier that accepts any certificate but still checks
/// the handshake signature against it, so the peer holds the key of the
/// certificate it shows. For the two places that judge a certificate afterwards,
/// not by a CA: enrollment (the CA's fingerprint is compared with the pinned one)
/// and the TLS inventory (the certificate is recorded, not trusted).
#[derive(Debug)]
pub struct AnyCertificate(Arc<CryptoProvider>);

impl AnyCertificate {
    /// With ring's signature algorithms.
    pub fn new() -> Self {
        AnyCertificate(Arc::new(rustls::crypto::ring::default_provider()))
    }
}

impl Default for AnyCertificate {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
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

#[cfg(test)]
mod pinned_tests {
    use super::*;

    #[test]
    fn a_pinned_ca_must_hold_a_usable_certificate() {
        assert!(matches!(pinned_roots(b""), Err(PinnedCaError::Empty)));
        let not_pem = b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        assert!(
            matches!(pinned_roots(not_pem), Err(PinnedCaError::Pem(_))),
            "broken base64"
        );
        let junk = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = pinned_roots(junk).expect_err("four zero bytes are no certificate");
        assert!(err.to_string().starts_with("not a usable CA certificate"), "{err}");
    }
}
