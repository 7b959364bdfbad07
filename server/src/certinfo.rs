//! What one certificate says, field by field, as an auditor reads it (and as
//! `openssl x509` prints it): names as RFC 4514 strings, the serial as canonical
//! hex, the key's exact size and curve, every SAN type, key usages, basic
//! constraints, where to find the issuer and OCSP, and whether it signed itself.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};
use x509_parser::public_key::PublicKey;

/// One certificate of a chain.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject, RFC 4514 (`openssl x509 -nameopt RFC2253`).
    pub subject: String,
    /// Issuer, RFC 4514.
    pub issuer: String,
    /// Serial number, uppercase hex without the DER sign byte (`openssl x509 -serial`).
    pub serial: String,
    /// Valid from, Unix ms.
    pub not_before: i64,
    /// Valid until, Unix ms.
    pub not_after: i64,
    /// `RSA`, `EC`, `Ed25519`, or the algorithm's name.
    pub key_type: String,
    /// The key's exact size in bits (the modulus for RSA, the curve for EC).
    pub key_bits: u32,
    /// The curve of an EC key: `P-256`, `P-384`, `P-521`, or its OID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curve: Option<String>,
    /// Signature algorithm, e.g. `sha256WithRSAEncryption`.
    pub signature: String,
    /// Every subject alternative name, typed as openssl prints them: `DNS:`,
    /// `IP Address:`, `email:`, `URI:`, `DirName:`, `Registered ID:`, `othername:`.
    pub sans: Vec<String>,
    /// Key usage, as openssl names it (`Digital Signature`, `Certificate Sign`, …).
    pub key_usage: Vec<String>,
    /// Extended key usage: `serverAuth`, `clientAuth`, … or the OID.
    pub extended_key_usage: Vec<String>,
    /// Basic constraints: whether it is a CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca: Option<bool>,
    /// Basic constraints: the path length limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_len: Option<u32>,
    /// Authority information access: OCSP responders.
    pub ocsp_urls: Vec<String>,
    /// Authority information access: where the issuer's certificate is.
    pub ca_issuer_urls: Vec<String>,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// The signature verifies with the certificate's own key.
    pub self_signed: bool,
}

/// Describes a DER certificate.
pub fn describe(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let (key_type, key_bits, curve) = key(&cert);
    let mut info = CertInfo {
        subject: rfc4514(cert.subject()),
        issuer: rfc4514(cert.issuer()),
        serial: serial_hex(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp() * 1000,
        not_after: cert.validity().not_after.timestamp() * 1000,
        key_type,
        key_bits,
        curve,
        signature: oid_name(&cert.signature_algorithm.algorithm),
        sans: Vec::new(),
        key_usage: Vec::new(),
        extended_key_usage: Vec::new(),
        ca: None,
        path_len: None,
        ocsp_urls: Vec::new(),
        ca_issuer_urls: Vec::new(),
        fingerprint: hex::encode(Sha256::digest(der)),
        // Issuer and subject alike prove nothing: the signature must verify
        // with the certificate's own key.
        self_signed: cert.verify_signature(None).is_ok(),
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                info.sans = san.general_names.iter().map(general_name).collect();
            }
            ParsedExtension::KeyUsage(ku) => {
                let flags = [
                    (ku.digital_signature(), "Digital Signature"),
                    (ku.non_repudiation(), "Non Repudiation"),
                    (ku.key_encipherment(), "Key Encipherment"),
                    (ku.data_encipherment(), "Data Encipherment"),
                    (ku.key_agreement(), "Key Agreement"),
                    (ku.key_cert_sign(), "Certificate Sign"),
                    (ku.crl_sign(), "CRL Sign"),
                    (ku.encipher_only(), "Encipher Only"),
                    (ku.decipher_only(), "Decipher Only"),
                ];
                info.key_usage = flags
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| (*n).to_owned())
                    .collect();
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                let known = [
                    (eku.any, "anyExtendedKeyUsage"),
                    (eku.server_auth, "serverAuth"),
                    (eku.client_auth, "clientAuth"),
                    (eku.code_signing, "codeSigning"),
                    (eku.email_protection, "emailProtection"),
                    (eku.time_stamping, "timeStamping"),
                    (eku.ocsp_signing, "OCSPSigning"),
                ];
                info.extended_key_usage = known
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| (*n).to_owned())
                    .chain(eku.other.iter().map(|o| o.to_id_string()))
                    .collect();
            }
            ParsedExtension::BasicConstraints(bc) => {
                info.ca = Some(bc.ca);
                info.path_len = bc.path_len_constraint;
            }
            ParsedExtension::AuthorityInfoAccess(aia) => {
                for d in &aia.accessdescs {
                    let GeneralName::URI(url) = d.access_location else {
                        continue;
                    };
                    match d.access_method.to_id_string().as_str() {
                        OCSP => info.ocsp_urls.push(url.to_owned()),
                        CA_ISSUERS => info.ca_issuer_urls.push(url.to_owned()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

const OCSP: &str = "1.3.6.1.5.5.7.48.1";
const CA_ISSUERS: &str = "1.3.6.1.5.5.7.48.2";

/// The key's type, exact size and curve.
fn key(cert: &X509Certificate<'_>) -> (String, u32, Option<String>) {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(k)) => ("RSA".into(), significant_bits(k.modulus), None),
        Ok(PublicKey::EC(point)) => {
            let oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            let (curve, bits) = match oid.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("P-256".to_owned(), 256),
                Some("1.3.132.0.34") => ("P-384".to_owned(), 384),
                Some("1.3.132.0.35") => ("P-521".to_owned(), 521),
                Some(other) => (other.to_owned(), u32::try_from(point.key_size()).unwrap_or(0)),
                None => ("unknown".to_owned(), u32::try_from(point.key_size()).unwrap_or(0)),
            };
            ("EC".into(), bits, Some(curve))
        }
        _ => match spki.algorithm.algorithm.to_id_string().as_str() {
            "1.3.101.112" => ("Ed25519".into(), 256, None),
            "1.3.101.113" => ("Ed448".into(), 456, None),
            _ => {
                let bits = u32::try_from(spki.subject_public_key.data.len() * 8).unwrap_or(0);
                (oid_name(&spki.algorithm.algorithm), bits, None)
            }
        },
    }
}

/// The number of significant bits of a big-endian unsigned integer.
pub fn significant_bits(bytes: &[u8]) -> u32 {
    let Some(first) = bytes.iter().position(|b| *b != 0) else {
        return 0;
    };
    let len = u32::try_from(bytes.len() - first).unwrap_or(u32::MAX);
    len.saturating_mul(8) - bytes[first].leading_zeros()
}

/// A serial as openssl prints it: uppercase hex of the value's bytes, without
/// the leading zero byte DER adds to keep a number positive.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    hex::encode_upper(&raw[start..])
}

/// A distinguished name as RFC 4514 writes it: the last RDN first, `,` between
/// RDNs, `+` within one, and the special characters of each value escaped, so
/// that no value can pass for another attribute.
pub fn rfc4514(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.attr_type();
                    let key = match attribute_name(&oid.to_id_string()) {
                        Some(k) => k.to_owned(),
                        None => oid.to_id_string(),
                    };
                    let value = match atv.as_str() {
                        Ok(s) => escape(s),
                        // Not a string type RFC 4514 spells out: `#` and the DER.
                        Err(_) => format!(
                            "#{}",
                            hex::encode(x509_parser::asn1_rs::ToDer::to_der_vec(atv.attr_value()).unwrap_or_default())
                        ),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// The short names RFC 4514 and openssl use.
fn attribute_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.5" => "serialNumber",
        "2.5.4.12" => "title",
        "2.5.4.97" => "organizationIdentifier",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

/// Escapes an attribute value (RFC 4514, section 2.4).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

fn general_name(n: &GeneralName<'_>) -> String {
    match n {
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::IPAddress(b) => format!("IP Address:{}", ip(b)),
        GeneralName::RFC822Name(e) => format!("email:{e}"),
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::DirectoryName(name) => format!("DirName:{}", rfc4514(name)),
        GeneralName::RegisteredID(oid) => format!("Registered ID:{}", oid.to_id_string()),
        GeneralName::OtherName(oid, _) => format!("othername:{}", oid.to_id_string()),
        GeneralName::X400Address(_) => "X400Name:<unsupported>".to_owned(),
        GeneralName::EDIPartyName(_) => "EdiPartyName:<unsupported>".to_owned(),
        GeneralName::Invalid(_, bytes) => format!("invalid:{}", hex::encode(bytes)),
    }
}

/// An IP address SAN as text; openssl's form for IPv6 (every group, uppercase).
fn ip(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).unwrap_or_default()).to_string(),
        16 => b
            .chunks(2)
            .map(|g| format!("{:X}", u16::from_be_bytes([g[0], g[1]])))
            .collect::<Vec<_>>()
            .join(":"),
        _ => format!("<invalid:{}>", hex::encode(b)),
    }
}

fn oid_name(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
        .map(str::to_owned)
        .unwrap_or_else(|_| oid.to_id_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn values_are_escaped_so_none_passes_for_another_attribute() {
        assert_eq!(escape("Acme, CN=spoofed.example"), "Acme\\, CN=spoofed.example");
        assert_eq!(escape("#1 a+b "), "\\#1 a\\+b\\ ");
        assert_eq!(escape(" x\"<>;\\"), "\\ x\\\"\\<\\>\\;\\\\");
        assert_eq!(escape("plain"), "plain");
    }

    use std::path::Path;

    use crate::testutil::openssl;

    /// What openssl says of a PEM certificate, and ours of its DER.
    fn both(dir: &Path, pem: &str) -> (CertInfo, String) {
        openssl(dir, &["x509", "-in", pem, "-outform", "DER", "-out", "c.der"]);
        let ours = describe(&std::fs::read(dir.join("c.der")).unwrap()).unwrap();
        let theirs = openssl(
            dir,
            &[
                "x509",
                "-in",
                pem,
                "-noout",
                "-subject",
                "-issuer",
                "-serial",
                "-fingerprint",
                "-sha256",
                "-text",
                "-nameopt",
                "RFC2253",
            ],
        );
        (ours, theirs)
    }

    /// The value of openssl's `key=value` line.
    fn line<'a>(text: &'a str, key: &str) -> &'a str {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
    }

    /// The line after openssl's `-text` heading for an extension.
    fn after<'a>(text: &'a str, heading: &str) -> &'a str {
        let mut lines = text.lines();
        lines
            .find(|l| l.trim_start().starts_with(heading))
            .unwrap_or_else(|| panic!("no {heading}"));
        lines.next().unwrap().trim()
    }

    #[test]
    fn every_field_reads_as_openssl_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A 2050-bit RSA key (not a whole number of bytes; OpenSSL 3 rounds an
        // odd size down), an O that tries to pass for a CN, every SAN type.
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2050",
                "-out",
                "a.key",
            ],
        );
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-key",
                "a.key",
                "-nodes",
                "-out",
                "a.pem",
                "-days",
                "30",
                "-sha256",
                "-subj",
                "/CN=real.example/O=Acme, CN=spoofed.example",
                "-addext",
                "subjectAltName=DNS:a.example,IP:10.0.0.1,IP:fd00::1,email:ops@example.com,URI:https://example.com/x",
                "-addext",
                "keyUsage=critical,digitalSignature,keyEncipherment",
                "-addext",
                "extendedKeyUsage=serverAuth,clientAuth",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-addext",
                "authorityInfoAccess=OCSP;URI:http://ocsp.example,caIssuers;URI:http://ca.example/ca.crt",
            ],
        );
        let (a, text) = both(d, "a.pem");
        assert_eq!(a.subject, line(&text, "subject="));
        assert_eq!(a.subject, "O=Acme\\, CN=spoofed.example,CN=real.example");
        assert_eq!(a.issuer, line(&text, "issuer="));
        assert_eq!(a.serial, line(&text, "serial="));
        assert_eq!(
            a.fingerprint,
            line(&text, "sha256 Fingerprint=").replace(':', "").to_lowercase()
        );
        assert!(text.contains(&format!("Public-Key: ({} bit)", a.key_bits)), "{text}");
        assert_eq!(
            (a.key_type.as_str(), a.key_bits, a.curve.as_deref()),
            ("RSA", 2050, None)
        );
        assert_eq!(a.sans.join(", "), after(&text, "X509v3 Subject Alternative Name"));
        assert_eq!(a.key_usage.join(", "), after(&text, "X509v3 Key Usage"));
        assert_eq!(a.extended_key_usage, ["serverAuth", "clientAuth"]);
        assert_eq!((a.ca, a.path_len), (Some(false), None));
        assert_eq!(a.ocsp_urls, ["http://ocsp.example"]);
        assert_eq!(a.ca_issuer_urls, ["http://ca.example/ca.crt"]);
        assert_eq!(a.signature, "sha256WithRSAEncryption");
        assert!(a.self_signed);

        // Issuer and subject alike, but signed by another key: not self-signed.
        for args in [
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=same",
            ][..],
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-nodes",
                "-keyout",
                "b.key",
                "-out",
                "b.csr",
                "-subj",
                "/CN=same",
            ][..],
            &[
                "x509",
                "-req",
                "-in",
                "b.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-out",
                "b.pem",
                "-days",
                "30",
                "-set_serial",
                "0xF3A1",
            ][..],
        ] {
            openssl(d, args);
        }
        let (b, text) = both(d, "b.pem");
        assert_eq!((b.subject.as_str(), b.issuer.as_str()), ("CN=same", "CN=same"));
        assert!(!b.self_signed, "signed by the other CN=same");
        assert_eq!(b.serial, "F3A1");
        assert_eq!(b.serial, line(&text, "serial="));
        assert_eq!(
            (b.key_type.as_str(), b.key_bits, b.curve.as_deref()),
            ("EC", 384, Some("P-384"))
        );
        assert!(text.contains("NIST CURVE: P-384"), "{text}");
        let (ca, _) = both(d, "ca.pem");
        assert!(ca.self_signed);

        // The weak old kind: RSA-1024 signed with SHA-1.
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:1024",
                "-sha1",
                "-nodes",
                "-keyout",
                "w.key",
                "-out",
                "w.pem",
                "-days",
                "30",
                "-subj",
                "/CN=old.example",
            ],
        );
        let (w, text) = both(d, "w.pem");
        assert_eq!((w.key_bits, w.signature.as_str()), (1024, "sha1WithRSAEncryption"));
        assert!(text.contains("Public-Key: (1024 bit)"));
        assert!(w.self_signed);
    }

    #[test]
    fn serials_lose_the_sign_byte_and_sizes_count_bits() {
        assert_eq!(serial_hex(&[0x00, 0xf3, 0xa1]), "F3A1");
        assert_eq!(serial_hex(&[0x01, 0x23]), "0123");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(significant_bits(&[0x00, 0x80, 0, 0]), 24);
        assert_eq!(significant_bits(&[0x01, 0xff]), 9);
        assert_eq!(significant_bits(&[0, 0]), 0);
    }
}
