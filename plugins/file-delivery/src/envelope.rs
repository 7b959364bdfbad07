//! The sealed envelope: what a keeper sends to one host's file-delivery plugin,
//! through a server that can read none of it.
//!
//! A delivery is the JSON data of a 6200 task:
//!
//! ```json
//! {"v": 1, "op": "deliver", "name": "nginx/tls.key", "mode": "0600", "readers": ["www-data"],
//!  "digest": "<hex>", "version": 1763800000000, "host_key": "<hex>", "keeper": "<hex>",
//!  "enc": "<base64>", "ciphertext": "<base64>", "signature": "<base64>"}
//! ```
//!
//! - The content is sealed with HPKE (RFC 9180, base mode, DHKEM(X25519,
//!   HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305) to the host's X25519 key
//!   `host_key`, with the [header](Header::bytes) as associated data. The plaintext
//!   is the 32-byte digest key followed by the file.
//! - `digest` is HMAC-SHA256 of the file under the digest key, which the keeper
//!   derives from its own key and the host key and which only the host learns. The
//!   host reports these digests so that the keeper sends a file only when it is
//!   missing or changed, and the server, which sees them, never holds a plain hash
//!   of a secret that it could test guesses against.
//! - `signature` is the keeper's Ed25519 signature over the header and the SHA-256
//!   of `enc` and `ciphertext`. The host accepts only keeper keys from its local
//!   configuration, which the server cannot change.
//! - `version` only grows: a host refuses a delivery or removal older than the one
//!   it holds for the name, so a replayed old secret is refused.
//!
//! A removal (6202) is the same object with `"op": "remove"`, no `digest`, `mode`,
//! `readers`, `enc` or `ciphertext`.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hmac::{Hmac, KeyInit, Mac};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use keel_common::keys::ed25519_public;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The envelope format this code speaks.
pub const FORMAT: u32 = 1;
/// The largest file a delivery carries. An envelope larger than a task travels in
/// pieces ([`crate::bundle`]).
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// The most readers a file can name.
pub const MAX_READERS: usize = 16;
/// The most path components a name has.
pub const MAX_DEPTH: usize = 8;
/// HPKE `info`: binds every sealed file to this use.
const INFO: &[u8] = b"keel file-delivery v1";
/// What the digest key is derived for.
const DIGEST_LABEL: &[u8] = b"keel file-delivery digest key v1";
/// Permission bits a delivered file may have: read and write for the owner, read
/// for group and others; never execute, set-ID or sticky.
pub const MODE_ALLOWED: u32 = 0o644;

type HmacSha256 = Hmac<Sha256>;

/// The operation an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Write the file (6200).
    Deliver,
    /// Remove the file (6202).
    Remove,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Deliver => "deliver",
            Op::Remove => "remove",
        }
    }
}

/// The envelope as it travels (the task's JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Format, [`FORMAT`].
    pub v: u32,
    /// Deliver or remove.
    pub op: Op,
    /// Where the file goes, relative to the host's files directory.
    pub name: String,
    /// Permission bits, octal (`"0600"`); deliveries only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    /// Local users allowed to fetch the file from the local file server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readers: Vec<String>,
    /// HMAC-SHA256 of the content under the digest key, hex; deliveries only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Grows with every change of the name (the keeper uses Unix milliseconds).
    pub version: u64,
    /// The host's X25519 public key, hex.
    pub host_key: String,
    /// The keeper's Ed25519 public key, hex.
    pub keeper: String,
    /// HPKE encapsulated key, base64; deliveries only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub enc: String,
    /// Sealed digest key and content, base64; deliveries only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ciphertext: String,
    /// Ed25519 signature, base64.
    pub signature: String,
}

/// What an envelope is refused for. Every message names the field or the check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not the JSON of an envelope.
    #[error("not a file-delivery envelope: {0}")]
    Json(String),
    /// Another format version.
    #[error("envelope format {0} is not supported (this host speaks {FORMAT})")]
    Format(u32),
    /// A field fails its syntax check.
    #[error("{field}: {message}")]
    Field {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The keeper key is not one this host trusts.
    #[error("signed by keeper key {0}, which is not among this host's keeper_keys")]
    UntrustedKeeper(String),
    /// Sealed for another host.
    #[error("sealed for host key {0}, not this host's")]
    OtherHost(String),
    /// The signature does not verify.
    #[error("the keeper's signature does not verify: the envelope was changed after signing")]
    BadSignature,
    /// Decryption failed.
    #[error("the content does not decrypt with this host's key")]
    Decrypt,
    /// The content does not match its digest.
    #[error("the content does not match its digest")]
    Digest,
    /// Too large.
    #[error("the content is {0} bytes; at most {MAX_FILE_BYTES} are delivered")]
    TooLarge(usize),
}

fn field(field: &'static str, message: impl Into<String>) -> EnvelopeError {
    EnvelopeError::Field {
        field,
        message: message.into(),
    }
}

/// Checks a file name: 1-`MAX_DEPTH` components of 1-64 characters of
/// `[A-Za-z0-9._-]`, none `.` or `..` or starting with `.`, joined by single `/`.
/// Nothing absolute, nothing that climbs out, no hidden names (the plugin's own
/// temporary files start with `.`).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.starts_with('/') {
        return Err(format!(
            "{name:?} is absolute; names are relative to the files directory"
        ));
    }
    let parts: Vec<&str> = name.split('/').collect();
    if parts.len() > MAX_DEPTH {
        return Err(format!("{name:?} has more than {MAX_DEPTH} components"));
    }
    for part in parts {
        if part.is_empty() {
            return Err(format!("{name:?} has an empty component"));
        }
        if part == "." || part == ".." {
            return Err(format!("{name:?} has a {part:?} component"));
        }
        if part.starts_with('.') {
            return Err(format!("{name:?}: components must not start with '.'"));
        }
        if part.len() > 64 {
            return Err(format!("{name:?}: a component is longer than 64 characters"));
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!("{name:?}: {c:?} is not allowed (only A-Z a-z 0-9 . _ - and /)"));
        }
    }
    Ok(())
}

/// Parses permission bits: octal digits only (no sign), within [`MODE_ALLOWED`].
pub fn parse_mode(mode: &str) -> Result<u32, String> {
    let octal = mode.bytes().all(|b| matches!(b, b'0'..=b'7'));
    let bits = u32::from_str_radix(mode, 8)
        .ok()
        .filter(|_| octal)
        .ok_or_else(|| format!("{mode:?} is not an octal mode such as 0600"))?;
    if mode.is_empty() || mode.len() > 4 || bits & !MODE_ALLOWED != 0 {
        return Err(format!(
            "{mode:?} is not allowed: at most {MODE_ALLOWED:04o} (no execute, set-ID, sticky or group/other write)"
        ));
    }
    if bits & 0o600 == 0 {
        return Err(format!("{mode:?} leaves the owner without read or write"));
    }
    Ok(bits)
}

/// Checks a reader: a user name (`[a-z_][a-z0-9_-]*`, at most 32 characters) or a
/// numeric user ID.
pub fn check_reader(reader: &str) -> Result<(), String> {
    let ok = if reader.bytes().all(|b| b.is_ascii_digit()) {
        !reader.is_empty() && reader.len() <= 10 && reader.parse::<u32>().is_ok()
    } else {
        let mut bytes = reader.bytes();
        matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
            && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
            && reader.len() <= 32
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{reader:?} is neither a user name nor a numeric user ID"))
    }
}

fn hex32(what: &'static str, s: &str) -> Result<[u8; 32], EnvelopeError> {
    hex::decode(s)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| field(what, "not 32 bytes of hex"))
}

fn b64(what: &'static str, s: &str) -> Result<Vec<u8>, EnvelopeError> {
    B64.decode(s).map_err(|e| field(what, format!("not base64: {e}")))
}

/// HMAC-SHA256 of `content` under `key`, hex.
pub fn digest(key: &[u8; 32], content: &[u8]) -> String {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(content);
    hex::encode(mac.finalize().into_bytes())
}

impl Envelope {
    /// Parses and checks the syntax of every field. Says nothing of trust: that is
    /// [`Envelope::open`]'s job.
    pub fn parse(json: &str) -> Result<Envelope, EnvelopeError> {
        let env: Envelope = serde_json::from_str(json).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        if env.v != FORMAT {
            return Err(EnvelopeError::Format(env.v));
        }
        check_name(&env.name).map_err(|m| field("name", m))?;
        if env.version == 0 {
            return Err(field("version", "must be greater than 0"));
        }
        hex32("host_key", &env.host_key)?;
        hex32("keeper", &env.keeper)?;
        match env.op {
            Op::Deliver => {
                parse_mode(&env.mode).map_err(|m| field("mode", m))?;
                if env.readers.len() > MAX_READERS {
                    return Err(field("readers", format!("more than {MAX_READERS}")));
                }
                for r in &env.readers {
                    check_reader(r).map_err(|m| field("readers", m))?;
                }
                hex32("digest", &env.digest)?;
                if env.enc.is_empty() || env.ciphertext.is_empty() {
                    return Err(field("ciphertext", "a delivery needs enc and ciphertext"));
                }
            }
            Op::Remove => {
                if !(env.mode.is_empty()
                    && env.readers.is_empty()
                    && env.digest.is_empty()
                    && env.enc.is_empty()
                    && env.ciphertext.is_empty())
                {
                    return Err(field("op", "a removal carries no mode, readers, digest or content"));
                }
            }
        }
        Ok(env)
    }

    /// The signed and authenticated header: every field but the sealed parts and
    /// the signature, each length-prefixed, so that no two envelopes share one.
    fn header(&self) -> Vec<u8> {
        let mut out = b"keel-file-delivery\0".to_vec();
        let version = self.version.to_string();
        let readers = self.readers.join(",");
        let format = self.v.to_string();
        for part in [
            format.as_str(),
            self.op.as_str(),
            &self.name,
            &self.mode,
            &readers,
            &self.digest,
            &version,
            &self.host_key,
            &self.keeper,
        ] {
            out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }

    /// What the keeper signs: the header and the SHA-256 of the sealed parts.
    fn signed_message(&self) -> Vec<u8> {
        let mut msg = self.header();
        let mut h = Sha256::new();
        h.update(self.enc.as_bytes());
        h.update([0]);
        h.update(self.ciphertext.as_bytes());
        msg.extend_from_slice(&h.finalize());
        msg
    }

    /// Checks trust and opens the envelope: the keeper key is among `trusted`, the
    /// host key is `host`'s, the signature verifies, and (for a delivery) the
    /// content decrypts and matches its digest.
    pub fn open(&self, trusted: &[VerifyingKey], host: &HostKey) -> Result<Opened, EnvelopeError> {
        let keeper = ed25519_public(&self.keeper).map_err(|m| field("keeper", m))?;
        if !trusted.contains(&keeper) {
            return Err(EnvelopeError::UntrustedKeeper(self.keeper.clone()));
        }
        if self.host_key != host.public_hex() {
            return Err(EnvelopeError::OtherHost(self.host_key.clone()));
        }
        let sig = b64("signature", &self.signature)?;
        let sig = Signature::from_slice(&sig).map_err(|_| field("signature", "not 64 bytes"))?;
        keeper
            .verify_strict(&self.signed_message(), &sig)
            .map_err(|_| EnvelopeError::BadSignature)?;
        if self.op == Op::Remove {
            return Ok(Opened {
                content: Vec::new(),
                digest_key: [0; 32],
            });
        }
        let enc = b64("enc", &self.enc)?;
        let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(&enc)
            .map_err(|_| field("enc", "not an X25519 encapsulated key"))?;
        let sealed = b64("ciphertext", &self.ciphertext)?;
        if sealed.len() > MAX_FILE_BYTES + 32 + 16 {
            return Err(EnvelopeError::TooLarge(sealed.len().saturating_sub(48)));
        }
        let mut plain = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &host.secret,
            &enc,
            INFO,
            &sealed,
            &self.header(),
        )
        .map_err(|_| EnvelopeError::Decrypt)?;
        if plain.len() < 32 {
            return Err(EnvelopeError::Decrypt);
        }
        let content = plain.split_off(32);
        let digest_key: [u8; 32] = plain.try_into().map_err(|_| EnvelopeError::Decrypt)?;
        if digest(&digest_key, &content) != self.digest {
            return Err(EnvelopeError::Digest);
        }
        Ok(Opened { content, digest_key })
    }
}

/// An opened delivery. `Debug` shows sizes only.
pub struct Opened {
    /// The file.
    pub content: Vec<u8>,
    /// The key of the file's digest.
    pub digest_key: [u8; 32],
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Opened {{ content: <{} bytes>, digest_key: <redacted> }}",
            self.content.len()
        )
    }
}

/// A host's X25519 key pair. `Debug` shows the public half only.
#[derive(Clone)]
pub struct HostKey {
    secret: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: <X25519HkdfSha256 as hpke::Kem>::PublicKey,
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostKey {{ public: {}, secret: <redacted> }}", self.public_hex())
    }
}

impl HostKey {
    /// A new random key pair.
    pub fn generate() -> HostKey {
        let (secret, public) = X25519HkdfSha256::gen_keypair();
        HostKey { secret, public }
    }

    /// The key pair of a stored secret key.
    pub fn from_secret(bytes: &[u8]) -> Result<HostKey, String> {
        let secret =
            <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(bytes).map_err(|_| "not an X25519 secret key")?;
        let public = X25519HkdfSha256::sk_to_pk(&secret);
        Ok(HostKey { secret, public })
    }

    /// The secret key's bytes, to store.
    pub fn secret_bytes(&self) -> Vec<u8> {
        self.secret.to_bytes().to_vec()
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.public.to_bytes())
    }
}

/// A keeper: the operator's Ed25519 key. `Debug` shows the public half only.
pub struct Keeper {
    key: SigningKey,
}

impl fmt::Debug for Keeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keeper {{ public: {}, secret: <redacted> }}", self.public_hex())
    }
}

/// What to deliver.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// Name under the files directory.
    pub name: String,
    /// Permission bits, octal.
    pub mode: String,
    /// Local readers through the file server.
    pub readers: Vec<String>,
}

impl Keeper {
    /// A new random key; returns it with its 32-byte seed, to store.
    pub fn generate() -> Result<(Keeper, [u8; 32]), String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("no entropy: {e}"))?;
        Ok((Keeper::from_seed(&seed), seed))
    }

    /// The keeper of a stored seed.
    pub fn from_seed(seed: &[u8; 32]) -> Keeper {
        Keeper {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// The public key, hex: what hosts list in `keeper_keys`.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// The digest key for one host: only this keeper and that host know it.
    pub fn digest_key(&self, host_key: &str) -> [u8; 32] {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(self.key.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key"));
        mac.update(DIGEST_LABEL);
        mac.update(host_key.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The digest a host reports for `content` delivered by this keeper.
    pub fn digest_for(&self, host_key: &str, content: &[u8]) -> String {
        digest(&self.digest_key(host_key), content)
    }

    /// Seals `content` for the host with public key `host_key` (hex).
    pub fn seal(&self, host_key: &str, spec: &FileSpec, content: &[u8], version: u64) -> Result<Envelope, String> {
        check_name(&spec.name).map_err(|m| format!("name: {m}"))?;
        parse_mode(&spec.mode).map_err(|m| format!("mode: {m}"))?;
        if spec.readers.len() > MAX_READERS {
            return Err(format!("readers: more than {MAX_READERS}"));
        }
        for r in &spec.readers {
            check_reader(r).map_err(|m| format!("readers: {m}"))?;
        }
        if content.len() > MAX_FILE_BYTES {
            return Err(EnvelopeError::TooLarge(content.len()).to_string());
        }
        let host_bytes = hex32("host_key", host_key).map_err(|e| e.to_string())?;
        let host = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(&host_bytes)
            .map_err(|_| "host_key: not an X25519 public key".to_owned())?;
        let digest_key = self.digest_key(host_key);
        let mut env = Envelope {
            v: FORMAT,
            op: Op::Deliver,
            name: spec.name.clone(),
            mode: spec.mode.clone(),
            readers: spec.readers.clone(),
            digest: digest(&digest_key, content),
            version,
            host_key: host_key.to_owned(),
            keeper: self.public_hex(),
            enc: String::new(),
            ciphertext: String::new(),
            signature: String::new(),
        };
        let mut plain = Vec::with_capacity(32 + content.len());
        plain.extend_from_slice(&digest_key);
        plain.extend_from_slice(content);
        let (enc, sealed) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeS::Base,
            &host,
            INFO,
            &plain,
            &env.header(),
        )
        .map_err(|e| format!("sealing failed: {e}"))?;
        env.enc = B64.encode(enc.to_bytes());
        env.ciphertext = B64.encode(sealed);
        env.signature = B64.encode(self.key.sign(&env.signed_message()).to_bytes());
        Ok(env)
    }

    /// A signed removal of `name` for the host with public key `host_key`.
    pub fn removal(&self, host_key: &str, name: &str, version: u64) -> Result<Envelope, String> {
        check_name(name).map_err(|m| format!("name: {m}"))?;
        hex32("host_key", host_key).map_err(|e| e.to_string())?;
        let mut env = Envelope {
            v: FORMAT,
            op: Op::Remove,
            name: name.to_owned(),
            mode: String::new(),
            readers: Vec::new(),
            digest: String::new(),
            version,
            host_key: host_key.to_owned(),
            keeper: self.public_hex(),
            enc: String::new(),
            ciphertext: String::new(),
            signature: String::new(),
        };
        env.signature = B64.encode(self.key.sign(&env.signed_message()).to_bytes());
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(name: &str) -> FileSpec {
        FileSpec {
            name: name.into(),
            mode: "0640".into(),
            readers: vec!["www-data".into(), "1000".into()],
        }
    }

    fn sealed() -> (Keeper, HostKey, Envelope) {
        let keeper = Keeper::from_seed(&[1; 32]);
        let host = HostKey::generate();
        let env = keeper
            .seal(&host.public_hex(), &spec("nginx/tls.key"), b"-----BEGIN KEY-----", 7)
            .unwrap();
        (keeper, host, env)
    }

    fn trusted(k: &Keeper) -> Vec<VerifyingKey> {
        vec![ed25519_public(&k.public_hex()).unwrap()]
    }

    #[test]
    fn a_sealed_file_opens_on_its_host_only() {
        let (keeper, host, env) = sealed();
        let json = serde_json::to_string(&env).unwrap();
        assert!(!json.contains("BEGIN KEY"), "the content travels sealed");
        let parsed = Envelope::parse(&json).unwrap();
        let opened = parsed.open(&trusted(&keeper), &host).unwrap();
        assert_eq!(opened.content, b"-----BEGIN KEY-----");
        assert_eq!(opened.digest_key, keeper.digest_key(&host.public_hex()));
        assert_eq!(
            env.digest,
            keeper.digest_for(&host.public_hex(), b"-----BEGIN KEY-----")
        );
        assert!(!format!("{opened:?}").contains("BEGIN"));

        let other = HostKey::generate();
        assert_eq!(
            parsed.open(&trusted(&keeper), &other).unwrap_err(),
            EnvelopeError::OtherHost(host.public_hex())
        );
        // Relabelled for the other host: the signature no longer holds.
        let mut moved = parsed.clone();
        moved.host_key = other.public_hex();
        assert_eq!(
            moved.open(&trusted(&keeper), &other).unwrap_err(),
            EnvelopeError::BadSignature
        );
    }

    #[test]
    fn only_pinned_keepers_are_believed() {
        let (_, host, env) = sealed();
        let stranger = Keeper::from_seed(&[2; 32]);
        assert_eq!(
            env.open(&trusted(&stranger), &host).unwrap_err(),
            EnvelopeError::UntrustedKeeper(env.keeper.clone())
        );
        assert!(matches!(
            env.open(&[], &host).unwrap_err(),
            EnvelopeError::UntrustedKeeper(_)
        ));
        // A stranger's envelope that claims the trusted keeper's key.
        let (keeper, _, _) = sealed();
        let mut forged = stranger
            .seal(&host.public_hex(), &spec("nginx/tls.key"), b"evil", 8)
            .unwrap();
        forged.keeper = keeper.public_hex();
        assert_eq!(
            forged.open(&trusted(&keeper), &host).unwrap_err(),
            EnvelopeError::BadSignature
        );
    }

    #[test]
    fn every_signed_field_is_covered() {
        let (keeper, host, env) = sealed();
        type Change = fn(&mut Envelope);
        let changes: [(&str, Change); 7] = [
            ("name", |e| e.name = "nginx/other.key".into()),
            ("mode", |e| e.mode = "0644".into()),
            ("readers", |e| e.readers.push("mallory".into())),
            ("version", |e| e.version += 1),
            ("digest", |e| e.digest = "00".repeat(32)),
            ("ciphertext", |e| e.ciphertext = B64.encode(vec![0u8; 80])),
            ("op", |e| e.op = Op::Remove),
        ];
        for (what, change) in changes {
            let mut e = env.clone();
            change(&mut e);
            assert_eq!(
                e.open(&trusted(&keeper), &host).unwrap_err(),
                EnvelopeError::BadSignature,
                "{what}"
            );
        }
    }

    #[test]
    fn removals_are_signed_too() {
        let keeper = Keeper::from_seed(&[1; 32]);
        let host = HostKey::generate();
        let env = keeper.removal(&host.public_hex(), "a/b", 9).unwrap();
        let parsed = Envelope::parse(&serde_json::to_string(&env).unwrap()).unwrap();
        assert_eq!(parsed.op, Op::Remove);
        parsed.open(&trusted(&keeper), &host).unwrap();
        let mut e = parsed.clone();
        e.name = "a/c".into();
        assert_eq!(
            e.open(&trusted(&keeper), &host).unwrap_err(),
            EnvelopeError::BadSignature
        );
        let mut e = parsed;
        e.mode = "0600".into();
        let e = Envelope::parse(&serde_json::to_string(&e).unwrap()).unwrap_err();
        assert!(e.to_string().starts_with("op: a removal carries no"), "{e}");
    }

    #[test]
    fn names_that_escape_or_hide_are_refused() {
        for good in ["tls.key", "nginx/tls.key", "a-b_c.d/e", "a/b/c/d/e/f/g/h"] {
            check_name(good).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/shadow", "absolute"),
            ("../etc/shadow", "\"..\" component"),
            ("a/../../etc/shadow", "\"..\" component"),
            ("a/./b", "\".\" component"),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            (".tmp-1", "must not start with '.'"),
            ("a/.ssh", "must not start with '.'"),
            ("a\\b", "not allowed"),
            ("a b", "not allowed"),
            ("a\0b", "not allowed"),
            ("naïve", "not allowed"),
            ("a/b/c/d/e/f/g/h/i", "more than 8"),
        ] {
            let e = check_name(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(check_name(&"x".repeat(65)).unwrap_err().contains("longer than 64"));
    }

    #[test]
    fn modes_readers_and_sizes_are_bounded() {
        assert_eq!(parse_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_mode("644").unwrap(), 0o644);
        assert_eq!(parse_mode("0400").unwrap(), 0o400);
        // "+600" was taken by the standard parser's sign (found by the fuzz review).
        for bad in [
            "0755", "4600", "0666", "0620", "1600", "rw", "", "00600", "0040", "+600", "+0600",
        ] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
        for good in ["www-data", "_svc", "postgres", "0", "65534"] {
            check_reader(good).unwrap();
        }
        for bad in ["Root", "-x", "a b", "a:b", "99999999999", ""] {
            assert!(check_reader(bad).is_err(), "{bad:?}");
        }
        let keeper = Keeper::from_seed(&[1; 32]);
        let host = HostKey::generate();
        let big = vec![0u8; MAX_FILE_BYTES + 1];
        let e = keeper.seal(&host.public_hex(), &spec("big"), &big, 1).unwrap_err();
        assert!(e.contains("at most 16777216"), "{e}");
        let env = keeper
            .seal(&host.public_hex(), &spec("max"), &big[..MAX_FILE_BYTES], 1)
            .unwrap();
        let json = serde_json::to_string(&env).unwrap();
        assert!(
            json.len() <= crate::bundle::MAX_ENVELOPE_BYTES,
            "the largest delivery fits an upload: {}",
            json.len()
        );
    }

    #[test]
    fn malformed_envelopes_name_the_field() {
        let (_, _, env) = sealed();
        let good = serde_json::to_value(&env).unwrap();
        for (key, value, want) in [
            ("v", serde_json::json!(2), "envelope format 2 is not supported"),
            ("name", serde_json::json!("../x"), "name: "),
            ("mode", serde_json::json!("4755"), "mode: "),
            ("readers", serde_json::json!(["Bad Name"]), "readers: "),
            ("digest", serde_json::json!("zz"), "digest: not 32 bytes of hex"),
            ("host_key", serde_json::json!("00"), "host_key: not 32 bytes of hex"),
            ("keeper", serde_json::json!(""), "keeper: not 32 bytes of hex"),
            ("version", serde_json::json!(0), "version: must be greater than 0"),
            ("extra", serde_json::json!(1), "unknown field `extra`"),
        ] {
            let mut v = good.clone();
            v[key] = value;
            let e = Envelope::parse(&v.to_string()).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
        }
        assert!(
            Envelope::parse("not json")
                .unwrap_err()
                .to_string()
                .starts_with("not a file-delivery envelope")
        );
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let (keeper, host, _) = sealed();
        let k = format!("{keeper:?}");
        assert!(k.contains(&keeper.public_hex()) && k.contains("redacted"), "{k}");
        assert!(!k.contains(&hex::encode([1u8; 32])));
        let h = format!("{host:?}");
        assert!(!h.contains(&hex::encode(host.secret_bytes())), "{h}");
        assert_eq!(
            HostKey::from_secret(&host.secret_bytes()).unwrap().public_hex(),
            host.public_hex()
        );
    }
}
