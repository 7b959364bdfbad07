//! [`AgentKey`]: the agent key a provider returned, which never leaves the plugin.
//! It has no `Display`, no `Serialize` and no `Clone`, and its `Debug` is redacted,
//! so the only way to its text is [`AgentKey::expose`], used for the key proof.

/// An agent key, validated by [`crate::reply`].
pub struct AgentKey(String);

impl AgentKey {
    /// Wraps a validated key.
    pub(crate) fn new(key: String) -> Self {
        Self(key)
    }

    /// The key's text, for computing the key proof; for nothing else.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let k = AgentKey::new("s3cret-agent-key".into());
        assert_eq!(format!("{k:?}"), "AgentKey(<redacted>)");
        assert_eq!(format!("{k:#?}"), "AgentKey(<redacted>)");
        assert_eq!(k.expose(), "s3cret-agent-key");
    }
}
