//! The agent's own key and certificate, and the CA it pinned.
//!
//! Files under `<state_dir>/pki/`: `agent.key` (0600), `agent.pem`, `ca.pem`. The key
//! is generated here and never leaves the host; the server only sees CSRs.
//!
//! A renewal writes `agent.key.new` and `agent.pem.new`, then renames the key and
//! then the certificate. If the agent dies between the two renames, the next load
//! finds `agent.pem.new` and finishes the swap, so key and certificate always match.

use std::fmt;
use std::path::{Path, PathBuf};

use keel_common::fsutil;
use keel_common::secret::Secret;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A PKI file problem.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Not enrolled yet.
    #[error("not enrolled: {0} is missing (run `keel-agent enroll`)")]
    NotEnrolled(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds something unusable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Key or CSR generation failed.
    #[error("key generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// File locations.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `<state>/pki`
    pub dir: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Certificate.
    pub cert: PathBuf,
    /// Pinned CA.
    pub ca: PathBuf,
    key_new: PathBuf,
    cert_new: PathBuf,
}

impl Paths {
    /// The files under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        let dir = state_dir.join("pki");
        Self {
            key: dir.join("agent.key"),
            cert: dir.join("agent.pem"),
            ca: dir.join("ca.pem"),
            key_new: dir.join("agent.key.new"),
            cert_new: dir.join("agent.pem.new"),
            dir,
        }
    }
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject CN: the agent ID.
    pub agent_id: String,
    /// Hex serial.
    pub serial: String,
    /// Start of validity, Unix ms.
    pub not_before_ms: i64,
    /// End of validity, Unix ms.
    pub not_after_ms: i64,
    /// SubjectPublicKeyInfo bytes of the certified key.
    pub public_key: Vec<u8>,
}

/// Reads a PEM certificate's subject, serial, validity and key.
pub fn cert_info(pem: &str) -> Result<CertInfo, String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let agent_id = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("certificate has no subject CN")?
        .to_owned();
    let v = cert.validity();
    Ok(CertInfo {
        agent_id,
        serial: hex::encode(cert.raw_serial()),
        not_before_ms: v.not_before.timestamp() * 1000,
        not_after_ms: v.not_after.timestamp() * 1000,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// The loaded identity. `Debug` never shows the key.
#[derive(Clone)]
pub struct Identity {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: Secret,
    /// Pinned CA PEM.
    pub ca_pem: String,
    /// Facts from the certificate.
    pub info: CertInfo,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            PkiError::NotEnrolled(path.to_path_buf())
        } else {
            PkiError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Finishes a renewal interrupted between its renames.
fn recover(p: &Paths) -> Result<(), PkiError> {
    if p.cert_new.exists() {
        if p.key_new.exists() {
            std::fs::rename(&p.key_new, &p.key).map_err(io(&p.key))?;
        }
        std::fs::rename(&p.cert_new, &p.cert).map_err(io(&p.cert))?;
        tracing::info!("finished an interrupted certificate renewal");
    } else if p.key_new.exists() {
        // The certificate never arrived: the new key is useless.
        std::fs::remove_file(&p.key_new).map_err(io(&p.key_new))?;
    }
    Ok(())
}

/// Loads the identity from `state_dir`.
pub fn load(state_dir: &Path) -> Result<Identity, PkiError> {
    let p = Paths::new(state_dir);
    recover(&p)?;
    let cert_pem = read(&p.cert)?;
    let key_pem = Secret::new(read(&p.key)?);
    let ca_pem = read(&p.ca)?;
    let info = cert_info(&cert_pem).map_err(|message| PkiError::Invalid {
        path: p.cert.clone(),
        message,
    })?;
    let key = KeyPair::from_pem(key_pem.expose()).map_err(|e| PkiError::Invalid {
        path: p.key.clone(),
        message: format!("not a private key: {e}"),
    })?;
    if key.public_key_raw() != info.public_key.as_slice() {
        return Err(PkiError::Invalid {
            path: p.cert.clone(),
            message: "certificate does not match agent.key".into(),
        });
    }
    Ok(Identity {
        cert_pem,
        key_pem,
        ca_pem,
        info,
    })
}

/// Marker file: the server assigned the enrolled ID.
const ASSIGNED_ID: &str = "id-assigned";

/// A fresh key and a CSR naming `agent_id`.
#[derive(Debug)]
pub struct KeyRequest {
    /// Private key PEM.
    pub key_pem: Secret,
    /// CSR PEM.
    pub csr_pem: String,
    /// SHA-256 of the CSR's DER bytes (what a key proof binds).
    pub csr_sha256: [u8; 32],
}

/// Generates an ECDSA P-256 key and a CSR with subject CN `agent_id`.
pub fn new_key_request(agent_id: &str) -> Result<KeyRequest, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, agent_id);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok(KeyRequest {
        key_pem: Secret::new(key.serialize_pem()),
        csr_pem: csr.pem()?,
        csr_sha256: <sha2::Sha256 as sha2::Digest>::digest(csr.der()).into(),
    })
}

/// Checks that `cert_pem` certifies the key of `key_pem` for `agent_id`.
pub fn check_issued(cert_pem: &str, key_pem: &Secret, agent_id: &str) -> Result<CertInfo, String> {
    let info = cert_info(cert_pem)?;
    let key = KeyPair::from_pem(key_pem.expose()).map_err(|e| format!("own key unreadable: {e}"))?;
    if key.public_key_raw() != info.public_key.as_slice() {
        return Err("the issued certificate is not for our key".into());
    }
    if info.agent_id != agent_id {
        return Err(format!(
            "the issued certificate names {:?}, not {agent_id:?}",
            info.agent_id
        ));
    }
    Ok(info)
}

/// Stores the result of an enrollment.
pub fn store_enrollment(state_dir: &Path, key_pem: &Secret, cert_pem: &str, ca_pem: &str) -> Result<(), PkiError> {
    let p = Paths::new(state_dir);
    fsutil::create_dir(&p.dir, 0o700).map_err(io(&p.dir))?;
    fsutil::write_private(&p.key, key_pem.expose().as_bytes()).map_err(io(&p.key))?;
    fsutil::write_public(&p.cert, cert_pem.as_bytes()).map_err(io(&p.cert))?;
    fsutil::write_public(&p.ca, ca_pem.as_bytes()).map_err(io(&p.ca))?;
    Ok(())
}

/// Records whether the server assigned the enrolled ID (enrollment by key), so
/// that it differing from the host-derived ID is expected.
pub fn mark_assigned_id(state_dir: &Path, assigned: bool) -> Result<(), PkiError> {
    let p = Paths::new(state_dir).dir.join(ASSIGNED_ID);
    if assigned {
        fsutil::write_private(&p, b"enrolled by key\n").map_err(io(&p))
    } else {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&p)(e)),
            _ => Ok(()),
        }
    }
}

/// Whether the enrolled ID was assigned by the server.
pub fn id_assigned(state_dir: &Path) -> bool {
    Paths::new(state_dir).dir.join(ASSIGNED_ID).exists()
}

/// Stores a renewed key and certificate (see the module docs for the order).
pub fn store_renewal(state_dir: &Path, key_pem: &Secret, cert_pem: &str) -> Result<(), PkiError> {
    let p = Paths::new(state_dir);
    fsutil::write_private(&p.key_new, key_pem.expose().as_bytes()).map_err(io(&p.key_new))?;
    fsutil::write_public(&p.cert_new, cert_pem.as_bytes()).map_err(io(&p.cert_new))?;
    recover(&p)
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::{BasicConstraints, IsCa, Issuer};

    use super::*;

    /// A throwaway CA that signs CSRs, for tests.
    pub(crate) fn sign(csr_pem: &str) -> (String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let req = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        (req.signed_by(&issuer).unwrap().pem(), ca_cert.pem())
    }

    #[test]
    fn enrollment_then_interrupted_renewal_recovers() {
        let state = tempfile::tempdir().unwrap();
        let first = new_key_request("a1").unwrap();
        let (cert, ca) = sign(&first.csr_pem);
        check_issued(&cert, &first.key_pem, "a1").unwrap();
        store_enrollment(state.path(), &first.key_pem, &cert, &ca).unwrap();
        let id = load(state.path()).unwrap();
        assert_eq!(id.info.agent_id, "a1");
        assert!(!format!("{id:?}").contains("PRIVATE"));

        // A renewal that died after writing both new files but before renaming.
        let second = new_key_request("a1").unwrap();
        let (cert2, _) = sign(&second.csr_pem);
        let p = Paths::new(state.path());
        std::fs::write(&p.key_new, second.key_pem.expose()).unwrap();
        std::fs::write(&p.cert_new, &cert2).unwrap();
        let id2 = load(state.path()).unwrap();
        assert_ne!(id2.info.serial, id.info.serial);
        assert!(!p.cert_new.exists() && !p.key_new.exists());

        // A certificate for another key is refused.
        assert!(check_issued(&cert, &second.key_pem, "a1").is_err());
        assert!(check_issued(&cert2, &second.key_pem, "a2").is_err());
    }

    #[test]
    fn not_enrolled_is_named() {
        let state = tempfile::tempdir().unwrap();
        assert!(matches!(load(state.path()), Err(PkiError::NotEnrolled(_))));
    }
}
