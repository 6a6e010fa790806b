//! Key sets: static, from a JWKS file, or fetched from a JWKS URL and kept fresh.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use gateway_core::{Body, BoxError};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower::Service;

use super::keys::{JwtKey, KeyError, parse_jwks};
use crate::auth::gate::read_body;

/// The keys tokens are verified with: a fixed set, or a JWKS URL's, refreshed in the
/// background. Cloning is cheap; clones share the set (and its refresh task).
///
/// A remote set is fetched through a tower `Service` the caller gives (the example gateway
/// gives a `gateway_proxy::HttpClient`), then:
/// - refreshed every `refresh`, or as its `Cache-Control: max-age` says within
///   [`refresh_bounds`](JwksBuilder::refresh_bounds); a failed fetch keeps the last good
///   set and is retried sooner (1 s, doubling up to `refresh`);
/// - fetched again when a token names a `kid` the set lacks, **at most once per
///   [`refetch_cooldown`](JwksBuilder::refetch_cooldown)** however many such tokens arrive
///   (they wait for that one fetch; after it, an unknown `kid` is refused at once), so a
///   flood of random `kid`s cannot hammer the identity provider;
/// - before the first set arrives, requests wait for it (up to a bound) or are refused
///   with a 503, as [`Startup`] says.
#[derive(Clone)]
pub struct Jwks {
    state: Arc<State>,
}

/// What requests do before a remote key set first arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Startup {
    /// Wait for it, this long at most, then 503.
    Wait(Duration),
    /// 503 at once.
    Fail,
}

/// Builds a remote [`Jwks`].
#[derive(Debug, Clone)]
#[must_use]
pub struct JwksBuilder {
    uri: Uri,
    refresh: Duration,
    min_refresh: Duration,
    max_refresh: Duration,
    cooldown: Duration,
    timeout: Duration,
    startup: Startup,
}

struct State {
    keys: ArcSwap<Vec<JwtKey>>,
    loaded: AtomicBool,
    remote: Option<Remote>,
}

struct Remote {
    uri: Uri,
    cooldown: Duration,
    timeout: Duration,
    startup: Startup,
    /// When a refetch for an unknown `kid` was last asked for.
    last_refetch: Mutex<Option<Instant>>,
    fetching: AtomicBool,
    /// Wakes the task: a refetch is asked for, or the set is dropped.
    wake: Arc<Notify>,
    /// Bumped after every fetch, good or not.
    done: watch::Sender<u64>,
}

/// What a request may verify with now.
pub(super) enum Lookup {
    Ready(Arc<Vec<JwtKey>>),
    Unavailable,
    Wait(KeysFuture),
}

/// The keys once a fetch is in; `None` when the set was dropped meanwhile or never came.
pub(super) type KeysFuture = Pin<Box<dyn Future<Output = Option<Arc<Vec<JwtKey>>>> + Send>>;

/// The most bytes of a JWKS document.
const MAX_DOCUMENT: usize = 1024 * 1024;

impl Jwks {
    /// A fixed set of keys.
    pub fn keys(keys: impl IntoIterator<Item = JwtKey>) -> Self {
        Self::fixed(keys.into_iter().collect())
    }

    /// The keys of a JWKS document (`{"keys": [...]}`), `oct` secrets included. Keys the
    /// gateway does not use (encryption keys, unknown types or curves, an `alg` that does
    /// not fit its key) are left out and logged.
    ///
    /// # Errors
    ///
    /// When the document is not a JWKS or has no usable key.
    pub fn from_json(json: &[u8]) -> Result<Self, KeyError> {
        let (keys, skipped) = parse_jwks(json, true)?;
        for why in &skipped {
            tracing::warn!("JWKS key left out: {why}");
        }
        if keys.is_empty() {
            return Err(KeyError(format!("no usable key ({})", skipped.join("; "))));
        }
        Ok(Self::fixed(keys))
    }

    /// The keys of the JWKS file at `path` (read once: a config reload reads it again).
    ///
    /// # Errors
    ///
    /// When the file cannot be read, or as [`from_json`](Self::from_json).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        let path = path.as_ref();
        let json = std::fs::read(path)
            .map_err(|e| KeyError(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&json).map_err(|e| KeyError(format!("{}: {e}", path.display())))
    }

    /// The keys at `uri`, fetched and refreshed in the background; see [`Jwks`].
    pub fn remote(uri: Uri) -> JwksBuilder {
        JwksBuilder {
            uri,
            refresh: Duration::from_secs(300),
            min_refresh: Duration::from_secs(60),
            max_refresh: Duration::from_secs(86_400),
            cooldown: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            startup: Startup::Wait(Duration::from_secs(5)),
        }
    }

    fn fixed(keys: Vec<JwtKey>) -> Self {
        Self {
            state: Arc::new(State {
                keys: ArcSwap::from_pointee(keys),
                loaded: AtomicBool::new(true),
                remote: None,
            }),
        }
    }

    /// The keys now.
    pub fn current(&self) -> Arc<Vec<JwtKey>> {
        self.state.keys.load_full()
    }

    /// Whether a key set is loaded (a remote one: fetched at least once).
    pub fn is_loaded(&self) -> bool {
        self.state.loaded.load(Ordering::Acquire)
    }

    /// The keys to verify a token naming `kid` with, or what to wait for.
    pub(super) fn lookup(&self, kid: Option<&str>) -> Lookup {
        let state = &self.state;
        let Some(remote) = &state.remote else {
            return Lookup::Ready(state.keys.load_full());
        };
        if !state.loaded.load(Ordering::Acquire) {
            return match remote.startup {
                Startup::Fail => Lookup::Unavailable,
                Startup::Wait(max) => self.wait_loaded(max),
            };
        }
        let keys = state.keys.load_full();
        let Some(kid) = kid else {
            return Lookup::Ready(keys);
        };
        if keys.iter().any(|k| k.kid.as_deref() == Some(kid)) {
            return Lookup::Ready(keys);
        }
        // An unknown `kid`: wait for a fetch in flight, or ask for one if the last was
        // asked for long enough ago; otherwise the token is judged (and refused) now.
        let mut rx = remote.done.subscribe();
        if !remote.fetching.load(Ordering::Acquire) {
            let mut last = remote
                .last_refetch
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            if last.is_some_and(|at| now.duration_since(at) < remote.cooldown) {
                return Lookup::Ready(keys);
            }
            *last = Some(now);
            remote.fetching.store(true, Ordering::Release);
            remote.wake.notify_one();
        }
        let weak = Arc::downgrade(state);
        let bound = remote.timeout + Duration::from_secs(1);
        Lookup::Wait(Box::pin(async move {
            let _ = tokio::time::timeout(bound, rx.changed()).await;
            weak.upgrade().map(|state| state.keys.load_full())
        }))
    }

    /// Waits up to `max` for the first key set.
    fn wait_loaded(&self, max: Duration) -> Lookup {
        let Some(remote) = &self.state.remote else {
            return Lookup::Ready(self.state.keys.load_full());
        };
        let mut rx = remote.done.subscribe();
        let weak = Arc::downgrade(&self.state);
        Lookup::Wait(Box::pin(async move {
            let deadline = Instant::now() + max;
            loop {
                let state = weak.upgrade()?;
                if state.loaded.load(Ordering::Acquire) {
                    return Some(state.keys.load_full());
                }
                drop(state);
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => {}
                    _ => return None,
                }
            }
        }))
    }
}

/// A [`Jwks`] that does not keep it alive (for sharing a remote set by URL).
#[cfg(feature = "config")]
#[derive(Clone, Debug)]
pub(crate) struct WeakJwks(Weak<State>);

#[cfg(feature = "config")]
impl WeakJwks {
    pub(crate) fn upgrade(&self) -> Option<Jwks> {
        self.0.upgrade().map(|state| Jwks { state })
    }
}

#[cfg(feature = "config")]
impl Jwks {
    pub(crate) fn downgrade(&self) -> WeakJwks {
        WeakJwks(Arc::downgrade(&self.state))
    }
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Jwks");
        if let Some(remote) = &self.state.remote {
            d.field("uri", &remote.uri);
        }
        d.field("keys", &self.state.keys.load().len()).finish()
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if let Some(remote) = &self.remote {
            // The refresh task wakes, finds the set gone, and ends.
            remote.wake.notify_one();
        }
    }
}

impl JwksBuilder {
    /// How often the set is fetched when its response says nothing [default: 5 min].
    pub const fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every;
        self
    }

    /// The bounds put on a response's `Cache-Control: max-age` [default: 1 min to 1 day].
    pub const fn refresh_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.min_refresh = min;
        self.max_refresh = max;
        self
    }

    /// The least time between two fetches asked for by tokens with an unknown `kid`
    /// [default: 30 s].
    pub const fn refetch_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// How long one fetch may take [default: 5 s].
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What requests do before the first set arrives [default: wait 5 s].
    pub const fn startup(mut self, startup: Startup) -> Self {
        self.startup = startup;
        self
    }

    /// Starts fetching through `client` (on the current Tokio runtime).
    ///
    /// # Errors
    ///
    /// When the URI is not an absolute `http(s)://` one, or there is no Tokio runtime.
    pub fn start<C, B>(self, client: C) -> Result<Jwks, KeyError>
    where
        C: Service<Request<Body>, Response = Response<B>> + Send + 'static,
        C::Error: Into<BoxError>,
        C::Future: Send,
        B: http_body::Body + Send + 'static,
        B::Error: Into<BoxError>,
        B::Data: Send,
    {
        if !matches!(self.uri.scheme_str(), Some("http" | "https")) || self.uri.host().is_none() {
            return Err(KeyError(format!(
                "{}: a JWKS URL must be absolute http(s)://",
                self.uri
            )));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| KeyError("a remote JWKS needs a Tokio runtime to start".into()))?;
        let wake = Arc::new(Notify::new());
        let state = Arc::new(State {
            keys: ArcSwap::from_pointee(Vec::new()),
            loaded: AtomicBool::new(false),
            remote: Some(Remote {
                uri: self.uri.clone(),
                cooldown: self.cooldown,
                timeout: self.timeout,
                startup: self.startup,
                last_refetch: Mutex::new(None),
                fetching: AtomicBool::new(true),
                wake: Arc::clone(&wake),
                done: watch::Sender::new(0),
            }),
        });
        runtime.spawn(refresh(Arc::downgrade(&state), wake, client, self));
        Ok(Jwks { state })
    }
}

/// The refresh task: fetch, wait, fetch again, until the set is dropped.
async fn refresh<C, B>(state: Weak<State>, wake: Arc<Notify>, mut client: C, config: JwksBuilder)
where
    C: Service<Request<Body>, Response = Response<B>>,
    C::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let mut failures: u32 = 0;
    loop {
        let fetched = tokio::time::timeout(config.timeout, fetch(&mut client, &config.uri)).await;
        let fetched = fetched.unwrap_or_else(|_| Err("timed out".into()));
        let Some(shared) = state.upgrade() else {
            return;
        };
        let Some(remote) = &shared.remote else {
            return;
        };
        let next = match fetched {
            Ok((keys, skipped, max_age)) => {
                for why in &skipped {
                    tracing::debug!(uri = %config.uri, "JWKS key left out: {why}");
                }
                if failures > 0 {
                    tracing::info!(uri = %config.uri, keys = keys.len(), "JWKS fetched again");
                }
                tracing::debug!(uri = %config.uri, keys = keys.len(), "JWKS fetched");
                failures = 0;
                shared.keys.store(Arc::new(keys));
                shared.loaded.store(true, Ordering::Release);
                max_age.unwrap_or(config.refresh).clamp(
                    config.min_refresh,
                    config.max_refresh.max(config.min_refresh),
                )
            }
            Err(why) => {
                if failures == 0 {
                    tracing::warn!(uri = %config.uri, "cannot fetch the JWKS (the last good keys stay): {why}");
                } else {
                    tracing::debug!(uri = %config.uri, failures, "cannot fetch the JWKS: {why}");
                }
                failures = failures.saturating_add(1);
                Duration::from_secs(1u64 << failures.min(16)).min(config.refresh)
            }
        };
        remote.fetching.store(false, Ordering::Release);
        remote.done.send_modify(|n| *n += 1);
        drop(shared);
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            () = wake.notified() => {}
        }
        let Some(shared) = state.upgrade() else {
            return;
        };
        if let Some(remote) = &shared.remote {
            remote.fetching.store(true, Ordering::Release);
        }
    }
}

/// One fetch: the keys, those left out, and the response's `max-age`.
async fn fetch<C, B>(
    client: &mut C,
    uri: &Uri,
) -> Result<(Vec<JwtKey>, Vec<String>, Option<Duration>), String>
where
    C: Service<Request<Body>, Response = Response<B>>,
    C::Error: Into<BoxError>,
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let req = Request::get(uri.clone())
        .header(
            header::ACCEPT,
            HeaderValue::from_static("application/jwk-set+json, application/json"),
        )
        .body(Body::empty())
        .map_err(|e| e.to_string())?;
    std::future::poll_fn(|cx| client.poll_ready(cx))
        .await
        .map_err(|e| e.into().to_string())?;
    let res = client.call(req).await.map_err(|e| e.into().to_string())?;
    if res.status() != StatusCode::OK {
        return Err(format!("answered {}", res.status()));
    }
    let max_age = res
        .headers()
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|d| d.trim().strip_prefix("max-age=")?.parse::<u64>().ok())
        .map(Duration::from_secs);
    let json = read_body(res.into_body(), MAX_DOCUMENT).await?;
    let (keys, skipped) = parse_jwks(&json, false).map_err(|e| e.to_string())?;
    if keys.is_empty() {
        return Err(format!("no usable key ({})", skipped.join("; ")));
    }
    Ok((keys, skipped, max_age))
}
