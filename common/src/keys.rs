//! Ed25519 public keys written as 64 hex digits, the one form every Keel
//! configuration file, CLI flag and package header uses.

use ed25519_dalek::VerifyingKey;

/// Parses a hex Ed25519 public key (surrounding white space allowed), naming
/// what was wrong with it.
pub fn ed25519_public(hex_key: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .map_err(|e| format!("not hex: {e}"))?
        .try_into()
        .map_err(|b: Vec<u8>| format!("must be 32 bytes, not {}", b.len()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_parses_and_every_refusal_says_why() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key();
        let hex_key = hex::encode(key.to_bytes());
        assert_eq!(ed25519_public(&format!(" {hex_key}\n")).unwrap(), key);
        assert!(ed25519_public("zz").unwrap_err().starts_with("not hex"));
        assert_eq!(ed25519_public("abcd").unwrap_err(), "must be 32 bytes, not 2");
        // y = 2 is not on the curve.
        let mut off = [0u8; 32];
        off[0] = 2;
        assert!(
            ed25519_public(&hex::encode(off))
                .unwrap_err()
                .starts_with("not an Ed25519 public key")
        );
    }
}
