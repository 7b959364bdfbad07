//! Agent products: what an agent says it is in `PackagedData.product`, and what
//! that means for the server.
//!
//! | product | answers `config_token` with 5100 | its own tasks addressed to | plugin `Config.signature` |
//! |---|---|---|---|
//! | `keel-agent` | yes | `keel-agent` | hex Ed25519 signature of the package |
//! | `elkeid-agent` | no | `elkeid-agent` | hex SHA-256 of the plugin executable |
//! | anything else | no | its product name | as Elkeid |
//!
//! An agent that does not answer `config_token` has a sync-config judged from
//! its plugin heartbeats (1001) instead, and is never sent Keel's own package
//! (`keel-agent`, a deb or rpm) as a plugin.

/// Keel's agent, and the component name of its packages.
pub const KEEL_AGENT: &str = "keel-agent";
/// Elkeid's agent.
pub const ELKEID_AGENT: &str = "elkeid-agent";

/// What the server knows about a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    /// `keel-agent`.
    Keel,
    /// `elkeid-agent`, or any other product: Elkeid's protocol without Keel's
    /// additions.
    Foreign,
}

impl Product {
    /// The product an agent named.
    pub fn of(name: &str) -> Self {
        if name == KEEL_AGENT { Self::Keel } else { Self::Foreign }
    }

    /// Whether the agent answers a `Command.config_token` with a 5100 result.
    pub fn answers_config_token(self) -> bool {
        self == Self::Keel
    }

    /// Whether `Config.signature` carries the hex SHA-256 of the plugin's
    /// executable (Elkeid's check) rather than Keel's Ed25519 signature.
    pub fn signature_is_sha256(self) -> bool {
        self == Self::Foreign
    }
}

/// The object name a task for the agent itself carries for an agent of
/// `product`: Keel addresses them to `keel-agent`, Elkeid's agent takes only its
/// own product name.
pub fn addressed<'a>(object_name: &'a str, product: &'a str) -> &'a str {
    if object_name == KEEL_AGENT && !product.is_empty() {
        product
    } else {
        object_name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keel_agents_answer_config_tokens_and_tasks_follow_the_product() {
        assert!(Product::of("keel-agent").answers_config_token());
        assert!(!Product::of(ELKEID_AGENT).answers_config_token());
        assert!(!Product::of("").answers_config_token());
        assert!(Product::of("my-agent").signature_is_sha256());
        assert_eq!(addressed(KEEL_AGENT, ELKEID_AGENT), ELKEID_AGENT);
        assert_eq!(addressed(KEEL_AGENT, KEEL_AGENT), KEEL_AGENT);
        assert_eq!(addressed(KEEL_AGENT, ""), KEEL_AGENT);
        assert_eq!(addressed("proxy", ELKEID_AGENT), "proxy");
    }
}
