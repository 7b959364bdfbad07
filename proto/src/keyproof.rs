//! The proof that an enrolling host knows its agent key, without sending it.
//!
//! `HMAC-SHA256(key, "keel-enroll-v1\0" || nonce || sha256(CSR DER))`, where `key`
//! is the agent key's UTF-8 bytes, `nonce` the server's one-time challenge and the
//! CSR the one the host enrolls with. The server never learns the key: the
//! key-request plugin, which looks the key up, checks the proof. Binding the CSR
//! means a proof cannot be replayed with another key pair; the nonce, that it
//! cannot be replayed at all.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Domain separation: a proof for anything else never verifies here.
const CONTEXT: &[u8] = b"keel-enroll-v1\0";

/// Nonce length the server issues, in bytes.
pub const NONCE_BYTES: usize = 32;

fn mac(key: &[u8], nonce: &[u8], csr_sha256: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    let mut m =
        <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    m.update(CONTEXT);
    m.update(nonce);
    m.update(csr_sha256);
    m
}

/// The proof, as lowercase hex.
pub fn prove(key: &str, nonce: &[u8], csr_sha256: &[u8]) -> String {
    hex::encode(mac(key.as_bytes(), nonce, csr_sha256).finalize().into_bytes())
}

/// Whether `proof_hex` is the proof for `key`; compared in constant time. A proof
/// that is not 64 hex digits is simply wrong.
pub fn verify(key: &str, nonce: &[u8], csr_sha256: &[u8], proof_hex: &str) -> bool {
    let Ok(proof) = hex::decode(proof_hex) else {
        return false;
    };
    mac(key.as_bytes(), nonce, csr_sha256).verify_slice(&proof).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_with_its_key_nonce_and_csr() {
        let nonce = [7u8; NONCE_BYTES];
        let csr = [9u8; 32];
        let p = prove("s3cret-key", &nonce, &csr);
        assert_eq!(p.len(), 64);
        assert!(verify("s3cret-key", &nonce, &csr, &p));
        assert!(!verify("s3cret-kez", &nonce, &csr, &p), "another key");
        assert!(!verify("s3cret-key", &[8u8; NONCE_BYTES], &csr, &p), "another nonce");
        assert!(!verify("s3cret-key", &nonce, &[1u8; 32], &p), "another CSR");
        assert!(!verify("s3cret-key", &nonce, &csr, "zz"), "not hex");
        assert!(!verify("s3cret-key", &nonce, &csr, &p[..62]), "truncated");
    }

    #[test]
    fn the_construction_is_fixed() {
        // Computed independently (Python's hmac module): a change of construction
        // is a breaking change and must show here.
        assert_eq!(
            prove("key", b"nonce", b"csr"),
            "a753e218e39ef2b376fdd53ba95476598458b29f6d445adfb27b0d75ba08cbf6"
        );
    }
}
