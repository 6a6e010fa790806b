//! The TLS crypto provider both sides of the proxy use.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// *ring*'s provider: TLS 1.2 and 1.3 with X25519 and the NIST curves, built with a C
/// compiler alone.
///
/// NOTE: rustls 0.23.48 deprecated it because *ring* has no post-quantum key exchange
/// (X25519MLKEM768 needs the aws-lc-rs provider). aws-lc-rs needs CMake (and more build
/// time) on some platforms, which would break the no-setup build the README promises, so
/// *ring* stays the default here until an `aws-lc-rs` feature offers the hybrid exchange.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    #[expect(
        deprecated,
        reason = "ring on purpose: see above; the replacement needs aws-lc-rs"
    )]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(provider)
}
