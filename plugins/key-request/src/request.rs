//! Tasks for the plugin: parsed and checked before any provider runs, so a value
//! such as `001' OR '1'='1` never reaches a program or a socket.

use std::net::IpAddr;

use keel_proto::data_type::{KEY_LOOKUP, KEY_PROOF};
use keel_proto::keyproof::NONCE_BYTES;
use serde::Deserialize;

/// The longest agent ID a lookup may ask for, in digits.
pub const MAX_ID_DIGITS: usize = 8;
/// The longest IP address a lookup may ask for, in characters (Wazuh's `IPSIZE`).
pub const MAX_IP_CHARS: usize = 19;
/// SHA-256 digests are this many bytes.
pub const SHA256_BYTES: usize = 32;
/// How much of a refused value a message quotes, in characters.
pub const QUOTE_CHARS: usize = 40;

/// What a lookup is by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum By {
    /// The agent ID.
    Id,
    /// The agent's IP address.
    Ip,
}

impl By {
    /// `id` or `ip`, as the providers spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            By::Id => "id",
            By::Ip => "ip",
        }
    }
}

/// A checked lookup: the unit of de-duplication.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lookup {
    /// What the value is.
    pub by: By,
    /// The ID (digits) or IP address, already checked.
    pub value: String,
}

impl Lookup {
    /// Checks `value` for `by`.
    pub fn new(by: By, value: &str) -> Result<Self, RequestError> {
        let ok = match by {
            By::Id => !value.is_empty() && value.len() <= MAX_ID_DIGITS && value.bytes().all(|b| b.is_ascii_digit()),
            By::Ip => value.len() <= MAX_IP_CHARS && value.parse::<IpAddr>().is_ok(),
        };
        if !ok {
            let rule = match by {
                By::Id => format!("must be 1 to {MAX_ID_DIGITS} ASCII digits"),
                By::Ip => format!("must be an IPv4 or IPv6 address of at most {MAX_IP_CHARS} characters"),
            };
            return Err(RequestError::Value(format!(
                "invalid {} {}: {rule}",
                by.as_str(),
                quote(value)
            )));
        }
        Ok(Self {
            by,
            value: value.to_owned(),
        })
    }

    /// The socket request: `id:001` or `ip:10.1.2.3`, as Wazuh sends it.
    pub fn wire(&self) -> String {
        format!("{}:{}", self.by.as_str(), self.value)
    }
}

impl std::fmt::Display for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.by.as_str(), self.value)
    }
}

/// A key-proof check: what the enrolling host sent, to check against the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofCheck {
    /// The server's one-time challenge.
    pub nonce: Vec<u8>,
    /// SHA-256 of the CSR the host enrolls with.
    pub csr_sha256: Vec<u8>,
    /// The host's proof, 64 hex digits.
    pub hmac: String,
}

/// A checked task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The agent to look up.
    pub lookup: Lookup,
    /// For a 6001 task, the proof to check.
    pub proof: Option<ProofCheck>,
}

/// Why a task was refused before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a data_type of this plugin.
    #[error("unknown task data_type {0}: key-request takes {KEY_LOOKUP} (lookup) and {KEY_PROOF} (key-proof check)")]
    DataType(i32),
    /// The task data is not the JSON expected.
    #[error("invalid task data: {0}")]
    Json(String),
    /// A field's value is malformed.
    #[error("{0}")]
    Value(String),
}

/// 6000's data.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "lookup")]
struct LookupData {
    by: By,
    value: String,
}

/// 6001's data.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "key-proof check")]
struct ProofData {
    by: By,
    value: String,
    nonce: String,
    csr_sha256: String,
    hmac: String,
}

fn json<'a, T: Deserialize<'a>>(data: &'a str) -> Result<T, RequestError> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(data)).map_err(|e| {
        let path = e.path().to_string();
        if matches!(path.as_str(), "" | "." | "?") {
            RequestError::Json(e.inner().to_string())
        } else {
            RequestError::Json(format!("{path}: {}", e.inner()))
        }
    })
}

/// Parses and checks a task's data for `data_type`.
pub fn parse(data_type: i32, data: &str) -> Result<Request, RequestError> {
    match data_type {
        KEY_LOOKUP => {
            let d: LookupData = json(data)?;
            Ok(Request {
                lookup: Lookup::new(d.by, &d.value)?,
                proof: None,
            })
        }
        KEY_PROOF => {
            let d: ProofData = json(data)?;
            let lookup = Lookup::new(d.by, &d.value)?;
            let nonce = hex_field("nonce", &d.nonce, NONCE_BYTES)?;
            let csr_sha256 = hex_field("csr_sha256", &d.csr_sha256, SHA256_BYTES)?;
            hex_field("hmac", &d.hmac, SHA256_BYTES)?;
            Ok(Request {
                lookup,
                proof: Some(ProofCheck {
                    nonce,
                    csr_sha256,
                    hmac: d.hmac,
                }),
            })
        }
        other => Err(RequestError::DataType(other)),
    }
}

fn hex_field(name: &str, value: &str, bytes: usize) -> Result<Vec<u8>, RequestError> {
    let digits = 2 * bytes;
    match hex::decode(value) {
        Ok(v) if v.len() == bytes => Ok(v),
        Ok(v) => Err(RequestError::Value(format!(
            "invalid {name}: {} hex digits, must be {digits}",
            2 * v.len()
        ))),
        Err(e) => Err(RequestError::Value(format!("invalid {name}: not hex ({e})"))),
    }
}

/// `value` quoted and escaped for a message, cut at [`QUOTE_CHARS`].
pub fn quote(value: &str) -> String {
    let cut: String = value.chars().take(QUOTE_CHARS).collect();
    if cut.len() < value.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(data_type: i32, data: &str) -> String {
        parse(data_type, data).unwrap_err().to_string()
    }

    #[test]
    fn lookups_by_id_and_ip() {
        let r = parse(KEY_LOOKUP, r#"{"by":"id","value":"001"}"#).unwrap();
        assert_eq!(r.lookup.wire(), "id:001");
        assert!(r.proof.is_none());
        for ip in ["10.1.2.3", "::1", "fe80::1", "2001:db8::42"] {
            let r = parse(KEY_LOOKUP, &format!(r#"{{"by":"ip","value":"{ip}"}}"#)).unwrap();
            assert_eq!(r.lookup.wire(), format!("ip:{ip}"));
        }
        assert_eq!(
            parse(KEY_LOOKUP, r#"{"by":"id","value":"12345678"}"#)
                .unwrap()
                .lookup
                .value,
            "12345678"
        );
    }

    #[test]
    fn injections_and_malformed_values_are_refused() {
        assert_eq!(
            err(KEY_LOOKUP, r#"{"by":"id","value":"001' OR '1'='1"}"#),
            r#"invalid id "001' OR '1'='1": must be 1 to 8 ASCII digits"#
        );
        assert!(err(KEY_LOOKUP, r#"{"by":"id","value":""}"#).starts_with("invalid id \"\""));
        assert!(err(KEY_LOOKUP, r#"{"by":"id","value":"123456789"}"#).contains("1 to 8 ASCII digits"));
        assert!(err(KEY_LOOKUP, r#"{"by":"id","value":"１２"}"#).contains("1 to 8 ASCII digits"));
        assert_eq!(
            err(KEY_LOOKUP, r#"{"by":"ip","value":"10.0.0.1; rm -rf /"}"#),
            r#"invalid ip "10.0.0.1; rm -rf /": must be an IPv4 or IPv6 address of at most 19 characters"#
        );
        assert!(err(KEY_LOOKUP, r#"{"by":"ip","value":"2001:db8:1:2:3:4:5:6"}"#).contains("at most 19"));
        assert!(err(KEY_LOOKUP, r#"{"by":"ip","value":"010.1.2.3"}"#).starts_with("invalid ip"));
        let long = "x".repeat(100);
        assert!(err(KEY_LOOKUP, &format!(r#"{{"by":"id","value":"{long}"}}"#)).contains("xxx\"..."));
    }

    #[test]
    fn json_problems_name_the_field() {
        assert!(err(KEY_LOOKUP, r#"{"by":"id"}"#).starts_with("invalid task data: missing field `value` at line 1"));
        assert!(
            err(KEY_LOOKUP, r#"{"by":"name","value":"a"}"#)
                .starts_with("invalid task data: by: unknown variant `name`")
        );
        assert!(
            err(KEY_LOOKUP, r#"{"by":"id","value":1}"#).starts_with("invalid task data: value: invalid type: integer")
        );
        assert!(err(KEY_LOOKUP, r#"{"by":"id","value":"1","x":2}"#).contains("unknown field `x`"));
        assert!(err(KEY_LOOKUP, "not json").starts_with("invalid task data: expected"));
        assert_eq!(
            err(6050, "{}"),
            "unknown task data_type 6050: key-request takes 6000 (lookup) and 6001 (key-proof check)"
        );
    }

    #[test]
    fn key_proof_fields_are_checked() {
        let nonce = "ab".repeat(NONCE_BYTES);
        let csr = "cd".repeat(32);
        let hmac = "ef".repeat(32);
        let ok = format!(r#"{{"by":"id","value":"001","nonce":"{nonce}","csr_sha256":"{csr}","hmac":"{hmac}"}}"#);
        let r = parse(KEY_PROOF, &ok).unwrap();
        let p = r.proof.unwrap();
        assert_eq!(
            (p.nonce.len(), p.csr_sha256.len(), p.hmac.as_str()),
            (32, 32, hmac.as_str())
        );
        let short = ok.replace(&csr, "cdcd");
        assert_eq!(err(KEY_PROOF, &short), "invalid csr_sha256: 4 hex digits, must be 64");
        let bad = ok.replace(&hmac, &"zz".repeat(32));
        assert!(err(KEY_PROOF, &bad).starts_with("invalid hmac: not hex"));
        let bad = ok.replace(&nonce, "abc");
        assert!(err(KEY_PROOF, &bad).starts_with("invalid nonce: not hex"));
        assert!(err(KEY_PROOF, r#"{"by":"id","value":"001"}"#).starts_with("invalid task data: missing field `nonce`"));
    }
}
