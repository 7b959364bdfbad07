//! A provider's reply, checked field by field: `{"error":0,"data":{"id","name","ip","key"}}`
//! or `{"error":N,"message":"..."}` (Wazuh's key_request format).
//!
//! Nothing a provider wrote reaches a message unless it passed its check, except
//! an error reply's `message`, sanitised and cut short. Problems with the key name
//! the problem, never the key.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::key::AgentKey;
use crate::request::{By, Lookup};

/// The fewest digits of an agent ID in a reply (Wazuh pads IDs to three).
pub const MIN_REPLY_ID_DIGITS: usize = 3;
/// The most digits of an agent ID in a reply.
pub const MAX_REPLY_ID_DIGITS: usize = 8;
/// The longest agent name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// How much of an error reply's `message` is kept, in characters.
pub const MAX_MESSAGE_CHARS: usize = 200;

/// A found agent.
#[derive(Debug)]
pub struct AgentEntry {
    /// The agent ID, 3-8 digits.
    pub id: String,
    /// The agent name.
    pub name: String,
    /// Its address, an address with a prefix, or `any`.
    pub ip: String,
    /// The agent key.
    pub key: AgentKey,
}

/// Why a reply gave no agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The provider answered with an error.
    #[error("lookup failed: error {code}{}", message.as_ref().map(|m| format!(": {m}")).unwrap_or_default())]
    Refused {
        /// The reply's `error`.
        code: i64,
        /// The reply's `message`, sanitised.
        message: Option<String>,
    },
    /// The reply is not of the expected form.
    #[error("invalid provider reply: {0}")]
    Invalid(String),
}

fn invalid(problem: impl Into<String>) -> ReplyError {
    ReplyError::Invalid(problem.into())
}

/// Checks a reply to `lookup`.
pub fn parse(bytes: &[u8], lookup: &Lookup) -> Result<AgentEntry, ReplyError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid("empty"));
    }
    // serde_json's errors name a position and never quote the input.
    let value: Value = serde_json::from_slice(bytes).map_err(|e| invalid(format!("not one JSON value: {e}")))?;
    let Value::Object(reply) = value else {
        return Err(invalid("not a JSON object"));
    };
    if reply
        .keys()
        .any(|k| !matches!(k.as_str(), "error" | "message" | "data"))
    {
        return Err(invalid("has a field other than error, message and data"));
    }
    let code = match reply.get("error") {
        None => return Err(invalid("`error` is missing")),
        Some(v) => v.as_i64().ok_or_else(|| invalid("`error` must be an integer"))?,
    };
    if code != 0 {
        return Err(ReplyError::Refused {
            code,
            message: reply.get("message").and_then(Value::as_str).map(sanitise),
        });
    }
    let data = match reply.get("data") {
        None => return Err(invalid("`data` is missing")),
        Some(Value::Object(d)) => d,
        Some(_) => return Err(invalid("`data` must be an object")),
    };
    if data.keys().any(|k| !matches!(k.as_str(), "id" | "name" | "ip" | "key")) {
        return Err(invalid("`data` has a field other than id, name, ip and key"));
    }
    let id = string(data, "id")?;
    check_id(id)?;
    let name = string(data, "name")?;
    check_name(name)?;
    let ip = string(data, "ip")?;
    check_ip(ip)?;
    let key = string(data, "key")?;
    check_key(key)?;
    if lookup.by == By::Id && id.trim_start_matches('0') != lookup.value.trim_start_matches('0') {
        return Err(invalid(format!(
            "it is for agent {id}, not the requested {}",
            lookup.value
        )));
    }
    Ok(AgentEntry {
        id: id.to_owned(),
        name: name.to_owned(),
        ip: ip.to_owned(),
        key: AgentKey::new(key.to_owned()),
    })
}

fn string<'a>(data: &'a Map<String, Value>, field: &str) -> Result<&'a str, ReplyError> {
    match data.get(field) {
        None => Err(invalid(format!("`data.{field}` is missing"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(invalid(format!("`data.{field}` must be a string"))),
    }
}

fn check_id(id: &str) -> Result<(), ReplyError> {
    let ok = (MIN_REPLY_ID_DIGITS..=MAX_REPLY_ID_DIGITS).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "`data.id` must be {MIN_REPLY_ID_DIGITS} to {MAX_REPLY_ID_DIGITS} ASCII digits"
        )))
    }
}

fn check_name(name: &str) -> Result<(), ReplyError> {
    if name.is_empty() {
        return Err(invalid("`data.name` is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(invalid(format!(
            "`data.name` is {} bytes, more than {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if let Some(at) = name
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        return Err(invalid(format!(
            "`data.name` has a character other than A-Z a-z 0-9 . _ - at byte {at}"
        )));
    }
    Ok(())
}

/// `any`, an IPv4 or IPv6 address, or one with a `/prefix` that fits it.
fn check_ip(ip: &str) -> Result<(), ReplyError> {
    let rule = "`data.ip` must be an IPv4 or IPv6 address, optionally with /prefix, or `any`";
    if ip == "any" {
        return Ok(());
    }
    let (addr, prefix) = match ip.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (ip, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| invalid(rule))?;
    if let Some(p) = prefix {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let ok = !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit());
        match p.parse::<u32>() {
            Ok(len) if ok && len <= max => {}
            _ => {
                return Err(invalid(format!(
                    "`data.ip` has an invalid prefix length: it must be 0 to {max}"
                )));
            }
        }
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), ReplyError> {
    if key.is_empty() {
        return Err(invalid("`data.key` is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(format!(
            "`data.key` is {} bytes, more than {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    for (at, b) in key.bytes().enumerate() {
        if !b.is_ascii() {
            return Err(invalid(format!("`data.key` has a non-ASCII byte at byte {at}")));
        }
        if b.is_ascii_control() {
            return Err(invalid(format!("`data.key` has a control character at byte {at}")));
        }
    }
    Ok(())
}

/// Printable ASCII only (anything else becomes `?`), at most [`MAX_MESSAGE_CHARS`].
fn sanitise(message: &str) -> String {
    let mut out: String = message
        .chars()
        .take(MAX_MESSAGE_CHARS)
        .map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if message.chars().nth(MAX_MESSAGE_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef-SECRET";

    fn by_id(v: &str) -> Lookup {
        Lookup::new(By::Id, v).unwrap()
    }

    fn reply(data: &str) -> String {
        format!(r#"{{"error":0,"data":{data}}}"#)
    }

    fn err(bytes: &str) -> String {
        let e = parse(bytes.as_bytes(), &by_id("001")).unwrap_err().to_string();
        assert!(!e.contains("SECRET"), "the key leaked into {e:?}");
        e
    }

    #[test]
    fn a_good_reply() {
        let r = reply(&format!(
            r#"{{"id":"001","name":"web-1.example_x","ip":"10.0.0.0/8","key":"{KEY}"}}"#
        ));
        let e = parse(r.as_bytes(), &by_id("1")).unwrap();
        assert_eq!(
            (e.id.as_str(), e.name.as_str(), e.ip.as_str()),
            ("001", "web-1.example_x", "10.0.0.0/8")
        );
        assert_eq!(e.key.expose(), KEY);
        assert!(!format!("{e:?}").contains("SECRET"));
        for ip in [
            "any",
            "::1",
            "fe80::/10",
            "192.168.1.1/32",
            "2001:db8::1/128",
            "0.0.0.0/0",
        ] {
            let r = reply(&format!(r#"{{"id":"001","name":"n","ip":"{ip}","key":"k"}}"#));
            assert!(parse(r.as_bytes(), &by_id("001")).is_ok(), "{ip}");
        }
        // A reply to an ip lookup may be for any agent ID; trailing whitespace is fine.
        let r = reply(r#"{"id":"042","name":"n","ip":"any","key":"k"}"#) + "\n";
        assert!(parse(r.as_bytes(), &Lookup::new(By::Ip, "10.1.2.3").unwrap()).is_ok());
    }

    #[test]
    fn error_replies_carry_a_sanitised_message() {
        assert_eq!(
            err(r#"{"error":4,"message":"No agent key found"}"#),
            "lookup failed: error 4: No agent key found"
        );
        assert_eq!(err(r#"{"error":1}"#), "lookup failed: error 1");
        assert_eq!(
            err(r#"{"error":2,"message":"a\nb\u0007c\u00e9"}"#),
            "lookup failed: error 2: a?b?c?"
        );
        let long = "m".repeat(500);
        let e = err(&format!(r#"{{"error":2,"message":"{long}"}}"#));
        assert_eq!(e.len(), "lookup failed: error 2: ".len() + MAX_MESSAGE_CHARS + 3);
    }

    #[test]
    fn malformed_replies_are_refused_precisely() {
        let ok = |field: &str, value: &str| {
            let mut d = serde_json::json!({"id": "001", "name": "n", "ip": "any", "key": KEY});
            d[field] = serde_json::Value::String(value.to_owned());
            reply(&d.to_string())
        };
        let cases = [
            ("".to_owned(), "invalid provider reply: empty"),
            (
                "not json".to_owned(),
                "invalid provider reply: not one JSON value: expected ident at line 1 column 2",
            ),
            ("[1]".to_owned(), "invalid provider reply: not a JSON object"),
            (
                reply("{}") + "junk",
                "invalid provider reply: not one JSON value: trailing characters at line 1 column 22",
            ),
            (
                r#"{"data":{}}"#.to_owned(),
                "invalid provider reply: `error` is missing",
            ),
            (
                r#"{"error":"0"}"#.to_owned(),
                "invalid provider reply: `error` must be an integer",
            ),
            (
                r#"{"error":0.5}"#.to_owned(),
                "invalid provider reply: `error` must be an integer",
            ),
            (r#"{"error":0}"#.to_owned(), "invalid provider reply: `data` is missing"),
            (
                r#"{"error":0,"data":[]}"#.to_owned(),
                "invalid provider reply: `data` must be an object",
            ),
            (
                r#"{"error":0,"extra":1}"#.to_owned(),
                "invalid provider reply: has a field other than error, message and data",
            ),
            (
                ok("id", "00a"),
                "invalid provider reply: `data.id` must be 3 to 8 ASCII digits",
            ),
            (
                ok("id", "01"),
                "invalid provider reply: `data.id` must be 3 to 8 ASCII digits",
            ),
            (
                ok("id", "002"),
                "invalid provider reply: it is for agent 002, not the requested 001",
            ),
            (ok("name", ""), "invalid provider reply: `data.name` is empty"),
            (
                ok("name", &"n".repeat(129)),
                "invalid provider reply: `data.name` is 129 bytes, more than 128",
            ),
            (
                ok("name", "a b"),
                "invalid provider reply: `data.name` has a character other than A-Z a-z 0-9 . _ - at byte 1",
            ),
            (
                ok("ip", "10.0.0.256"),
                "invalid provider reply: `data.ip` must be an IPv4 or IPv6 address, optionally with /prefix, or `any`",
            ),
            (
                ok("ip", "10.0.0.0/33"),
                "invalid provider reply: `data.ip` has an invalid prefix length: it must be 0 to 32",
            ),
            (
                ok("ip", "::/129"),
                "invalid provider reply: `data.ip` has an invalid prefix length: it must be 0 to 128",
            ),
            (
                ok("ip", "10.0.0.0/+8"),
                "invalid provider reply: `data.ip` has an invalid prefix length: it must be 0 to 32",
            ),
            (ok("key", ""), "invalid provider reply: `data.key` is empty"),
            (
                ok("key", &format!("{KEY}{}", "k".repeat(120))),
                "invalid provider reply: `data.key` is 143 bytes, more than 128",
            ),
            (
                ok("key", "SECRET\u{1}key"),
                "invalid provider reply: `data.key` has a control character at byte 6",
            ),
            (
                ok("key", "SECRET\u{e9}"),
                "invalid provider reply: `data.key` has a non-ASCII byte at byte 6",
            ),
            (
                reply(r#"{"id":"001","name":"n","ip":"any"}"#),
                "invalid provider reply: `data.key` is missing",
            ),
            (
                reply(r#"{"id":1,"name":"n","ip":"any","key":"k"}"#),
                "invalid provider reply: `data.id` must be a string",
            ),
            (
                reply(r#"{"id":"001","name":"n","ip":"any","key":"k","group":"g"}"#),
                "invalid provider reply: `data` has a field other than id, name, ip and key",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(err(&input), want, "for {input:?}");
        }
    }
}
