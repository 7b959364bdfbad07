//! The release key: Ed25519 signatures over plugin and agent packages. Agents pin
//! the public key in `agent.toml` and refuse packages it does not verify.
//!
//! `release.key` holds the 32-byte seed in hex (mode 0600); `release.pub` the
//! public key in hex.

use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::ServerConfig;

/// Signing key file name in the PKI directory.
pub const KEY_FILE: &str = "release.key";
/// Public key file name in the PKI directory.
pub const PUB_FILE: &str = "release.pub";

/// A release key problem.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// `release-key` would overwrite a key.
    #[error("a release key already exists at {0}; refusing to overwrite it")]
    Exists(PathBuf),
    /// A key file is unreadable or malformed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Randomness or I/O failed.
    #[error("{0}")]
    Io(String),
}

/// The server's signing and/or verifying key. `Debug` shows only the public key.
#[derive(Clone, Default)]
pub struct Release {
    signer: Option<SigningKey>,
    public: Option<VerifyingKey>,
}

impl fmt::Debug for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Release")
            .field("public_key", &self.public_hex())
            .field("can_sign", &self.signer.is_some())
            .finish()
    }
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Not hex of 64 bytes.
    #[error("signature must be 128 hex digits")]
    Malformed,
    /// Does not verify.
    #[error("signature does not verify against the release key")]
    Mismatch,
    /// No key to check with or sign with.
    #[error("no signature given and the server holds no release signing key (keel-server ca release-key)")]
    NoKey,
}

/// Creates `release.key` and `release.pub` in `dir`. Returns the public key, hex.
pub fn generate(dir: &Path) -> Result<String, ReleaseError> {
    keel_common::fsutil::create_dir(dir, 0o700).map_err(|e| ReleaseError::Io(format!("{}: {e}", dir.display())))?;
    generate_pair(&dir.join(KEY_FILE), &dir.join(PUB_FILE))
}

/// Creates an Ed25519 key: its hex seed in `key_path` (0600, never overwritten)
/// and its hex public key in `pub_path`. Returns the public key, hex. Keepers of
/// file-delivery use the same format.
pub fn generate_pair(key_path: &Path, pub_path: &Path) -> Result<String, ReleaseError> {
    if key_path.exists() {
        return Err(ReleaseError::Exists(key_path.to_owned()));
    }
    let mut seed = [0u8; 32];
    SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| ReleaseError::Io("no entropy".into()))?;
    let key = SigningKey::from_bytes(&seed);
    keel_common::fsutil::write_private(key_path, format!("{}\n", hex::encode(seed)).as_bytes())
        .map_err(|e| ReleaseError::Io(format!("{}: {e}", key_path.display())))?;
    let public = hex::encode(key.verifying_key().to_bytes());
    keel_common::fsutil::write_public(pub_path, format!("{public}\n").as_bytes())
        .map_err(|e| ReleaseError::Io(format!("{}: {e}", pub_path.display())))?;
    Ok(public)
}

impl Release {
    /// Loads the key the configuration names (or the default file, if present).
    pub fn load(config: &ServerConfig) -> Result<Self, ReleaseError> {
        let default = config.pki_dir().join(KEY_FILE);
        let path = match &config.release.signing_key {
            Some(p) => Some(p.clone()),
            None => default.exists().then_some(default),
        };
        let signer = match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| ReleaseError::Invalid {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| ReleaseError::Invalid {
                        path: path.clone(),
                        message: "not a 32-byte hex seed".into(),
                    })?;
                Some(SigningKey::from_bytes(&seed))
            }
            None => None,
        };
        let public = match (&signer, config.release.public_key.as_str()) {
            (Some(s), _) => Some(s.verifying_key()),
            (None, "") => None,
            (None, hex_key) => Some(
                keel_common::keys::ed25519_public(hex_key).map_err(|m| ReleaseError::Invalid {
                    path: PathBuf::from("release.public_key"),
                    message: m,
                })?,
            ),
        };
        Ok(Self { signer, public })
    }

    /// The public key in hex, if any.
    pub fn public_hex(&self) -> Option<String> {
        self.public.map(|k| hex::encode(k.to_bytes()))
    }

    /// Checks a supplied signature, or signs when none is supplied.
    pub fn signature_for(&self, package: &[u8], supplied: Option<&str>) -> Result<String, SignatureError> {
        match supplied {
            Some(sig) => {
                let raw: [u8; 64] = hex::decode(sig.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or(SignatureError::Malformed)?;
                let public = self.public.ok_or(SignatureError::NoKey)?;
                public
                    .verify_strict(package, &Signature::from_bytes(&raw))
                    .map_err(|_| SignatureError::Mismatch)?;
                Ok(sig.trim().to_ascii_lowercase())
            }
            None => {
                let signer = self.signer.as_ref().ok_or(SignatureError::NoKey)?;
                Ok(hex::encode(signer.sign(package).to_bytes()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_then_verify_and_refuse_forgeries() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::from_toml("t", "").unwrap();
        config.pki.dir = Some(dir.path().to_path_buf());
        let public = generate(dir.path()).unwrap();
        assert!(matches!(generate(dir.path()), Err(ReleaseError::Exists(_))));
        let r = Release::load(&config).unwrap();
        assert_eq!(r.public_hex().as_deref(), Some(public.as_str()));
        assert!(
            !format!("{r:?}").contains(
                &std::fs::read_to_string(dir.path().join(KEY_FILE))
                    .unwrap()
                    .trim()
                    .to_owned()
            )
        );
        let sig = r.signature_for(b"pkg", None).unwrap();
        assert_eq!(r.signature_for(b"pkg", Some(&sig)).unwrap(), sig);
        assert_eq!(r.signature_for(b"other", Some(&sig)), Err(SignatureError::Mismatch));
        assert_eq!(r.signature_for(b"pkg", Some("abc")), Err(SignatureError::Malformed));

        // A server that only knows the public key verifies but cannot sign.
        let mut verify_only = ServerConfig::from_toml("t", &format!("[release]\npublic_key = \"{public}\"\n")).unwrap();
        verify_only.pki.dir = Some(tempfile::tempdir().unwrap().path().to_path_buf());
        let r = Release::load(&verify_only).unwrap();
        assert_eq!(r.signature_for(b"pkg", Some(&sig)).unwrap(), sig);
        assert_eq!(r.signature_for(b"pkg", None), Err(SignatureError::NoKey));
    }
}
