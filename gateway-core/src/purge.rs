//! Forgetting what caches hold, from outside them: what the admin listener's purge calls.
//!
//! A cache offers a [`Purge`]; whoever builds the gateway keeps the caches it has in one
//! [`Purgers`] (the config's builder does, through [`Registry::purgers`]), and the admin
//! listener purges through it. `Purgers` holds each cache weakly: a cache a reload
//! dropped is no longer listed, and a purge never keeps one alive.
//!
//! [`Registry::purgers`]: crate::registry::Registry::purgers
//!
//! ```
//! use std::future::{Future, ready};
//! use std::pin::Pin;
//! use std::sync::Arc;
//! use gateway_core::BoxError;
//! use gateway_core::purge::{Purge, PurgeTarget, Purgers};
//!
//! struct Nothing;
//!
//! impl Purge for Nothing {
//!     fn purge<'a>(
//!         &'a self,
//!         _: &'a PurgeTarget,
//!     ) -> Pin<Box<dyn Future<Output = Result<u64, BoxError>> + Send + 'a>> {
//!         Box::pin(ready(Ok(0)))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let purgers = Purgers::new();
//! let cache: Arc<dyn Purge> = Arc::new(Nothing);
//! purgers.register("static", &cache);
//! assert_eq!(purgers.names(), ["static"]);
//! let target = PurgeTarget::Prefix("https://example.com/v1/".into());
//! let purged = purgers.purge(None, &target).await.unwrap();
//! assert_eq!(purged[0].0, "static");
//! assert_eq!(purged[0].1.as_ref().ok(), Some(&0));
//! drop(cache);
//! assert!(purgers.names().is_empty(), "held weakly");
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::BoxError;

/// What to forget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PurgeTarget {
    /// The responses stored for one URL (`https://example.com/a?b=1`: a cache's key),
    /// every variant of it.
    Url(String),
    /// The responses stored for every URL starting with this prefix
    /// (`https://example.com/v1/`).
    Prefix(String),
}

/// The URL a cache keys a request by, the form [`PurgeTarget`] names it in: `scheme://`,
/// the host lowercased, without user info (never part of an HTTP URI's key, nor allowed in
/// `Host`) or the scheme's default port, then the request target (`/` for an empty one).
/// `None` for an empty host.
///
/// ```
/// use gateway_core::purge::key_url;
///
/// assert_eq!(key_url(true, "u@API.example.com:443", "?q").as_deref(), Some("https://api.example.com/?q"));
/// assert_eq!(key_url(false, ":80", "/"), None);
/// ```
pub fn key_url(https: bool, host: &str, target: &str) -> Option<String> {
    let host = host.rsplit('@').next().unwrap_or(host);
    let (scheme, default_port) = if https {
        ("https://", ":443")
    } else {
        ("http://", ":80")
    };
    let host = host.strip_suffix(default_port).unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    let slash = if target.starts_with('/') { "" } else { "/" };
    let mut url = String::with_capacity(scheme.len() + host.len() + slash.len() + target.len());
    url.push_str(scheme);
    url.push_str(host);
    url[scheme.len()..].make_ascii_lowercase();
    url.push_str(slash);
    url.push_str(target);
    Some(url)
}

/// [`key_url`] of an absolute `http` or `https` URL (a `Location`, a purge's URL); `None`
/// for another scheme or no host.
///
/// ```
/// use gateway_core::purge::key_url_of;
///
/// assert_eq!(key_url_of("HTTP://A.example:80").as_deref(), Some("http://a.example/"));
/// assert_eq!(key_url_of("ftp://a.example/"), None);
/// ```
pub fn key_url_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let https = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return None;
    };
    let (host, target) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    key_url(https, host, target)
}

/// A cache that can forget what it holds.
pub trait Purge: Send + Sync + 'static {
    /// Forgets what `target` names; how many keys (URLs) it forgot.
    ///
    /// # Errors
    ///
    /// When the cache's store cannot be reached (a remote one).
    fn purge<'a>(
        &'a self,
        target: &'a PurgeTarget,
    ) -> Pin<Box<dyn Future<Output = Result<u64, BoxError>> + Send + 'a>>;
}

/// The caches of a gateway by name, held weakly. Cloning is cheap; clones share the list.
#[derive(Clone, Default)]
pub struct Purgers {
    inner: Arc<Mutex<BTreeMap<String, Weak<dyn Purge>>>>,
}

/// `cache=` named no cache.
#[derive(Debug)]
pub struct NoSuchCache;

impl fmt::Display for NoSuchCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no cache of that name")
    }
}

impl std::error::Error for NoSuchCache {}

impl Purgers {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lists `purge` as `name`, in place of any cache of that name, for as long as it
    /// exists.
    pub fn register(&self, name: &str, purge: &Arc<dyn Purge>) {
        let mut caches = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        caches.retain(|_, cache| cache.strong_count() > 0);
        caches.insert(name.to_owned(), Arc::downgrade(purge));
    }

    /// The names of the caches that exist, in order.
    pub fn names(&self) -> Vec<String> {
        self.live().into_iter().map(|(name, _)| name).collect()
    }

    /// Forgets `target` in the cache `name`, or in every cache; how many keys each
    /// forgot, or why it could not.
    ///
    /// # Errors
    ///
    /// When `name` names no cache.
    pub async fn purge(
        &self,
        name: Option<&str>,
        target: &PurgeTarget,
    ) -> Result<Vec<(String, Result<u64, BoxError>)>, NoSuchCache> {
        let mut caches = self.live();
        if let Some(name) = name {
            caches.retain(|(n, _)| n == name);
            if caches.is_empty() {
                return Err(NoSuchCache);
            }
        }
        let mut purged = Vec::with_capacity(caches.len());
        for (name, cache) in caches {
            let result = cache.purge(target).await;
            purged.push((name, result));
        }
        Ok(purged)
    }

    fn live(&self) -> Vec<(String, Arc<dyn Purge>)> {
        let caches = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        caches
            .iter()
            .filter_map(|(name, cache)| Some((name.clone(), cache.upgrade()?)))
            .collect()
    }
}

impl fmt::Debug for Purgers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Purgers")
            .field("caches", &self.names())
            .finish()
    }
}
