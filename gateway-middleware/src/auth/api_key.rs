//! API keys: consumers with keys and groups, the keys held as SHA-256 digests.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use gateway_core::Identity;
use http::header::{HeaderName, HeaderValue};
use http::request;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::credential::Source;
use super::{Authenticate, Check, Grant, Rejection, Verdict, challenge};

/// The consumers that may call with an API key, each with one or more keys.
///
/// Only the SHA-256 digest of each key is kept, never the key; a presented key is hashed
/// and its digest compared with the stored ones in constant time, so neither memory nor
/// timing tells a key.
#[derive(Clone, Default)]
pub struct ApiKeys {
    by_digest: HashMap<Digest, Identity, BuildHasherDefault<DigestHasher>>,
}

/// A key's SHA-256 digest, compared in constant time.
#[derive(Clone, Copy, Eq)]
struct Digest([u8; 32]);

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0[..8]);
    }
}

/// The first eight bytes of a digest as its hash: they are uniform, and a client cannot
/// choose them (that would take a preimage), so there is nothing to flood.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
}

fn digest(key: &[u8]) -> Digest {
    Digest(Sha256::digest(key).into())
}

impl ApiKeys {
    /// No consumers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `identity` with `keys`. A key given twice belongs to the last consumer given.
    #[must_use]
    pub fn consumer<I, K>(mut self, identity: Identity, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<[u8]>,
    {
        for key in keys {
            self.by_digest
                .insert(digest(key.as_ref()), identity.clone());
        }
        self
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The consumer whose key `key` is.
    pub fn find(&self, key: &[u8]) -> Option<&Identity> {
        self.by_digest.get(&digest(key))
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.by_digest.len())
            .finish_non_exhaustive()
    }
}

/// Authenticates by API key (Kong's `key-auth`): from the `X-API-Key` header by default,
/// or another header, or a query parameter by choice.
#[derive(Clone)]
pub struct KeyAuth {
    keys: Arc<ApiKeys>,
    sources: Arc<[Source]>,
    hide: bool,
    challenge: HeaderValue,
}

impl KeyAuth {
    /// The keys of `keys`, read from `X-API-Key`.
    pub fn new(keys: ApiKeys) -> Self {
        Self {
            keys: Arc::new(keys),
            sources: Arc::new([Source::Header(HeaderName::from_static("x-api-key"))]),
            hide: false,
            challenge: HeaderValue::from_static("ApiKey realm=\"gateway\""),
        }
    }

    /// Reads the key from these places instead (the first that has one; a key in two
    /// places is ambiguous and refused).
    #[must_use]
    pub fn sources(mut self, sources: impl IntoIterator<Item = Source>) -> Self {
        self.sources = sources.into_iter().collect();
        self
    }

    /// Takes the key out of the request before it goes on (Kong's `hide_credentials`).
    #[must_use]
    pub const fn hide_credentials(mut self, hide: bool) -> Self {
        self.hide = hide;
        self
    }

    /// The realm of the 401's challenge (`ApiKey realm="..."`) [default: `gateway`].
    ///
    /// # Panics
    ///
    /// When `realm` cannot be in a header (a control character): a bug in the caller.
    #[must_use]
    pub fn realm(mut self, realm: &str) -> Self {
        #[expect(
            clippy::expect_used,
            reason = "documented: a realm is the caller's text"
        )]
        let challenge = challenge("ApiKey", realm, "").expect("a realm without control characters");
        self.challenge = challenge;
        self
    }
}

impl Authenticate for KeyAuth {
    fn name(&self) -> &'static str {
        "key-auth"
    }

    fn authenticate(&self, req: &request::Parts) -> Check {
        let mut found = None;
        for source in self.sources.iter() {
            match source.find(req) {
                Ok(None) => {}
                Ok(Some(key)) if found.is_none() => found = Some((source, key)),
                Ok(Some(_)) => {
                    return Verdict::Rejected(Rejection::unauthenticated("key-auth", "ambiguous"))
                        .into();
                }
                Err(why) => {
                    return Verdict::Rejected(Rejection::unauthenticated("key-auth", why.reason()))
                        .into();
                }
            }
        }
        let Some((source, key)) = found else {
            return Verdict::Absent.into();
        };
        match self.keys.find(key.as_bytes()) {
            Some(identity) => {
                let mut grant = Grant::new("key-auth", identity.clone());
                if self.hide {
                    grant = grant.strip(source.clone());
                }
                Verdict::Accepted(grant).into()
            }
            None => Verdict::Rejected(
                Rejection::unauthenticated("key-auth", "unknown_key")
                    .detail(format!("no consumer has the key in {}", source.describe())),
            )
            .into(),
        }
    }

    fn challenge(&self) -> Option<HeaderValue> {
        Some(self.challenge.clone())
    }
}

impl fmt::Debug for KeyAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAuth")
            .field("keys", &self.keys)
            .field("sources", &self.sources)
            .field("hide", &self.hide)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_digest() {
        let keys = ApiKeys::new()
            .consumer(Identity::consumer("alice"), ["k1", "k2"])
            .consumer(Identity::consumer("bob"), ["k3"]);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.find(b"k2").map(Identity::name), Some("alice"));
        assert_eq!(keys.find(b"k3").map(Identity::name), Some("bob"));
        assert!(keys.find(b"k4").is_none());
        assert!(keys.find(b"").is_none());
        assert!(keys.find(&[0xff; 5000]).is_none(), "any length, no panic");
        let debug = format!("{keys:?}");
        assert!(!debug.contains("k1"), "{debug}");
    }

    #[test]
    fn digests_compare_in_constant_time_and_whole() {
        let a = digest(b"a");
        let mut b = a;
        b.0[31] ^= 1;
        assert!(a == a);
        assert!(a != b, "the last byte counts");
    }
}
