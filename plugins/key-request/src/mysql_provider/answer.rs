//! Requests and replies on the wire, as Wazuh's key_request has them: a socket
//! request is `id:001` or `ip:10.1.2.3` (surrounding whitespace ignored), a reply is
//! `{"error":0,"data":{"id","name","ip","key"}}` or `{"error":N,"message":"..."}`.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use super::db::DbError;
use crate::provider::MAX_REPLY_BYTES;
use crate::request::{By, Lookup, quote};

/// The longest socket request read, in bytes (`ip:` and 19 characters is 22).
pub const MAX_REQUEST_BYTES: usize = 64;
/// Error code: the request is malformed.
pub const INVALID_REQUEST: i64 = 1;
/// Error code: the database failed.
pub const DATABASE_ERROR: i64 = 2;
/// Error code: no agent matches.
pub const NOT_FOUND: i64 = 4;
/// Error code: more than one agent matches.
pub const AMBIGUOUS: i64 = 5;
/// The message of a [`NOT_FOUND`] reply, as Wazuh words it.
pub const NOT_FOUND_MESSAGE: &str = "No agent key found";

/// The agent found: the table's values as JSON (strings, unless the table's
/// columns are of another type). `Debug` leaves the key out.
pub struct Agent {
    /// `id`.
    pub id: Value,
    /// `name`.
    pub name: Value,
    /// `ip`.
    pub ip: Value,
    /// `agent_key`.
    pub key: Value,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// One reply.
#[derive(Debug)]
pub enum Reply {
    /// `{"error":0,"data":{...}}`.
    Found(Agent),
    /// `{"error":code,"message":...}`.
    Error {
        /// The error code.
        code: i64,
        /// What went wrong.
        message: String,
    },
}

impl Reply {
    /// Error 1: a malformed request, `problem` saying what is wrong.
    pub fn invalid(problem: impl Into<String>) -> Self {
        Reply::Error {
            code: INVALID_REQUEST,
            message: problem.into(),
        }
    }

    /// Error 2: the database failed.
    pub fn database_error(e: &DbError) -> Self {
        Reply::Error {
            code: DATABASE_ERROR,
            message: format!("Database error: {e}"),
        }
    }

    /// Error 4.
    pub fn not_found() -> Self {
        Reply::Error {
            code: NOT_FOUND,
            message: NOT_FOUND_MESSAGE.to_owned(),
        }
    }

    /// Error 5.
    pub fn ambiguous() -> Self {
        Reply::Error {
            code: AMBIGUOUS,
            message: "More than one agent matches".to_owned(),
        }
    }

    /// The reply as JSON bytes. A row that would make a reply larger than the
    /// plugin takes ([`MAX_REPLY_BYTES`]) becomes an error 2 naming only sizes.
    pub fn to_json(&self) -> Vec<u8> {
        let encoded = match self {
            Reply::Found(a) => serde_json::to_vec(&FoundWire {
                error: 0,
                data: DataWire {
                    id: &a.id,
                    name: &a.name,
                    ip: &a.ip,
                    key: &a.key,
                },
            }),
            Reply::Error { code, message } => serde_json::to_vec(&ErrorWire { error: *code, message }),
        };
        match encoded {
            Ok(bytes) if bytes.len() <= MAX_REPLY_BYTES => bytes,
            Ok(bytes) => error_json(&format!(
                "Database error: the agent's row makes a reply of {} bytes, more than {MAX_REPLY_BYTES}",
                bytes.len()
            )),
            // Strings and JSON values always serialise; this is for completeness.
            Err(e) => error_json(&format!("Database error: cannot encode the reply: {e}")),
        }
    }
}

/// An error-2 reply, built by hand: it cannot fail.
fn error_json(message: &str) -> Vec<u8> {
    format!(r#"{{"error":{DATABASE_ERROR},"message":{}}}"#, Value::from(message)).into_bytes()
}

/// `{"error":0,"data":{...}}`, fields in Wazuh's order.
#[derive(Serialize)]
struct FoundWire<'a> {
    error: i64,
    data: DataWire<'a>,
}

/// The `data` of a [`FoundWire`].
#[derive(Serialize)]
struct DataWire<'a> {
    id: &'a Value,
    name: &'a Value,
    ip: &'a Value,
    key: &'a Value,
}

/// `{"error":N,"message":"..."}`.
#[derive(Serialize)]
struct ErrorWire<'a> {
    error: i64,
    message: &'a str,
}

/// Parses a socket request (at most [`MAX_REQUEST_BYTES`]; the caller reads one
/// byte more to tell). Errors say what is wrong, quoting at most
/// [`crate::request::QUOTE_CHARS`] characters, escaped.
pub fn parse_request(bytes: &[u8]) -> Result<Lookup, String> {
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
    }
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(format!(
            "request {} is not UTF-8 text",
            quote(&String::from_utf8_lossy(bytes))
        ));
    };
    let text = text.trim_ascii();
    if text.is_empty() {
        return Err("empty request: expected `id:VALUE` or `ip:VALUE`".to_owned());
    }
    let Some((by, value)) = text.split_once(':') else {
        return Err(format!("request {} is not `id:VALUE` or `ip:VALUE`", quote(text)));
    };
    let by = match by {
        "id" => By::Id,
        "ip" => By::Ip,
        other => return Err(format!("unknown lookup {}: expected `id` or `ip`", quote(other))),
    };
    Lookup::new(by, value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(r: &Reply) -> Value {
        serde_json::from_slice(&r.to_json()).unwrap()
    }

    #[test]
    fn replies_have_wazuh_s_shape() {
        let found = Reply::Found(Agent {
            id: "001".into(),
            name: "web-1".into(),
            ip: "10.0.0.0/8".into(),
            key: "k3y".into(),
        });
        assert_eq!(
            String::from_utf8(found.to_json()).unwrap(),
            r#"{"error":0,"data":{"id":"001","name":"web-1","ip":"10.0.0.0/8","key":"k3y"}}"#
        );
        assert!(!format!("{found:?}").contains("k3y"));
        assert_eq!(
            String::from_utf8(Reply::not_found().to_json()).unwrap(),
            r#"{"error":4,"message":"No agent key found"}"#
        );
        assert_eq!(reply(&Reply::ambiguous())["error"], 5);
        let big = Reply::Found(Agent {
            id: "001".into(),
            name: "n".into(),
            ip: "any".into(),
            key: "k".repeat(MAX_REPLY_BYTES).into(),
        });
        let r = reply(&big);
        assert_eq!(r["error"], 2);
        assert!(!r["message"].as_str().unwrap().contains("kkk"), "{r}");
    }

    #[test]
    fn requests_are_checked_and_quoted_briefly() {
        assert_eq!(parse_request(b"id:001").unwrap().wire(), "id:001");
        assert_eq!(parse_request(b" ip:10.1.2.3\n").unwrap().wire(), "ip:10.1.2.3");
        assert_eq!(parse_request(b"ip:::1").unwrap().wire(), "ip:::1");
        assert_eq!(
            parse_request(b"id:001' OR '1'='1").unwrap_err(),
            r#"invalid id "001' OR '1'='1": must be 1 to 8 ASCII digits"#
        );
        assert_eq!(
            parse_request(b"name:web-1").unwrap_err(),
            r#"unknown lookup "name": expected `id` or `ip`"#
        );
        assert_eq!(
            parse_request(b"001").unwrap_err(),
            r#"request "001" is not `id:VALUE` or `ip:VALUE`"#
        );
        assert!(parse_request(b"  \n").unwrap_err().starts_with("empty request"));
        assert_eq!(
            parse_request(&[b'x'; MAX_REQUEST_BYTES + 1]).unwrap_err(),
            "request longer than 64 bytes"
        );
        let long = format!("{}:1", "\u{7}".repeat(30));
        let e = parse_request(long.as_bytes()).unwrap_err();
        // 40 characters at most, escaped.
        assert_eq!(e.matches("\\u{7}").count(), 30, "{e}");
        let e = parse_request(&[b'x'; MAX_REQUEST_BYTES]).unwrap_err();
        assert!(e.contains(&format!("{}\"...", "x".repeat(40))), "{e}");
        assert!(parse_request(b"id:\xff").unwrap_err().contains("not UTF-8"));
    }
}
