//! What a stapled OCSP response says (RFC 6960), read from its DER.
//!
//! The inventory records the staple as sent: the responder's status, and for the
//! first certificate it answers for, good, revoked or unknown with the times. The
//! response's own signature is not checked: the staple is reported, not trusted.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A stapled OCSP response, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Staple {
    /// `good`, `revoked` or `unknown` for the certificate; or the responder's
    /// error (`malformedRequest`, `internalError`, `tryLater`, `sigRequired`,
    /// `unauthorized`).
    pub status: String,
    /// When the responder produced it (ms since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub produced_at: Option<i64>,
    /// When the status was known to be right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub this_update: Option<i64>,
    /// When newer information will be available; past it the staple is stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_update: Option<i64>,
    /// When a revoked certificate was revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

impl Staple {
    /// A staple that does not read as an OCSP response.
    pub fn unreadable(why: &str) -> Self {
        Staple {
            status: format!("unreadable: {why}"),
            produced_at: None,
            this_update: None,
            next_update: None,
            revoked_at: None,
        }
    }
}

/// One DER element: its tag and contents, and what follows it.
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let bad = || "a malformed OCSP response".to_owned();
    let tag = *input.first().ok_or_else(bad)?;
    let first = *input.get(1).ok_or_else(bad)?;
    let (len, at) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return Err(bad());
        }
        let bytes = input.get(2..2 + n).ok_or_else(bad)?;
        (bytes.iter().fold(0usize, |acc, b| acc << 8 | usize::from(*b)), 2 + n)
    };
    let end = at.checked_add(len).ok_or_else(bad)?;
    let value = input.get(at..end).ok_or_else(bad)?;
    Ok((tag, value, &input[end..]))
}

/// A GeneralizedTime (`YYYYMMDDHHMMSS[.f]Z`) in ms since the epoch.
fn generalized_time(v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?;
    let digits = s.get(..14)?;
    let n = |a: usize, b: usize| digits.get(a..b)?.parse::<u32>().ok();
    let date = time::Date::from_calendar_date(
        i32::try_from(n(0, 4)?).ok()?,
        time::Month::try_from(u8::try_from(n(4, 6)?).ok()?).ok()?,
        u8::try_from(n(6, 8)?).ok()?,
    )
    .ok()?;
    let t = time::Time::from_hms(
        u8::try_from(n(8, 10)?).ok()?,
        u8::try_from(n(10, 12)?).ok()?,
        u8::try_from(n(12, 14)?).ok()?,
    )
    .ok()?;
    let at = time::PrimitiveDateTime::new(date, t).assume_utc();
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Reads a stapled OCSP response.
pub fn read(der: &[u8]) -> Result<Staple, String> {
    let (_, response, _) = tlv(der)?;
    let (_, status, rest) = tlv(response)?;
    let code = status.first().copied().unwrap_or(255);
    let mut staple = Staple {
        status: String::new(),
        produced_at: None,
        this_update: None,
        next_update: None,
        revoked_at: None,
    };
    if code != 0 {
        staple.status = match code {
            1 => "malformedRequest",
            2 => "internalError",
            3 => "tryLater",
            5 => "sigRequired",
            6 => "unauthorized",
            _ => "unknown responder status",
        }
        .to_owned();
        return Ok(staple);
    }
    // responseBytes [0] EXPLICIT { responseType, response OCTET STRING }
    let (_, bytes, _) = tlv(rest)?;
    let (_, seq, _) = tlv(bytes)?;
    let (_, _oid, after) = tlv(seq)?;
    let (_, basic, _) = tlv(after)?;
    // BasicOCSPResponse { tbsResponseData, … }
    let (_, basic, _) = tlv(basic)?;
    let (_, data, _) = tlv(basic)?;
    // ResponseData { [0] version OPTIONAL, responderID, producedAt, responses, … }
    let (tag, _, mut rest) = tlv(data)?;
    if tag == 0xa0 {
        // The version came first: the responder's ID is next.
        (_, _, rest) = tlv(rest)?;
    }
    let (tag, produced, rest) = tlv(rest)?;
    if tag == 0x18 {
        staple.produced_at = generalized_time(produced);
    }
    let (_, responses, _) = tlv(rest)?;
    let (_, single, _) = tlv(responses)?;
    // SingleResponse { certID, certStatus, thisUpdate, [0] nextUpdate OPTIONAL, … }
    let (_, _cert_id, rest) = tlv(single)?;
    let (tag, value, rest) = tlv(rest)?;
    staple.status = match tag {
        0x80 => "good",
        0xa1 => {
            staple.revoked_at = tlv(value).ok().and_then(|(_, t, _)| generalized_time(t));
            "revoked"
        }
        _ => "unknown",
    }
    .to_owned();
    let (_, this, rest) = tlv(rest)?;
    staple.this_update = generalized_time(this);
    if let Ok((0xa0, next, _)) = tlv(rest) {
        staple.next_update = tlv(next).ok().and_then(|(_, t, _)| generalized_time(t));
    }
    Ok(staple)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testutil::openssl;

    /// A CA, a certificate it issued, and the CA's OCSP answer for it given an
    /// index line's status (`V` valid, `R` revoked).
    fn response(status: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=ca",
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "a.key",
                "-out",
                "a.csr",
                "-subj",
                "/CN=a",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "a.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "a.pem",
                "-days",
                "30",
            ],
        );
        let serial = openssl(d, &["x509", "-in", "a.pem", "-noout", "-serial"]);
        let serial = serial.trim().trim_start_matches("serial=");
        let revoked = if status == "R" { "240102030405Z" } else { "" };
        std::fs::write(
            d.join("index.txt"),
            format!("{status}\t491231235959Z\t{revoked}\t{serial}\tunknown\t/CN=a\n"),
        )
        .unwrap();
        openssl(
            d,
            &[
                "ocsp",
                "-issuer",
                "ca.pem",
                "-cert",
                "a.pem",
                "-no_nonce",
                "-reqout",
                "req.der",
            ],
        );
        openssl(
            d,
            &[
                "ocsp",
                "-index",
                "index.txt",
                "-rsigner",
                "ca.pem",
                "-rkey",
                "ca.key",
                "-CA",
                "ca.pem",
                "-reqin",
                "req.der",
                "-respout",
                "resp.der",
                "-ndays",
                "2",
            ],
        );
        std::fs::read(d.join("resp.der")).unwrap()
    }

    #[test]
    fn a_good_and_a_revoked_staple_read_as_openssl_wrote_them() {
        let now = keel_common::time::now_ms();
        let good = read(&response("V")).unwrap();
        assert_eq!(good.status, "good");
        let this = good.this_update.unwrap();
        assert!((this - now).abs() < 120_000, "{good:?}");
        assert_eq!(good.next_update.unwrap() - this, 2 * 24 * 3600 * 1000);
        assert!(good.produced_at.is_some() && good.revoked_at.is_none());
        let revoked = read(&response("R")).unwrap();
        assert_eq!(revoked.status, "revoked");
        // 2024-01-02 03:04:05 UTC.
        assert_eq!(revoked.revoked_at, Some(1_704_164_645_000));
    }

    #[test]
    fn what_is_not_a_response_is_an_error_or_a_responder_status() {
        assert!(read(b"").is_err());
        assert!(read(&[0x30, 0x82, 0xff]).is_err());
        assert!(read(&[0x30, 0x05, 0x0a, 0x01]).is_err());
        // OCSPResponse { responseStatus tryLater }
        assert_eq!(read(&[0x30, 0x03, 0x0a, 0x01, 0x03]).unwrap().status, "tryLater");
        let mut cut = response("V");
        cut.truncate(cut.len() / 2);
        assert!(read(&cut).is_err());
    }
}
