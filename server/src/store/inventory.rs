//! The TLS inventory: the certificate each scanned target presented.

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use super::{Store, StoreError, corrupt};
use crate::certinfo::CertInfo;
use crate::findings::Finding;
use crate::tlsprobe::Profile;

/// A target's certificate as the inventory holds it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema, PartialEq, Eq)]
pub struct CertRow {
    /// The agent whose proxy reached the target.
    pub agent_id: String,
    /// `host:port` as scanned.
    pub target: String,
    /// SHA-256 of the leaf certificate (DER), hex.
    pub fingerprint: String,
    /// Subject DN, RFC 4514.
    pub subject: String,
    /// Issuer DN, RFC 4514.
    pub issuer: String,
    /// DNS names and IP addresses (subjectAltName).
    pub names: Vec<String>,
    /// Serial, uppercase hex without the DER sign byte.
    pub serial: String,
    /// Valid from, Unix ms.
    pub not_before: i64,
    /// Valid until, Unix ms.
    pub not_after: i64,
    /// Key type and exact size, e.g. `RSA 2049`, `EC 384`.
    pub public_key: String,
    /// Signature algorithm, e.g. `ecdsa-with-SHA256`.
    pub signature: String,
    /// Certificates the target sent.
    pub chain_length: i64,
    /// The leaf's signature verifies with its own key.
    pub self_signed: bool,
    /// What an auditor flags, most severe first.
    #[serde(default)]
    pub findings: Vec<Finding>,
    /// Every certificate the target sent, leaf first, field by field.
    #[serde(default)]
    pub chain: Vec<CertInfo>,
    /// What the target accepts: protocol versions and suites, a weak suite, its
    /// OCSP staple.
    #[serde(default)]
    pub tls: Profile,
    /// When this certificate was first seen at the target, Unix ms.
    pub first_seen: i64,
    /// When the target was last scanned, Unix ms.
    pub last_seen: i64,
}

impl Store {
    /// Records a scan's certificate; `first_seen` stays while the fingerprint does.
    pub async fn save_certificate(&self, c: &CertRow) -> Result<(), StoreError> {
        let names = serde_json::to_string(&c.names).map_err(corrupt("certificate names"))?;
        let chain = serde_json::to_string(&c.chain).map_err(corrupt("certificate chain"))?;
        let findings = serde_json::to_string(&c.findings).map_err(corrupt("certificate findings"))?;
        let tls = serde_json::to_string(&c.tls).map_err(corrupt("certificate protocols"))?;
        sqlx::query(
            "INSERT INTO tls_certificates (agent_id, target, fingerprint, subject, issuer, names, serial, not_before, \
             not_after, public_key, signature, chain_length, self_signed, first_seen, last_seen, chain, findings, tls) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, $15, $16, $17) \
             ON CONFLICT (agent_id, target) DO UPDATE SET \
             first_seen = CASE WHEN tls_certificates.fingerprint = excluded.fingerprint \
                          THEN tls_certificates.first_seen ELSE excluded.first_seen END, \
             fingerprint = excluded.fingerprint, subject = excluded.subject, issuer = excluded.issuer, \
             names = excluded.names, serial = excluded.serial, not_before = excluded.not_before, \
             not_after = excluded.not_after, public_key = excluded.public_key, signature = excluded.signature, \
             chain_length = excluded.chain_length, self_signed = excluded.self_signed, last_seen = excluded.last_seen, \
             chain = excluded.chain, findings = excluded.findings, tls = excluded.tls",
        )
        .bind(&c.agent_id)
        .bind(&c.target)
        .bind(&c.fingerprint)
        .bind(&c.subject)
        .bind(&c.issuer)
        .bind(names)
        .bind(&c.serial)
        .bind(c.not_before)
        .bind(c.not_after)
        .bind(&c.public_key)
        .bind(&c.signature)
        .bind(c.chain_length)
        .bind(i64::from(c.self_signed))
        .bind(c.last_seen)
        .bind(chain)
        .bind(findings)
        .bind(tls)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The inventory, soonest expiry first; only `agent`'s, and only certificates
    /// expiring before `before` (Unix ms), when given.
    pub async fn certificates(&self, agent: Option<&str>, before: Option<i64>) -> Result<Vec<CertRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT agent_id, target, fingerprint, subject, issuer, names, serial, not_before, not_after, public_key, \
             signature, chain_length, self_signed, first_seen, last_seen, chain, findings, tls FROM tls_certificates \
             WHERE ($1 = '' OR agent_id = $1) AND ($2 = 0 OR not_after < $2) ORDER BY not_after, agent_id, target",
        )
        .bind(agent.unwrap_or(""))
        .bind(before.unwrap_or(0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let names: String = r.try_get("names")?;
                let self_signed: i64 = r.try_get("self_signed")?;
                let chain: String = r.try_get("chain")?;
                let findings: String = r.try_get("findings")?;
                let tls: String = r.try_get("tls")?;
                Ok(CertRow {
                    agent_id: r.try_get("agent_id")?,
                    target: r.try_get("target")?,
                    fingerprint: r.try_get("fingerprint")?,
                    subject: r.try_get("subject")?,
                    issuer: r.try_get("issuer")?,
                    names: serde_json::from_str(&names).map_err(corrupt("certificate names"))?,
                    serial: r.try_get("serial")?,
                    not_before: r.try_get("not_before")?,
                    not_after: r.try_get("not_after")?,
                    public_key: r.try_get("public_key")?,
                    signature: r.try_get("signature")?,
                    chain_length: r.try_get("chain_length")?,
                    self_signed: self_signed != 0,
                    first_seen: r.try_get("first_seen")?,
                    last_seen: r.try_get("last_seen")?,
                    findings: serde_json::from_str(&findings).map_err(corrupt("certificate findings"))?,
                    chain: serde_json::from_str(&chain).map_err(corrupt("certificate chain"))?,
                    tls: serde_json::from_str(&tls).map_err(corrupt("certificate protocols"))?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row(target: &str, fp: &str, not_after: i64, seen: i64) -> CertRow {
        CertRow {
            agent_id: "a1".into(),
            target: target.into(),
            fingerprint: fp.into(),
            subject: "CN=db".into(),
            issuer: "CN=ca".into(),
            names: vec!["db.internal".into()],
            serial: "01".into(),
            not_before: 0,
            not_after,
            public_key: "EC 256".into(),
            signature: "ecdsa-with-SHA256".into(),
            chain_length: 1,
            self_signed: false,
            first_seen: seen,
            last_seen: seen,
            findings: Vec::new(),
            chain: Vec::new(),
            tls: Profile::default(),
        }
    }

    #[tokio::test]
    async fn rescans_keep_first_seen_until_the_certificate_changes() {
        let (store, _dir) = crate::store::test_store().await;
        store.save_certificate(&row("db:443", "aa", 2_000, 10)).await.unwrap();
        store.save_certificate(&row("web:443", "bb", 1_000, 10)).await.unwrap();
        store.save_certificate(&row("db:443", "aa", 2_000, 20)).await.unwrap();
        let all = store.certificates(None, None).await.unwrap();
        assert_eq!(
            all.iter().map(|c| c.target.as_str()).collect::<Vec<_>>(),
            ["web:443", "db:443"]
        );
        assert_eq!((all[1].first_seen, all[1].last_seen), (10, 20));
        assert_eq!(all[1].names, ["db.internal"]);
        assert!(all[1].chain.is_empty());
        store.save_certificate(&row("db:443", "cc", 3_000, 30)).await.unwrap();
        let db = store.certificates(Some("a1"), Some(5_000)).await.unwrap();
        let db = db.iter().find(|c| c.target == "db:443").unwrap();
        assert_eq!((db.fingerprint.as_str(), db.first_seen), ("cc", 30));
        assert_eq!(store.certificates(None, Some(1_500)).await.unwrap().len(), 1);
        assert!(store.certificates(Some("a2"), None).await.unwrap().is_empty());
    }
}
