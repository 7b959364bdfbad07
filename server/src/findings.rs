//! What an auditor flags in a scanned chain, each with a severity: computed by the
//! server at each scan from the certificates as the target sent them.
//!
//! | code | severity | when |
//! |---|---|---|
//! | `expired` | critical | the leaf's validity ended |
//! | `not_yet_valid` | high | the leaf's validity has not begun |
//! | `expires_soon` | high | the leaf expires within [`EXPIRES_SOON`] |
//! | `weak_key` | high | a certificate has an RSA key under 2048 bits or an EC key under 256 |
//! | `weak_signature` | high | a certificate other than a root is signed with SHA-1 or MD5 |
//! | `hostname_mismatch` | high | the leaf's names do not cover the host scanned (checked as a browser does: SANs, wildcards) |
//! | `untrusted_root` | high | the chain ends at a self-signed certificate no trust anchor names |
//! | `incomplete_chain` | medium | no path from what was sent to a trust anchor: intermediates are missing |
//! | `invalid_chain` | medium | a path exists but does not verify (the reason is named) |
//! | `self_signed` | medium | the leaf signed itself |
//! | `sslv3_enabled` | high | the target completes an SSL 3.0 hello |
//! | `tls10_enabled`, `tls11_enabled` | medium | the target completes a TLS 1.0 (1.1) hello |
//! | `no_current_protocol` | high | neither TLS 1.2 nor TLS 1.3 |
//! | `weak_cipher` | critical (NULL, EXPORT, anonymous) or high (RC4, 3DES) | the target chooses a weak suite when offered only those |
//! | `ocsp_revoked` | critical | the stapled OCSP response says revoked |
//! | `ocsp_stale` | medium | the stapled OCSP response is past its next update |
//!
//! The trust anchors are the system's bundle and, optionally, a private CA bundle
//! (`[tunnel] inventory_ca_bundle`); the chain is judged at a time within the
//! leaf's validity, so an expired leaf is `expired` and its chain judged apart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::certinfo::CertInfo;
use crate::tlsprobe::Profile;

/// How soon an expiry is a finding.
pub const EXPIRES_SOON: Duration = Duration::from_secs(30 * 24 * 3600);

/// Where Linux distributions keep the system's trust bundle, tried in order.
pub const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Low,
    /// To fix.
    Medium,
    /// To fix soon.
    High,
    /// Broken now.
    Critical,
}

/// One finding about a scanned target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// What it is: see the module table.
    pub code: String,
    /// What exactly, for a person.
    pub message: String,
}

fn finding(severity: Severity, code: &str, message: String) -> Finding {
    Finding {
        severity,
        code: code.to_owned(),
        message,
    }
}

/// The trust anchors chains are judged against.
#[derive(Debug)]
pub struct Trust {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    /// Where they came from, for messages.
    sources: Vec<PathBuf>,
}

impl Trust {
    /// Loads the first system bundle found (when `system`) and `private`, if given.
    pub fn load(system: bool, private: Option<&Path>) -> Result<Self, String> {
        let mut trust = Self {
            anchors: Vec::new(),
            sources: Vec::new(),
        };
        if system && let Some(path) = SYSTEM_BUNDLES.iter().map(Path::new).find(|p| p.exists()) {
            trust.add(path)?;
        }
        if let Some(path) = private {
            trust.add(path)?;
        }
        Ok(trust)
    }

    fn add(&mut self, path: &Path) -> Result<(), String> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", path.display()));
        }
        for c in &certs {
            // A bundle's odd certificate is skipped, not fatal.
            if let Ok(a) = webpki::anchor_from_trusted_cert(c) {
                self.anchors.push(a.to_owned());
            }
        }
        self.sources.push(path.to_owned());
        Ok(())
    }

    /// How many anchors there are.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// The bundles they came from.
    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }
}

/// The findings for a chain sent by `host`, at `now` (Unix ms). `infos` are the
/// chain's certificates described ([`crate::certinfo::describe`]), in order.
pub fn assess(chain: &[CertificateDer<'_>], infos: &[CertInfo], host: &str, now: i64, trust: &Trust) -> Vec<Finding> {
    let mut out = Vec::new();
    let (Some(leaf_der), Some(leaf)) = (chain.first(), infos.first()) else {
        return out;
    };
    let day = 24 * 3600 * 1000;
    if now > leaf.not_after {
        out.push(finding(
            Severity::Critical,
            "expired",
            format!("expired {} days ago", (now - leaf.not_after) / day),
        ));
    } else if now < leaf.not_before {
        out.push(finding(Severity::High, "not_yet_valid", "not valid yet".into()));
    } else if leaf.not_after - now < i64::try_from(EXPIRES_SOON.as_millis()).unwrap_or(i64::MAX) {
        out.push(finding(
            Severity::High,
            "expires_soon",
            format!("expires in {} days", (leaf.not_after - now) / day),
        ));
    }
    for (i, c) in infos.iter().enumerate() {
        let weak = match c.key_type.as_str() {
            "RSA" => c.key_bits < 2048,
            "EC" => c.key_bits < 256,
            _ => false,
        };
        if weak {
            out.push(finding(
                Severity::High,
                "weak_key",
                format!("{}: {} {}-bit key", which(i, c), c.key_type, c.key_bits),
            ));
        }
        let sig = c.signature.to_ascii_lowercase();
        if !c.self_signed && (sig.contains("sha1") || sig.contains("md5") || sig.contains("md2")) {
            out.push(finding(
                Severity::High,
                "weak_signature",
                format!("{}: signed with {}", which(i, c), c.signature),
            ));
        }
    }
    if leaf.self_signed {
        out.push(finding(
            Severity::Medium,
            "self_signed",
            format!("the leaf ({}) signed itself", leaf.subject),
        ));
    }
    let Ok(ee) = webpki::EndEntityCert::try_from(leaf_der) else {
        out.push(finding(
            Severity::Medium,
            "invalid_chain",
            "the leaf does not parse as a webpki end-entity".into(),
        ));
        return out;
    };
    if let Ok(name) = ServerName::try_from(host)
        && ee.verify_is_valid_for_subject_name(&name).is_err()
    {
        let names = if leaf.sans.is_empty() {
            "no subject alternative names".to_owned()
        } else {
            leaf.sans.join(", ")
        };
        out.push(finding(
            Severity::High,
            "hostname_mismatch",
            format!("not valid for {host} (it names {names})"),
        ));
    }
    // Judged within the leaf's validity: expiry is reported above, on its own.
    // (Not `clamp`: a certificate may claim to end before it begins.)
    let at = now.max(leaf.not_before).min(leaf.not_after);
    let at = UnixTime::since_unix_epoch(Duration::from_millis(u64::try_from(at).unwrap_or(0)));
    let algs = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    let verified = ee.verify_for_usage(
        algs,
        &trust.anchors,
        &chain[1..],
        at,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    match verified {
        Ok(_) => {}
        Err(webpki::Error::UnknownIssuer) => {
            let last = infos.last().unwrap_or(leaf);
            if last.self_signed {
                out.push(finding(
                    Severity::High,
                    "untrusted_root",
                    format!("the chain ends at {}, which no trust anchor names", last.subject),
                ));
            } else {
                out.push(finding(
                    Severity::Medium,
                    "incomplete_chain",
                    format!(
                        "no path from {} (issued by {}) to a trust anchor: intermediates are missing",
                        last.subject, last.issuer
                    ),
                ));
            }
        }
        Err(e) => out.push(finding(
            Severity::Medium,
            "invalid_chain",
            format!("the chain does not verify: {e}"),
        )),
    }
    order(&mut out);
    out
}

/// Sorts findings most severe first.
pub fn order(findings: &mut [Finding]) {
    findings.sort_by(|a, b| b.severity.cmp(&a.severity).then_with(|| a.code.cmp(&b.code)));
}

/// What an auditor flags in what a target accepts: old protocols, a weak suite,
/// no current protocol, a revoked or stale staple.
pub fn of_profile(p: &Profile, now: i64) -> Vec<Finding> {
    let mut out = Vec::new();
    let accepted = |v: &str| p.protocols.iter().any(|s| s.version == v && s.accepted);
    for (version, code, severity) in [
        ("SSLv3", "sslv3_enabled", Severity::High),
        ("TLSv1.0", "tls10_enabled", Severity::Medium),
        ("TLSv1.1", "tls11_enabled", Severity::Medium),
    ] {
        if accepted(version) {
            out.push(finding(severity, code, format!("accepts {version}")));
        }
    }
    // Only when both were asked: a probe that could not run proves nothing.
    let probed = |v: &str| p.protocols.iter().any(|s| s.version == v && s.probed);
    if probed("TLSv1.2") && probed("TLSv1.3") && !accepted("TLSv1.2") && !accepted("TLSv1.3") {
        out.push(finding(
            Severity::High,
            "no_current_protocol",
            "accepts neither TLS 1.2 nor TLS 1.3".into(),
        ));
    }
    if let Some(suite) = &p.weak_suite {
        // No encryption, export grade or no authentication: broken now.
        let severity = if ["NULL", "EXPORT", "anon"].iter().any(|w| suite.contains(w)) {
            Severity::Critical
        } else {
            Severity::High
        };
        out.push(finding(severity, "weak_cipher", format!("accepts {suite}")));
    }
    if let Some(staple) = &p.ocsp {
        if staple.status == "revoked" {
            out.push(finding(
                Severity::Critical,
                "ocsp_revoked",
                "the stapled OCSP response says the certificate is revoked".into(),
            ));
        } else if staple.next_update.is_some_and(|n| n < now) {
            out.push(finding(
                Severity::Medium,
                "ocsp_stale",
                "the stapled OCSP response is past its next update".into(),
            ));
        }
    }
    out
}

fn which(i: usize, c: &CertInfo) -> String {
    if i == 0 {
        format!("the leaf ({})", c.subject)
    } else {
        format!("certificate {i} ({})", c.subject)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::certinfo::describe;

    fn codes(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.code.as_str()).collect()
    }

    /// A CA, and a leaf for `names` it issued, valid from now for `days`.
    fn pki(
        names: &[&str],
        days: i64,
        key: &'static rcgen::SignatureAlgorithm,
    ) -> (rcgen::Certificate, rcgen::Certificate) {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(rcgen::DnType::CommonName, "Test Root");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate_for(key).unwrap();
        let mut leaf =
            rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        leaf.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        let now = time::OffsetDateTime::now_utc();
        leaf.not_after = now + time::Duration::days(days);
        leaf.not_before = leaf.not_after.min(now) - time::Duration::days(10);
        (leaf.signed_by(&key, &issuer).unwrap(), ca_cert)
    }

    fn trust_in(dir: &Path, ca: &rcgen::Certificate) -> Trust {
        let path = dir.join("ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        Trust::load(false, Some(&path)).unwrap()
    }

    fn assess_chain(chain: &[&rcgen::Certificate], host: &str, trust: &Trust) -> Vec<Finding> {
        let ders: Vec<CertificateDer<'static>> = chain.iter().map(|c| c.der().clone()).collect();
        let infos: Vec<CertInfo> = ders.iter().map(|d| describe(d).unwrap()).collect();
        assess(&ders, &infos, host, keel_common::time::now_ms(), trust)
    }

    #[test]
    fn a_good_chain_has_no_findings_and_each_flaw_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (leaf, ca) = pki(&["db.internal"], 365, &rcgen::PKCS_ECDSA_P256_SHA256);
        let trust = trust_in(dir.path(), &ca);
        assert_eq!(assess_chain(&[&leaf, &ca], "db.internal", &trust), []);
        // The root need not be sent.
        assert_eq!(assess_chain(&[&leaf], "db.internal", &trust), []);

        let f = assess_chain(&[&leaf], "web.internal", &trust);
        assert_eq!(codes(&f), ["hostname_mismatch"]);
        assert!(f[0].message.contains("DNS:db.internal"), "{f:?}");

        let nobody = Trust::load(false, None).unwrap();
        assert_eq!(
            codes(&assess_chain(&[&leaf, &ca], "db.internal", &nobody)),
            ["untrusted_root"]
        );
        assert_eq!(
            codes(&assess_chain(&[&leaf], "db.internal", &nobody)),
            ["incomplete_chain"]
        );

        let (soon, ca2) = pki(&["db.internal"], 10, &rcgen::PKCS_ECDSA_P256_SHA256);
        let trust2 = trust_in(dir.path(), &ca2);
        let f = assess_chain(&[&soon], "db.internal", &trust2);
        assert_eq!(codes(&f), ["expires_soon"]);
        assert_eq!(f[0].severity, Severity::High);

        let (expired, ca3) = pki(&["db.internal"], -2, &rcgen::PKCS_ECDSA_P256_SHA256);
        let trust3 = trust_in(dir.path(), &ca3);
        let f = assess_chain(&[&expired], "db.internal", &trust3);
        assert_eq!(codes(&f), ["expired"], "the chain is judged apart from the expiry");
        assert_eq!(f[0].severity, Severity::Critical);
    }

    #[test]
    fn a_certificate_that_ends_before_it_begins_is_judged_without_a_panic() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["db.internal".to_owned()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now + time::Duration::days(5);
        p.not_after = now - time::Duration::days(5);
        let cert = p.self_signed(&key).unwrap();
        let f = assess_chain(&[&cert], "db.internal", &Trust::load(false, None).unwrap());
        assert_eq!(f[0].code, "expired", "{f:?}");
    }

    #[test]
    fn self_signed_leaves_are_found() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["db.internal".to_owned()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, "db.internal");
        let cert = p.self_signed(&key).unwrap();
        let f = assess_chain(&[&cert], "db.internal", &Trust::load(false, None).unwrap());
        assert_eq!(codes(&f), ["untrusted_root", "self_signed"]);
    }

    #[test]
    fn the_system_bundle_loads_and_a_missing_private_one_is_named() {
        if SYSTEM_BUNDLES.iter().any(|p| Path::new(p).exists()) {
            let t = Trust::load(true, None).unwrap();
            assert!(t.len() > 10, "{} anchors", t.len());
        }
        let err = Trust::load(false, Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
