//! The Keel certificate authority, built on rcgen.
//!
//! `ca init` writes `ca.pem`, `ca.key` (0600), `server.pem` and `server.key` (0600)
//! into the PKI directory. The server signs agent certificates from CSRs: only the
//! CSR's public key is used; subject, lifetime, usages and serial are the server's.
//! The agent ID is the certificate's subject common name.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_common::{fingerprint, fsutil};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::KeyType;

/// CA certificate file name.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file name (mode 0600).
pub const CA_KEY: &str = "ca.key";
/// Server certificate file name.
pub const SERVER_CERT: &str = "server.pem";
/// Server private key file name (mode 0600).
pub const SERVER_KEY: &str = "server.key";

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86400);
const SERVER_LIFETIME: Duration = Duration::from_secs(825 * 86400);

/// The PKI directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `ca init` would overwrite an existing CA.
    #[error("a CA already exists in {0}; refusing to overwrite it")]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds something other than what it should.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A CSR that must be refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a CSR, or its self-signature does not verify.
    #[error("CSR cannot be parsed or its signature does not verify")]
    Unparseable,
    /// The key type is not in `pki.allowed_key_types`.
    #[error("CSR key type {found} is not allowed (allowed: {allowed})")]
    KeyType {
        /// The key type found.
        found: String,
        /// The allowed types.
        allowed: String,
    },
    /// The signature algorithm does not belong to the key type.
    #[error("CSR signature algorithm does not match its {0} key")]
    AlgorithmMismatch(&'static str),
    /// The subject does not name the agent.
    #[error("CSR subject CN {found:?} does not match agent id {expected:?}")]
    Subject {
        /// The CN in the CSR.
        found: String,
        /// The agent ID asked for.
        expected: String,
    },
}

/// A CSR whose key type and subject were checked.
#[derive(Debug)]
pub struct CheckedCsr {
    request: CertificateSigningRequestParams,
    /// The key type.
    pub key_type: KeyType,
    /// SHA-256 of the CSR's DER bytes, which a key proof binds.
    pub der_sha256: [u8; 32],
}

/// A freshly issued agent certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// PEM of the certificate.
    pub pem: String,
    /// Lowercase hex serial.
    pub serial: String,
    /// Expiry, Unix milliseconds.
    pub not_after_ms: i64,
}

/// The loaded CA. `Debug` shows the fingerprint only, never the key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    fingerprint: String,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> PkiError {
    PkiError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn random_serial() -> (SerialNumber, String) {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails when the OS has no entropy source at all.
    if SystemRandom::new().fill(&mut bytes).is_err() {
        bytes = uuid::Uuid::new_v4().into_bytes();
    }
    // A positive INTEGER without a leading zero byte, so the DER content bytes
    // and this hex spelling are the same thing.
    bytes[0] = (bytes[0] & 0x7f).max(1);
    (SerialNumber::from_slice(&bytes), hex::encode(bytes))
}

fn offset(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// Creates a new CA and server certificate in `dir`.
pub fn init(dir: &Path, sans: &[String]) -> Result<Ca, PkiError> {
    let key_path = dir.join(CA_KEY);
    if key_path.exists() {
        return Err(PkiError::Exists(dir.to_path_buf()));
    }
    fsutil::create_dir(dir, 0o700).map_err(io_err(dir))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Keel");
    dn.push(DnType::CommonName, "Keel CA");
    params.distinguished_name = dn;
    // Path length 0: this CA signs leaf certificates only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + offset(CA_LIFETIME);
    params.serial_number = Some(random_serial().0);
    let cert = params.self_signed(&key)?;
    fsutil::write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io_err(&key_path))?;
    let cert_path = dir.join(CA_CERT);
    fsutil::write_public(&cert_path, cert.pem().as_bytes()).map_err(io_err(&cert_path))?;
    let ca = Ca::load(dir)?;
    ca.write_server_cert(dir, sans)?;
    Ok(ca)
}

impl Ca {
    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(&key_path, format!("not a private key: {e}")))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(&cert_path, format!("not a PEM certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| invalid(&cert_path, format!("not a usable CA certificate: {e}")))?;
        let fingerprint = fingerprint::sha256_hex(&cert_der);
        Ok(Self {
            cert_pem,
            cert_der,
            issuer,
            fingerprint,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate, lowercase hex: what agents pin.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Writes a new server certificate and key with `sans` into `dir`.
    pub fn write_server_cert(&self, dir: &Path, sans: &[String]) -> Result<(), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Keel");
        dn.push(DnType::CommonName, "keel-server");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + offset(SERVER_LIFETIME);
        params.serial_number = Some(random_serial().0);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_path = dir.join(SERVER_KEY);
        fsutil::write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io_err(&key_path))?;
        let cert_path = dir.join(SERVER_CERT);
        let chain = format!("{}{}", cert.pem(), self.cert_pem);
        fsutil::write_public(&cert_path, chain.as_bytes()).map_err(io_err(&cert_path))?;
        Ok(())
    }

    /// Signs an agent certificate for `agent_id` over the key of a checked CSR.
    pub fn issue_agent(&self, agent_id: &str, csr: &CheckedCsr, lifetime: Duration) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Keel");
        dn.push(DnType::CommonName, agent_id);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        // Tolerate a little clock skew without inflating short test lifetimes.
        let skew = offset(lifetime / 10).min(time::Duration::minutes(5));
        let not_after = now + offset(lifetime);
        params.not_before = now - skew;
        params.not_after = not_after;
        let (serial, serial_hex) = random_serial();
        params.serial_number = Some(serial);
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.request.public_key.clone(),
        };
        let cert = request.signed_by(&self.issuer)?;
        let not_after_ms = i64::try_from(not_after.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: serial_hex,
            not_after_ms,
        })
    }
}

// OIDs of SubjectPublicKeyInfo algorithms and curves.
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";

/// Parses a PEM CSR, verifies its self-signature, and checks the key type against
/// `allowed` and the subject CN against `agent_id`.
pub fn check_csr(pem: &str, agent_id: &str, allowed: &[KeyType]) -> Result<CheckedCsr, CsrError> {
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::Unparseable)?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|_| CsrError::Unparseable)?;
    let info = &parsed.certification_request_info;
    let spki_alg = info.subject_pki.algorithm.algorithm.to_id_string();
    let curve = info
        .subject_pki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let key_type = match (spki_alg.as_str(), curve.as_deref()) {
        (OID_EC_PUBLIC_KEY, Some(OID_P256)) => Some(KeyType::EcdsaP256),
        (OID_EC_PUBLIC_KEY, Some(OID_P384)) => Some(KeyType::EcdsaP384),
        (OID_ED25519, _) => Some(KeyType::Ed25519),
        _ => None,
    };
    let allowed_names = || allowed.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
    let Some(key_type) = key_type.filter(|k| allowed.contains(k)) else {
        let found = match (spki_alg.as_str(), curve.as_deref(), key_type) {
            (_, _, Some(k)) => k.name().to_owned(),
            (OID_RSA, _, None) => "rsa".to_owned(),
            (OID_EC_PUBLIC_KEY, Some(c), None) => format!("ecdsa with curve {c}"),
            (other, _, None) => format!("algorithm {other}"),
        };
        return Err(CsrError::KeyType {
            found,
            allowed: allowed_names(),
        });
    };
    let request = CertificateSigningRequestParams::from_der(&der).map_err(|_| CsrError::Unparseable)?;
    let expected_alg = match key_type {
        KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyType::Ed25519 => &rcgen::PKCS_ED25519,
    };
    if request.public_key.algorithm() != expected_alg {
        return Err(CsrError::AlgorithmMismatch(key_type.name()));
    }
    let cn = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    if cn != agent_id {
        return Err(CsrError::Subject {
            found: cn,
            expected: agent_id.to_owned(),
        });
    }
    let der_sha256 = <sha2::Sha256 as sha2::Digest>::digest(der.as_ref()).into();
    Ok(CheckedCsr {
        request,
        key_type,
        der_sha256,
    })
}

/// The identity in a client certificate that TLS has already verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The agent ID (subject CN).
    pub agent_id: String,
    /// Lowercase hex serial.
    pub serial: String,
}

/// Reads the agent ID and serial from a DER certificate.
pub fn peer_cert(der: &[u8]) -> Option<PeerCert> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let agent_id = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(PeerCert {
        agent_id,
        serial: hex::encode(cert.raw_serial()),
    })
}

/// Loads the server's certificate chain and key for TLS.
pub fn server_identity(dir: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let cert_path = dir.join(SERVER_CERT);
    let key_path = dir.join(SERVER_KEY);
    let chain_pem = std::fs::read(&cert_path).map_err(io_err(&cert_path))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&cert_path, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(&cert_path, "holds no certificate"));
    }
    let key_pem = std::fs::read(&key_path).map_err(io_err(&key_path))?;
    let key =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| invalid(&key_path, format!("not a private key: {e}")))?;
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[KeyType] = &[KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519];

    fn csr(cn: &str, alg: &'static rcgen::SignatureAlgorithm) -> String {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn init_writes_private_keys_0600_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap();
        for f in [CA_KEY, SERVER_KEY] {
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert!(matches!(init(dir.path(), &[]), Err(PkiError::Exists(_))));
        let reloaded = Ca::load(dir.path()).unwrap();
        assert_eq!(reloaded.fingerprint(), ca.fingerprint());
        assert!(!format!("{ca:?}").contains("PRIVATE"));
        let (chain, _) = server_identity(dir.path()).unwrap();
        let (_, cert) = X509Certificate::from_der(&chain[0]).unwrap();
        let sans = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .len();
        assert_eq!(sans, 2);
    }

    #[test]
    fn issues_only_for_allowed_keys_and_matching_subject() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path(), &["localhost".into()]).unwrap();
        let checked = check_csr(&csr("agent-1", &rcgen::PKCS_ECDSA_P256_SHA256), "agent-1", ALL).unwrap();
        let issued = ca.issue_agent("agent-1", &checked, Duration::from_secs(3600)).unwrap();
        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        let peer = peer_cert(&der).unwrap();
        assert_eq!(peer.agent_id, "agent-1");
        assert_eq!(peer.serial, issued.serial);

        let e = check_csr(&csr("agent-1", &rcgen::PKCS_ED25519), "agent-1", &[KeyType::EcdsaP256]).unwrap_err();
        assert_eq!(
            e,
            CsrError::KeyType {
                found: "ed25519".into(),
                allowed: "ecdsa-p256".into()
            }
        );
        let e = check_csr(&csr("other", &rcgen::PKCS_ECDSA_P384_SHA384), "agent-1", ALL).unwrap_err();
        assert!(matches!(e, CsrError::Subject { .. }));
        assert_eq!(check_csr("garbage", "agent-1", ALL).unwrap_err(), CsrError::Unparseable);
    }
}
