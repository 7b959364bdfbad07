//! Certificates for what the server would never issue (other validity, a foreign
//! CA), an enrolled agent's own pair, and the body of an enrollment by key.

use serde_json::Value;

use crate::{Agent, Server};

/// A certificate and key in PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Certificate.
    pub cert: String,
    /// Private key.
    pub key: String,
}

fn client_params(
    agent_id: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, agent_id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

/// A client certificate for `agent_id` signed by the server's real CA key, with
/// the given validity: for certificates the server would never issue.
pub fn ca_signed(
    server: &Server,
    agent_id: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Pair {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(server.pki_dir().join("ca.key")).expect("ca.key"))
        .expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&server.ca_pem(), ca_key).expect("CA issuer");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = client_params(agent_id, not_before, not_after)
        .signed_by(&key, &issuer)
        .expect("sign");
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// A client certificate for `agent_id` from a CA the server does not know.
pub fn foreign_signed(agent_id: &str) -> Pair {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "Keel CA");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let now = time::OffsetDateTime::now_utc();
    let cert = client_params(agent_id, now - time::Duration::hours(1), now + time::Duration::days(1))
        .signed_by(&key, &issuer)
        .expect("sign");
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// The identity an enrolled agent stored.
pub fn agent_pair(agent: &Agent) -> Pair {
    let pki = agent.state_dir().join("pki");
    Pair {
        cert: std::fs::read_to_string(pki.join("agent.pem")).expect("agent.pem"),
        key: std::fs::read_to_string(pki.join("agent.key")).expect("agent.key"),
    }
}

/// The body of `POST /enroll/key` for `id`: a fresh CSR and the proof of `key`
/// over `nonce` and that CSR, as `keel-agent enroll --key-file` sends it.
pub fn key_enroll_body(nonce: &str, id: &str, key: &str, hostname: &str) -> Value {
    use sha2::Digest;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, id);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key_pair).expect("CSR");
    let csr_sha256 = sha2::Sha256::digest(csr.der());
    let proof = keel_proto::keyproof::prove(key, &hex::decode(nonce).expect("hex nonce"), &csr_sha256);
    serde_json::json!({"nonce": nonce, "id": id, "hostname": hostname, "csr": csr.pem().expect("PEM"), "proof": proof})
}
