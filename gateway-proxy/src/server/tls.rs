//! TLS termination with rustls.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::invalid::Invalid;

/// A server certificate and key, with ALPN `h2` and `http/1.1`.
#[derive(Clone)]
pub struct TlsConfig {
    config: Arc<ServerConfig>,
}

/// A certificate or key that cannot be used: what is wrong, and the cause (if any) as
/// the error's `source`.
#[derive(Debug)]
pub struct InvalidTls(Invalid);

impl TlsConfig {
    /// Reads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    ///
    /// # Errors
    ///
    /// When a file cannot be read, holds no certificate or key, or the key does not match.
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, InvalidTls> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| {
                InvalidTls(Invalid::because(format!("cannot read {}", p.display()), e))
            })
        };
        Self::from_pem(&read(cert.as_ref())?, &read(key.as_ref())?)
    }

    /// Parses a PEM certificate chain and a PEM private key.
    ///
    /// # Errors
    ///
    /// When there is no certificate or key, or the key does not match the certificate.
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<Self, InvalidTls> {
        let certs = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InvalidTls(Invalid::because("the certificate PEM cannot be parsed", e)))?;
        if certs.is_empty() {
            return Err(InvalidTls(Invalid::new(
                "no certificate in the certificate file",
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| InvalidTls(Invalid::because("no usable private key", e)))?;
        let provider = crate::crypto::provider();
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
            .map_err(|e| {
                InvalidTls(Invalid::because(
                    "the certificate and key do not work together",
                    e,
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Uses a rustls configuration as it is (set its ALPN protocols yourself).
    pub const fn from_rustls(config: Arc<ServerConfig>) -> Self {
        Self { config }
    }

    pub(super) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.config))
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("alpn", &self.config.alpn_protocols.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Display for InvalidTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid TLS configuration: {}", self.0.reason)
    }
}

impl std::error::Error for InvalidTls {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
