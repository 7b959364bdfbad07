//! Pieces every Keel binary shares. Nothing here knows about agents, servers or
//! the wire protocol; it may not depend on `keel-proto`.
#![deny(unsafe_code)]

pub mod alloc;
pub mod backoff;
pub mod config;
pub mod fingerprint;
pub mod fsutil;
pub mod ids;
pub mod keys;
pub mod logging;
pub mod maps;
pub mod residency;
pub mod secret;
pub mod shutdown;
#[cfg(feature = "test-support")]
pub mod testfs;
pub mod time;
pub mod tls;

/// The version of this build: `BUILD_VERSION` at compile time, or the crate version.
pub const VERSION: &str = match option_env!("BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// An error and its sources as one line, `outer: inner: innermost`, leaving out a
/// level whose text the next level repeats (as hyper and tonic errors do).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if parts.last().is_some_and(|prev| text.starts_with(prev.as_str())) {
            parts.pop();
        }
        if !parts.iter().any(|p| p.ends_with(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chain_drops_repeats() {
        let e = E(
            "transport error",
            Some(Box::new(E(
                "tcp connect error",
                Some(Box::new(E("tcp connect error: refused", None))),
            ))),
        );
        assert_eq!(super::error_chain(&e), "transport error: tcp connect error: refused");
    }
}
