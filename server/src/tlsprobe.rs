//! Probing a TLS server for what it accepts, without completing a handshake.
//!
//! TLS 1.2 and older send the server's certificates in the clear, so a
//! ClientHello for one version with a chosen list of cipher suites, and the
//! server's answer up to its ServerHelloDone, tell which version and suite it
//! takes, the chain it presents and the OCSP response it staples, whatever its
//! key size or signature: a server that only speaks TLS 1.0, or holds an RSA-1024
//! key, is described instead of failing the scan. Nothing is encrypted and no key
//! is exchanged: the probe hangs up after reading.
//!
//! TLS 1.3 hides the certificates, so it is checked by a real handshake
//! ([`crate::inventory::handshake`]).

use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use utoipa::ToSchema;

use crate::ocsp::Staple;

/// What a target accepts, as recorded with its certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Profile {
    /// Each version from SSLv3 to TLS 1.3, oldest first.
    pub protocols: Vec<ProtocolSeen>,
    /// The weak suite the target chose when offered only weak ones (and the
    /// version it chose with it); none when it refused them all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weak_suite: Option<String>,
    /// The OCSP response it stapled, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ocsp: Option<Staple>,
    /// The probes that could not run, and why: what they would have found is
    /// unknown (a version not probed is not accepted, nor refused either).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probe_errors: Vec<String>,
}

/// One protocol version at a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProtocolSeen {
    /// `SSLv3`, `TLSv1.0`, `TLSv1.1`, `TLSv1.2` or `TLSv1.3`.
    pub version: String,
    /// Whether the target completed a hello in it.
    pub accepted: bool,
    /// Whether it was asked at all: false when its probe could not run (see
    /// [`Profile::probe_errors`]), and then `accepted` proves nothing.
    #[serde(default)]
    pub probed: bool,
    /// The cipher suite it chose from an ordinary client's list (IANA name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suite: Option<String>,
    /// How it refused, as it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The most handshake bytes read from one server: a chain of several large
/// certificates and a staple fit many times over.
pub const MAX_HANDSHAKE_BYTES: usize = 256 << 10;

/// A protocol version older than TLS 1.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
pub enum Legacy {
    /// SSL 3.0.
    #[serde(rename = "SSLv3")]
    Ssl3,
    /// TLS 1.0.
    #[serde(rename = "TLSv1.0")]
    Tls10,
    /// TLS 1.1.
    #[serde(rename = "TLSv1.1")]
    Tls11,
    /// TLS 1.2.
    #[serde(rename = "TLSv1.2")]
    Tls12,
}

impl Legacy {
    /// Every one, oldest first.
    pub const ALL: [Legacy; 4] = [Legacy::Ssl3, Legacy::Tls10, Legacy::Tls11, Legacy::Tls12];

    /// Its number on the wire.
    pub fn wire(self) -> u16 {
        match self {
            Legacy::Ssl3 => 0x0300,
            Legacy::Tls10 => 0x0301,
            Legacy::Tls11 => 0x0302,
            Legacy::Tls12 => 0x0303,
        }
    }

    /// Its name as openssl prints it.
    pub fn name(self) -> &'static str {
        match self {
            Legacy::Ssl3 => "SSLv3",
            Legacy::Tls10 => "TLSv1.0",
            Legacy::Tls11 => "TLSv1.1",
            Legacy::Tls12 => "TLSv1.2",
        }
    }
}

impl fmt::Display for Legacy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the server answered to one ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// It chose this version and suite, and sent this chain (DER, leaf first) and
    /// staple.
    Accepted(Hello),
    /// It refused: an alert (named), a different version than asked for, or it
    /// hung up.
    Refused(String),
}

/// A server's hello and what followed it up to ServerHelloDone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The version it chose.
    pub version: u16,
    /// The cipher suite it chose.
    pub suite: u16,
    /// Its certificates as sent, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The OCSP response it stapled (DER), if any.
    pub ocsp: Option<Vec<u8>>,
}

/// Suites a client of each version would offer, strongest first: what the
/// server chooses among them is recorded as its suite for that version.
pub const ORDINARY: &[u16] = &[
    0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc02b, 0xc02f, 0x009f, 0x009e, 0xc024, 0xc028, 0xc023, 0xc027, 0xc00a, 0xc014,
    0xc009, 0xc013, 0x009d, 0x009c, 0x003d, 0x003c, 0x0035, 0x002f, 0x0039, 0x0033,
];

/// Suites known to be weak: NULL encryption, export grade, RC4, 3DES, and
/// anonymous key exchange. A server that picks one of these when offered only
/// these accepts a weak cipher.
pub const WEAK: &[u16] = &[
    // NULL
    0x0001, 0x0002, 0x003b, 0xc006, 0xc010, 0xc015, // EXPORT
    0x0003, 0x0006, 0x0008, 0x000b, 0x000e, 0x0011, 0x0014, 0x0017, 0x0019, 0x0062, 0x0064, // RC4
    0x0004, 0x0005, 0xc007, 0xc011, 0x0018, 0xc016, // 3DES
    0x000a, 0x0016, 0x0013, 0xc008, 0xc012, 0x001b, 0xc017, // anonymous
    0x0034, 0x003a, 0x006c, 0x006d, 0x00a6, 0x00a7, 0xc018, 0xc019,
];

/// The IANA name of a cipher suite (TLS 1.3's too), or its number.
pub fn suite_name(suite: u16) -> String {
    let name = match suite {
        0x1301 => "TLS_AES_128_GCM_SHA256",
        0x1302 => "TLS_AES_256_GCM_SHA384",
        0x1303 => "TLS_CHACHA20_POLY1305_SHA256",
        0x0001 => "TLS_RSA_WITH_NULL_MD5",
        0x0002 => "TLS_RSA_WITH_NULL_SHA",
        0x003b => "TLS_RSA_WITH_NULL_SHA256",
        0xc006 => "TLS_ECDHE_ECDSA_WITH_NULL_SHA",
        0xc010 => "TLS_ECDHE_RSA_WITH_NULL_SHA",
        0xc015 => "TLS_ECDH_anon_WITH_NULL_SHA",
        0x0003 => "TLS_RSA_EXPORT_WITH_RC4_40_MD5",
        0x0006 => "TLS_RSA_EXPORT_WITH_RC2_CBC_40_MD5",
        0x0008 => "TLS_RSA_EXPORT_WITH_DES40_CBC_SHA",
        0x000b => "TLS_DH_DSS_EXPORT_WITH_DES40_CBC_SHA",
        0x000e => "TLS_DH_RSA_EXPORT_WITH_DES40_CBC_SHA",
        0x0011 => "TLS_DHE_DSS_EXPORT_WITH_DES40_CBC_SHA",
        0x0014 => "TLS_DHE_RSA_EXPORT_WITH_DES40_CBC_SHA",
        0x0017 => "TLS_DH_anon_EXPORT_WITH_RC4_40_MD5",
        0x0019 => "TLS_DH_anon_EXPORT_WITH_DES40_CBC_SHA",
        0x0062 => "TLS_RSA_EXPORT1024_WITH_DES_CBC_SHA",
        0x0064 => "TLS_RSA_EXPORT1024_WITH_RC4_56_SHA",
        0x0004 => "TLS_RSA_WITH_RC4_128_MD5",
        0x0005 => "TLS_RSA_WITH_RC4_128_SHA",
        0xc007 => "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
        0xc011 => "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
        0x0018 => "TLS_DH_anon_WITH_RC4_128_MD5",
        0xc016 => "TLS_ECDH_anon_WITH_RC4_128_SHA",
        0x000a => "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
        0x0013 => "TLS_DHE_DSS_WITH_3DES_EDE_CBC_SHA",
        0x0016 => "TLS_DHE_RSA_WITH_3DES_EDE_CBC_SHA",
        0xc008 => "TLS_ECDHE_ECDSA_WITH_3DES_EDE_CBC_SHA",
        0xc012 => "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
        0x001b => "TLS_DH_anon_WITH_3DES_EDE_CBC_SHA",
        0xc017 => "TLS_ECDH_anon_WITH_3DES_EDE_CBC_SHA",
        0x0034 => "TLS_DH_anon_WITH_AES_128_CBC_SHA",
        0x003a => "TLS_DH_anon_WITH_AES_256_CBC_SHA",
        0x006c => "TLS_DH_anon_WITH_AES_128_CBC_SHA256",
        0x006d => "TLS_DH_anon_WITH_AES_256_CBC_SHA256",
        0x00a6 => "TLS_DH_anon_WITH_AES_128_GCM_SHA256",
        0x00a7 => "TLS_DH_anon_WITH_AES_256_GCM_SHA384",
        0xc018 => "TLS_ECDH_anon_WITH_AES_128_CBC_SHA",
        0xc019 => "TLS_ECDH_anon_WITH_AES_256_CBC_SHA",
        0x002f => "TLS_RSA_WITH_AES_128_CBC_SHA",
        0x0035 => "TLS_RSA_WITH_AES_256_CBC_SHA",
        0x003c => "TLS_RSA_WITH_AES_128_CBC_SHA256",
        0x003d => "TLS_RSA_WITH_AES_256_CBC_SHA256",
        0x009c => "TLS_RSA_WITH_AES_128_GCM_SHA256",
        0x009d => "TLS_RSA_WITH_AES_256_GCM_SHA384",
        0x0033 => "TLS_DHE_RSA_WITH_AES_128_CBC_SHA",
        0x0039 => "TLS_DHE_RSA_WITH_AES_256_CBC_SHA",
        0x009e => "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
        0x009f => "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
        0xc009 => "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        0xc00a => "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
        0xc013 => "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        0xc014 => "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        0xc023 => "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
        0xc024 => "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
        0xc027 => "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
        0xc028 => "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
        0xc02b => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        0xc02c => "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        0xc02f => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        0xc030 => "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        0xcca8 => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        0xcca9 => "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        _ => return format!("0x{suite:04X}"),
    };
    name.to_owned()
}

/// The name of a TLS alert, as the RFCs spell it.
fn alert_name(code: u8) -> String {
    let name = match code {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        40 => "handshake_failure",
        42 => "bad_certificate",
        47 => "illegal_parameter",
        50 => "decode_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        120 => "no_application_protocol",
        _ => return format!("alert {code}"),
    };
    name.to_owned()
}

const HANDSHAKE: u8 = 22;
const ALERT: u8 = 21;
const SERVER_HELLO: u8 = 2;
const CERTIFICATE: u8 = 11;
const CERTIFICATE_STATUS: u8 = 22;
const SERVER_HELLO_DONE: u8 = 14;

/// A ClientHello for `version` offering `suites`, naming `sni` (a DNS name, not
/// an address) and asking for an OCSP staple.
pub fn client_hello(version: Legacy, suites: &[u16], sni: Option<&str>, random: [u8; 32]) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    body.extend_from_slice(&version.wire().to_be_bytes());
    body.extend_from_slice(&random);
    body.push(0); // no session to resume
    // The renegotiation SCSV: servers that insist on secure renegotiation answer.
    let suite_bytes = u16::try_from((suites.len() + 1) * 2).unwrap_or(u16::MAX);
    body.extend_from_slice(&suite_bytes.to_be_bytes());
    for s in suites.iter().chain(&[0x00ff]) {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null only
    let mut ext = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let mut data = Vec::with_capacity(n.len() + 5);
        data.extend_from_slice(&u16_len(n.len() + 3));
        data.push(0); // host_name
        data.extend_from_slice(&u16_len(n.len()));
        data.extend_from_slice(n);
        extension(&mut ext, 0, &data);
    }
    // status_request: OCSP, no responder IDs, no extensions.
    extension(&mut ext, 5, &[1, 0, 0, 0, 0]);
    // supported_groups: x25519, P-256, P-384, P-521, ffdhe2048.
    extension(
        &mut ext,
        10,
        &[0, 10, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18, 0x00, 0x19, 0x01, 0x00],
    );
    // ec_point_formats: uncompressed.
    extension(&mut ext, 11, &[1, 0]);
    if version == Legacy::Tls12 {
        // signature_algorithms, SHA-1 and MD5 last so that servers with only
        // those still answer.
        let schemes: [u16; 13] = [
            0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501, 0x0601, 0x0807, 0x0201, 0x0203, 0x0101,
        ];
        let mut data = u16_len(schemes.len() * 2).to_vec();
        for s in schemes {
            data.extend_from_slice(&s.to_be_bytes());
        }
        extension(&mut ext, 13, &data);
    }
    body.extend_from_slice(&u16_len(ext.len()));
    body.extend_from_slice(&ext);

    let mut hs = Vec::with_capacity(body.len() + 4);
    hs.push(1); // client_hello
    hs.extend_from_slice(&u24_len(body.len()));
    hs.extend_from_slice(&body);
    // The record layer says TLS 1.0 (SSL 3.0 for an SSL 3.0 hello), as clients do.
    let record_version: u16 = if version == Legacy::Ssl3 { 0x0300 } else { 0x0301 };
    let mut record = Vec::with_capacity(hs.len() + 5);
    record.push(HANDSHAKE);
    record.extend_from_slice(&record_version.to_be_bytes());
    record.extend_from_slice(&u16_len(hs.len()));
    record.extend_from_slice(&hs);
    record
}

fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u16_len(data.len()));
    out.extend_from_slice(data);
}

fn u16_len(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes()
}

fn u24_len(n: usize) -> [u8; 3] {
    let b = u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
    [b[1], b[2], b[3]]
}

/// Sends a ClientHello for `version` offering `suites` over `stream` and reads
/// the server's answer up to its ServerHelloDone (or its refusal). With `exact`,
/// a server that answers with an older version refused `version`; without, any
/// version it chooses up to `version` is its answer.
pub async fn probe<S>(
    stream: &mut S,
    version: Legacy,
    suites: &[u16],
    sni: Option<&str>,
    exact: bool,
) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).map_err(|e| format!("no entropy: {e}"))?;
    stream
        .write_all(&client_hello(version, suites, sni, random))
        .await
        .map_err(|e| format!("cannot send a ClientHello: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("cannot send a ClientHello: {e}"))?;
    let mut reader = Reader {
        exact,
        ..Reader::default()
    };
    loop {
        let mut header = [0u8; 5];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(reader.hung_up(version));
            }
            Err(e) => return Err(format!("reading the server's answer: {e}")),
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > (16 << 10) + 2048 {
            return Err(format!("the server sent a record of {len} bytes, more than TLS allows"));
        }
        let mut body = vec![0u8; len];
        match stream.read_exact(&mut body).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(reader.hung_up(version)),
            Err(e) => return Err(format!("reading the server's answer: {e}")),
        }
        if let Some(answer) = reader.record(header[0], &body, version)? {
            return Ok(answer);
        }
    }
}

/// The server's handshake messages as they arrive.
#[derive(Debug, Default)]
struct Reader {
    buf: Vec<u8>,
    hello: Option<Hello>,
    /// Only the version asked for counts as accepted.
    exact: bool,
}

impl Reader {
    /// One record; the answer once it is complete.
    fn record(&mut self, kind: u8, body: &[u8], asked: Legacy) -> Result<Option<Answer>, String> {
        match kind {
            ALERT => {
                let what = body
                    .get(1)
                    .map_or_else(|| "an empty alert".to_owned(), |c| alert_name(*c));
                // An alert after the hello (a warning) ends what we read.
                Ok(Some(match self.hello.take() {
                    Some(h) => Answer::Accepted(h),
                    None => Answer::Refused(what),
                }))
            }
            HANDSHAKE => {
                if self.buf.len() + body.len() > MAX_HANDSHAKE_BYTES {
                    return Err(format!(
                        "the server's handshake exceeds {MAX_HANDSHAKE_BYTES} bytes before its ServerHelloDone"
                    ));
                }
                self.buf.extend_from_slice(body);
                self.messages(asked)
            }
            other => Err(format!(
                "the server sent a record of type {other} where a handshake was expected"
            )),
        }
    }

    /// Takes every complete message from the buffer.
    fn messages(&mut self, asked: Legacy) -> Result<Option<Answer>, String> {
        loop {
            let Some(&[kind, a, b, c]) = self.buf.get(..4) else {
                return Ok(None);
            };
            let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            if self.buf.len() < 4 + len {
                return Ok(None);
            }
            let msg: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
            match kind {
                SERVER_HELLO => {
                    let (version, suite) = server_hello(&msg)?;
                    if version > asked.wire() || (self.exact && version != asked.wire()) {
                        return Ok(Some(Answer::Refused(format!(
                            "answered with version 0x{version:04X} instead"
                        ))));
                    }
                    self.hello = Some(Hello {
                        version,
                        suite,
                        chain: Vec::new(),
                        ocsp: None,
                    });
                }
                CERTIFICATE => {
                    let chain = certificates(&msg)?;
                    if let Some(h) = &mut self.hello {
                        h.chain = chain;
                    }
                }
                CERTIFICATE_STATUS => {
                    // status_type ocsp(1), then the response with a 3-byte length.
                    if let (Some(h), Some(&[1, a, b, c])) = (&mut self.hello, msg.get(..4)) {
                        let len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                        h.ocsp = msg.get(4..4 + len).map(<[u8]>::to_vec);
                    }
                }
                SERVER_HELLO_DONE => {
                    return Ok(Some(match self.hello.take() {
                        Some(h) => Answer::Accepted(h),
                        None => Answer::Refused("ServerHelloDone without a ServerHello".into()),
                    }));
                }
                _ => {}
            }
        }
    }

    /// The server hung up: what it said so far.
    fn hung_up(&mut self, asked: Legacy) -> Answer {
        match self.hello.take() {
            Some(h) => Answer::Accepted(h),
            None => Answer::Refused(format!("closed the connection without answering {asked}")),
        }
    }
}

/// A ServerHello's version and suite.
fn server_hello(msg: &[u8]) -> Result<(u16, u16), String> {
    let bad = || "a malformed ServerHello".to_owned();
    let version = u16::from_be_bytes([*msg.first().ok_or_else(bad)?, *msg.get(1).ok_or_else(bad)?]);
    let sid = usize::from(*msg.get(34).ok_or_else(bad)?);
    let at = 35 + sid;
    let suite = u16::from_be_bytes([*msg.get(at).ok_or_else(bad)?, *msg.get(at + 1).ok_or_else(bad)?]);
    Ok((version, suite))
}

/// A Certificate message's certificates.
fn certificates(msg: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let bad = || "a malformed Certificate message".to_owned();
    let u24 = |at: usize| -> Result<usize, String> {
        let b = msg.get(at..at + 3).ok_or_else(bad)?;
        Ok(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    };
    let total = u24(0)?;
    let end = 3 + total;
    if end > msg.len() {
        return Err(bad());
    }
    let mut at = 3;
    let mut out = Vec::new();
    while at < end {
        let len = u24(at)?;
        let der = msg.get(at + 3..at + 3 + len).ok_or_else(bad)?;
        out.push(der.to_vec());
        at += 3 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&u24_len(body.len()));
        m.extend_from_slice(body);
        m
    }

    fn server_hello_msg(version: u16, suite: u16) -> Vec<u8> {
        let mut b = version.to_be_bytes().to_vec();
        b.extend_from_slice(&[7u8; 32]);
        b.push(2);
        b.extend_from_slice(&[1, 2]);
        b.extend_from_slice(&suite.to_be_bytes());
        b.push(0);
        handshake(SERVER_HELLO, &b)
    }

    #[test]
    fn a_client_hello_is_well_formed() {
        let hello = client_hello(Legacy::Tls12, ORDINARY, Some("db.internal"), [9; 32]);
        assert_eq!(hello[0], HANDSHAKE);
        assert_eq!(usize::from(u16::from_be_bytes([hello[3], hello[4]])), hello.len() - 5);
        assert_eq!(hello[5], 1);
        assert_eq!(&hello[9..11], &[3, 3]);
        assert!(hello.windows(11).any(|w| w == b"db.internal"));
        let ssl3 = client_hello(Legacy::Ssl3, WEAK, None, [9; 32]);
        assert_eq!(&ssl3[1..3], &[3, 0]);
        assert!(
            !ssl3.windows(2).any(|w| w == [0, 13]),
            "no signature_algorithms before TLS 1.2"
        );
    }

    #[test]
    fn an_answer_split_across_records_is_read_whole() {
        let cert = handshake(CERTIFICATE, &{
            let mut b = u24_len(3 + 4 + 3 + 2).to_vec();
            b.extend_from_slice(&u24_len(4));
            b.extend_from_slice(b"leaf");
            b.extend_from_slice(&u24_len(2));
            b.extend_from_slice(b"ca");
            b
        });
        let status = handshake(CERTIFICATE_STATUS, &[1, 0, 0, 3, b'o', b'c', b's']);
        let mut all = server_hello_msg(0x0301, 0x000a);
        all.extend_from_slice(&cert);
        all.extend_from_slice(&status);
        all.extend_from_slice(&handshake(SERVER_HELLO_DONE, &[]));
        let mut r = Reader::default();
        let (a, b) = all.split_at(7);
        assert_eq!(r.record(HANDSHAKE, a, Legacy::Tls10).unwrap(), None);
        let Some(Answer::Accepted(h)) = r.record(HANDSHAKE, b, Legacy::Tls10).unwrap() else {
            panic!("accepted")
        };
        assert_eq!((h.version, h.suite), (0x0301, 0x000a));
        assert_eq!(h.chain, [b"leaf".to_vec(), b"ca".to_vec()]);
        assert_eq!(h.ocsp.as_deref(), Some(&b"ocs"[..]));
        assert_eq!(suite_name(h.suite), "TLS_RSA_WITH_3DES_EDE_CBC_SHA");
    }

    #[test]
    fn refusals_are_named() {
        let mut r = Reader::default();
        assert_eq!(
            r.record(ALERT, &[2, 70], Legacy::Tls10).unwrap(),
            Some(Answer::Refused("protocol_version".into()))
        );
        let mut r = Reader {
            exact: true,
            ..Reader::default()
        };
        let Some(Answer::Refused(why)) = r
            .record(HANDSHAKE, &server_hello_msg(0x0303, 0xc02f), Legacy::Tls11)
            .unwrap()
        else {
            panic!("refused")
        };
        assert!(why.contains("0x0303"), "{why}");
        assert!(matches!(Reader::default().hung_up(Legacy::Ssl3), Answer::Refused(w) if w.contains("SSLv3")));
    }

    #[test]
    fn bad_answers_are_errors_not_panics() {
        let mut r = Reader::default();
        assert!(r.record(23, b"data", Legacy::Tls12).is_err());
        let mut r = Reader::default();
        assert!(
            r.record(HANDSHAKE, &handshake(SERVER_HELLO, &[3]), Legacy::Tls12)
                .is_err()
        );
        let mut r = Reader::default();
        let bad_cert = handshake(CERTIFICATE, &[0, 0, 9, 0, 0, 20, 1]);
        r.record(HANDSHAKE, &server_hello_msg(0x0303, 0x002f), Legacy::Tls12)
            .unwrap();
        assert!(r.record(HANDSHAKE, &bad_cert, Legacy::Tls12).is_err());
        let mut r = Reader::default();
        let big = vec![0u8; 16 << 10];
        let mut err = None;
        for _ in 0..20 {
            if let Err(e) = r.record(
                HANDSHAKE,
                &[&[CERTIFICATE, 0xff, 0xff, 0xff][..], &big].concat(),
                Legacy::Tls12,
            ) {
                err = Some(e);
                break;
            }
        }
        assert!(err.unwrap().contains("exceeds"));
    }
}
