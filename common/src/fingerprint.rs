//! SHA-256 fingerprints of DER certificates, the form operators pin a CA by.

use sha2::{Digest, Sha256};

/// The lowercase hex SHA-256 of `der`.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Normalises a fingerprint as an operator may type it: an optional `sha256:` prefix,
/// colons, any case. Returns `None` unless 64 hex digits remain.
pub fn normalize(input: &str) -> Option<String> {
    let s = input.trim();
    let s = s
        .strip_prefix("sha256:")
        .or_else(|| s.strip_prefix("SHA256:"))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// Whether `s` is exactly `bytes` bytes of lowercase or uppercase hex.
pub fn is_hex(s: &str, bytes: usize) -> bool {
    s.len() == bytes * 2 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_common_spellings() {
        let plain = sha256_hex(b"x");
        let colons = plain
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(normalize(&plain).as_deref(), Some(plain.as_str()));
        assert_eq!(normalize(&format!("SHA256:{colons}")).as_deref(), Some(plain.as_str()));
        assert_eq!(normalize("abc"), None);
        assert_eq!(normalize(&"g".repeat(64)), None);
    }
}
