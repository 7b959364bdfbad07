//! API tokens (with roles) and enrollment tokens. Only SHA-256 hashes of the
//! secrets are stored; a secret is shown once, when it is made.

use std::fmt;
use std::time::Duration;

use base64::Engine;
use keel_common::secret::Secret;
use keel_common::time::now_ms;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{Store, StoreError};

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read-only.
    Viewer,
    /// Components, policies, tasks, agents.
    Operator,
    /// Everything, including tokens.
    Admin,
}

impl Role {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token just made; the secret is not stored anywhere else.
#[derive(Debug)]
pub struct NewToken {
    /// Public identifier, for listing and revoking.
    pub id: String,
    /// The secret, shown once.
    pub secret: Secret,
    /// Expiry, Unix ms, if any.
    pub expires_at: Option<i64>,
}

/// Why an enrollment token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No such token.
    #[error("unknown enrollment token")]
    Unknown,
    /// Past its expiry.
    #[error("enrollment token {0} has expired")]
    Expired(String),
    /// Every use is spent.
    #[error("enrollment token {0} has no uses left")]
    UsedUp(String),
    /// Revoked by an operator.
    #[error("enrollment token {0} was revoked")]
    Revoked(String),
}

/// A token as listed.
#[derive(Debug, Clone)]
pub struct TokenRow {
    /// Identifier.
    pub id: String,
    /// `enrollment` or a role.
    pub kind: String,
    /// Free text.
    pub description: String,
    /// Made at, Unix ms.
    pub created_at: i64,
    /// Expiry, Unix ms.
    pub expires_at: Option<i64>,
    /// Uses so far and the cap (enrollment tokens).
    pub uses: Option<(i64, i64)>,
    /// Revoked at, Unix ms.
    pub revoked_at: Option<i64>,
}

/// SHA-256 of a token secret, as stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn new_secret(prefix: &str) -> Result<(String, Secret), StoreError> {
    let rng = SystemRandom::new();
    let mut bytes = [0u8; 24];
    rng.fill(&mut bytes).map_err(|_| StoreError::Corrupt {
        what: "random source",
        message: "no entropy".into(),
    })?;
    let secret = format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let mut id = [0u8; 6];
    rng.fill(&mut id).map_err(|_| StoreError::Corrupt {
        what: "random source",
        message: "no entropy".into(),
    })?;
    Ok((hex::encode(id), Secret::new(secret)))
}

fn expiry(ttl: Option<Duration>, now: i64) -> Option<i64> {
    ttl.map(|t| now.saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)))
}

impl Store {
    /// Makes an API token with `role`.
    pub async fn create_api_token(
        &self,
        role: Role,
        ttl: Option<Duration>,
        description: &str,
    ) -> Result<NewToken, StoreError> {
        let (id, secret) = new_secret("keel_a_")?;
        let now = now_ms();
        let expires_at = expiry(ttl, now);
        sqlx::query(
            "INSERT INTO api_tokens (id, hash, role, description, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(hash_secret(secret.expose()))
        .bind(role.as_str())
        .bind(description)
        .bind(now)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(NewToken { id, secret, expires_at })
    }

    /// The token ID and role of a valid (known, unexpired, unrevoked) API token.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<(String, Role)>, StoreError> {
        let row = self.timed("authenticate", sqlx::query(
            "SELECT id, role FROM api_tokens WHERE hash = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2)",
        )
        .bind(hash_secret(secret))
        .bind(now_ms())
        .fetch_optional(&self.pool))
        .await?;
        let Some(row) = row else { return Ok(None) };
        let id: String = row.try_get("id")?;
        let role: String = row.try_get("role")?;
        let role = Role::parse(&role).ok_or_else(|| StoreError::Corrupt {
            what: "token role",
            message: format!("unknown role {role:?}"),
        })?;
        Ok(Some((id, role)))
    }

    /// Makes an enrollment token valid for `ttl` and `max_uses` enrollments.
    pub async fn create_enrollment_token(
        &self,
        ttl: Duration,
        max_uses: u32,
        description: &str,
    ) -> Result<NewToken, StoreError> {
        let (id, secret) = new_secret("keel_e_")?;
        let now = now_ms();
        let expires_at = expiry(Some(ttl), now).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, hash, description, created_at, expires_at, max_uses) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(hash_secret(secret.expose()))
        .bind(description)
        .bind(now)
        .bind(expires_at)
        .bind(i64::from(max_uses))
        .execute(&self.pool)
        .await?;
        Ok(NewToken {
            id,
            secret,
            expires_at: Some(expires_at),
        })
    }

    /// Spends one use of an enrollment token, atomically. Returns the token's ID.
    pub async fn consume_enrollment_token(&self, secret: &str) -> Result<Result<String, TokenRefusal>, StoreError> {
        let hash = hash_secret(secret);
        let now = now_ms();
        let spent = sqlx::query(
            "UPDATE enrollment_tokens SET uses = uses + 1 \
             WHERE hash = $1 AND revoked_at IS NULL AND expires_at > $2 AND uses < max_uses RETURNING id",
        )
        .bind(&hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = spent {
            return Ok(Ok(row.try_get("id")?));
        }
        let row =
            sqlx::query("SELECT id, expires_at, uses, max_uses, revoked_at FROM enrollment_tokens WHERE hash = $1")
                .bind(&hash)
                .fetch_optional(&self.pool)
                .await?;
        let Some(row) = row else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let id: String = row.try_get("id")?;
        let revoked: Option<i64> = row.try_get("revoked_at")?;
        let expires: i64 = row.try_get("expires_at")?;
        Ok(Err(if revoked.is_some() {
            TokenRefusal::Revoked(id)
        } else if expires <= now {
            TokenRefusal::Expired(id)
        } else {
            TokenRefusal::UsedUp(id)
        }))
    }

    /// Revokes a token of either kind by ID. Returns whether one was found.
    pub async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        let a = sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        let e = sqlx::query("UPDATE enrollment_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(a.rows_affected() + e.rows_affected() > 0)
    }

    /// Every token, newest first. Secrets are not stored, so none is shown.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let mut out = Vec::new();
        for row in sqlx::query("SELECT id, role, description, created_at, expires_at, revoked_at FROM api_tokens")
            .fetch_all(&self.pool)
            .await?
        {
            out.push(TokenRow {
                id: row.try_get("id")?,
                kind: row.try_get("role")?,
                description: row.try_get("description")?,
                created_at: row.try_get("created_at")?,
                expires_at: row.try_get("expires_at")?,
                uses: None,
                revoked_at: row.try_get("revoked_at")?,
            });
        }
        for row in sqlx::query(
            "SELECT id, description, created_at, expires_at, uses, max_uses, revoked_at FROM enrollment_tokens",
        )
        .fetch_all(&self.pool)
        .await?
        {
            out.push(TokenRow {
                id: row.try_get("id")?,
                kind: "enrollment".into(),
                description: row.try_get("description")?,
                created_at: row.try_get("created_at")?,
                expires_at: Some(row.try_get("expires_at")?),
                uses: Some((row.try_get("uses")?, row.try_get("max_uses")?)),
                revoked_at: row.try_get("revoked_at")?,
            });
        }
        out.sort_by_key(|t| std::cmp::Reverse(t.created_at));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_store;

    #[tokio::test]
    async fn enrollment_tokens_expire_and_run_out() {
        let (store, _dir) = test_store().await;
        let t = store
            .create_enrollment_token(Duration::from_secs(60), 2, "")
            .await
            .unwrap();
        let secret = t.secret.expose();
        assert_eq!(store.consume_enrollment_token(secret).await.unwrap(), Ok(t.id.clone()));
        assert_eq!(store.consume_enrollment_token(secret).await.unwrap(), Ok(t.id.clone()));
        assert_eq!(
            store.consume_enrollment_token(secret).await.unwrap(),
            Err(TokenRefusal::UsedUp(t.id.clone()))
        );
        assert_eq!(
            store.consume_enrollment_token("keel_e_nope").await.unwrap(),
            Err(TokenRefusal::Unknown)
        );

        let old = store.create_enrollment_token(Duration::ZERO, 5, "").await.unwrap();
        assert_eq!(
            store.consume_enrollment_token(old.secret.expose()).await.unwrap(),
            Err(TokenRefusal::Expired(old.id.clone()))
        );
        let gone = store
            .create_enrollment_token(Duration::from_secs(60), 5, "")
            .await
            .unwrap();
        assert!(store.revoke_token(&gone.id).await.unwrap());
        assert_eq!(
            store.consume_enrollment_token(gone.secret.expose()).await.unwrap(),
            Err(TokenRefusal::Revoked(gone.id.clone()))
        );
    }

    #[tokio::test]
    async fn api_tokens_authenticate_until_revoked() {
        let (store, _dir) = test_store().await;
        let t = store.create_api_token(Role::Operator, None, "ci").await.unwrap();
        assert_eq!(
            store.authenticate(t.secret.expose()).await.unwrap(),
            Some((t.id.clone(), Role::Operator))
        );
        assert_eq!(store.authenticate("keel_a_wrong").await.unwrap(), None);
        store.revoke_token(&t.id).await.unwrap();
        assert_eq!(store.authenticate(t.secret.expose()).await.unwrap(), None);
        let expired = store
            .create_api_token(Role::Admin, Some(Duration::ZERO), "")
            .await
            .unwrap();
        assert_eq!(store.authenticate(expired.secret.expose()).await.unwrap(), None);
        // Only hashes are stored.
        let hashes: Vec<String> = sqlx::query_scalar("SELECT hash FROM api_tokens")
            .fetch_all(store.pool())
            .await
            .unwrap();
        assert!(hashes.iter().all(|h| !h.contains("keel_a_")));
    }
}
