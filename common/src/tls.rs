//! The process-wide rustls crypto provider.

/// Installs ring as rustls's default provider. Safe to call more than once.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
