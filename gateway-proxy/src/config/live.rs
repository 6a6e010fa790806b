//! A config that reloads: the router is swapped whole, what did not change carries over.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use gateway_core::registry::Registry;
use gateway_core::{Body, BoxError};
use http::{Request, Response};
use tower::Service;

use super::build::{Gateway, Parts, build_from};
use super::load::{ConfigError, parse};
use super::schema::Config;
use crate::Router;
use crate::admin::{ConfigStatus, Inventory};

/// A gateway built from a config file that it reloads, keeping the state of every upstream
/// and plugin whose name and config did not change (endpoint health and ejections, running
/// health checks; a plugin layer's buckets, breakers or cache), and building the changed
/// ones fresh. The router is swapped whole: requests in flight finish on the one they
/// started with, and the next request on any connection, kept-alive ones included, sees the
/// new one. Listener and server settings are read once; a reload that changes them says it
/// needs a restart and leaves them.
///
/// Cloning is cheap; every clone is the same gateway.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

/// The service that routes each request with the router of the moment (see [`Live`]).
#[derive(Clone)]
pub struct LiveRouter {
    router: Arc<ArcSwap<Router>>,
}

/// How reloads have gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStats {
    /// Reloads that applied a changed config.
    pub applied: u64,
    /// Reloads refused (the file unreadable or invalid), the gateway serving on unchanged.
    pub refused: u64,
    /// Why the last refused reload was refused, until one applies.
    pub last_error: Option<String>,
    /// When a config was last applied (the first load included).
    pub last_applied: Option<SystemTime>,
}

struct Inner {
    file: PathBuf,
    registry: Registry,
    router: Arc<ArcSwap<Router>>,
    loaded: Mutex<Loaded>,
    stats: Mutex<ReloadStats>,
    inventory: Inventory,
}

/// The config being served, and what it was built into.
struct Loaded {
    text: String,
    config: Config,
    parts: Parts,
}

// === impl Live ===

impl Live {
    /// Reads and builds `file` (inside a Tokio runtime: upstreams start their checks), with
    /// route plugins from `registry`: the gateway, and the settings its server starts with.
    ///
    /// # Errors
    ///
    /// As [`read`](super::read) and [`build`](super::build).
    pub fn load(
        file: impl Into<PathBuf>,
        registry: Registry,
    ) -> Result<(Self, Gateway), ConfigError> {
        let file = file.into();
        let name = file.display().to_string();
        let text = read_text(&file)?;
        let config = parse(&name, &text, env, &registry)?;
        let (gateway, parts) = build_from(&name, &config, &Parts::default())?;
        let router = Arc::new(ArcSwap::from_pointee(gateway.router.clone()));
        let live = Self {
            inner: Arc::new(Inner {
                file,
                registry,
                router,
                loaded: Mutex::new(Loaded {
                    text,
                    config,
                    parts,
                }),
                stats: Mutex::new(ReloadStats {
                    last_applied: Some(SystemTime::now()),
                    ..ReloadStats::default()
                }),
                inventory: gateway.inventory.clone(),
            }),
        };
        {
            let loaded = live
                .inner
                .loaded
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            live.publish(&loaded, &live.stats(), true);
        }
        Ok((live, gateway))
    }

    /// The service to serve: it routes every request with the current router.
    pub fn router(&self) -> LiveRouter {
        LiveRouter {
            router: Arc::clone(&self.inner.router),
        }
    }

    /// Reads the file again and, if it changed and is valid, builds it (keeping what did not
    /// change) and swaps the router in: `Ok(true)`. `Ok(false)` when the file is as it was.
    ///
    /// # Errors
    ///
    /// When the file cannot be read or is not a valid config: nothing changes, and the
    /// error is counted and kept (see [`stats`](Self::stats)).
    pub fn reload(&self) -> Result<bool, ConfigError> {
        let inner = &self.inner;
        let mut loaded = inner.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let name = inner.file.display().to_string();
        let result = read_text(&inner.file).and_then(|text| {
            if text == loaded.text {
                return Ok(None);
            }
            let config = parse(&name, &text, env, &inner.registry)?;
            let (gateway, parts) = build_from(&name, &config, &loaded.parts)?;
            Ok(Some((text, config, gateway, parts)))
        });
        let mut stats = inner.stats.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(None) => Ok(false),
            Ok(Some((text, config, gateway, parts))) => {
                if config.listen != loaded.config.listen
                    || config.server != loaded.config.server
                    || config.admin != loaded.config.admin
                    || config.access_log != loaded.config.access_log
                    || config.tracing != loaded.config.tracing
                {
                    tracing::warn!(
                        file = %name,
                        "`listen`, `server`, `admin`, `access_log` and `tracing` changes take a restart; serving on with the old ones"
                    );
                }
                inner.router.store(Arc::new(gateway.router));
                *loaded = Loaded {
                    text,
                    config,
                    parts,
                };
                stats.applied += 1;
                stats.last_error = None;
                stats.last_applied = Some(SystemTime::now());
                self.publish(&loaded, &stats, true);
                tracing::info!(file = %name, "config reloaded");
                Ok(true)
            }
            Err(err) => {
                stats.refused += 1;
                tracing::warn!(error = %err, "config reload refused; serving on with the last good one");
                stats.last_error = Some(err.to_string());
                self.publish(&loaded, &stats, false);
                Err(err)
            }
        }
    }

    /// What the config was built into and how reloads have gone, as the admin listener
    /// shows them: kept current on every reload.
    pub fn inventory(&self) -> &Inventory {
        &self.inner.inventory
    }

    /// Publishes the config being served (its routes and upstreams, when `built` anew) and
    /// the reload history to the inventory.
    fn publish(&self, loaded: &Loaded, stats: &ReloadStats, built: bool) {
        let inventory = &self.inner.inventory;
        if built {
            let (routes, upstreams) = super::build::inventory_of(&loaded.config, &loaded.parts);
            inventory.set_routes(routes);
            inventory.set_upstreams(upstreams);
        }
        let mut status =
            ConfigStatus::new(self.inner.file.display().to_string(), stats.applied + 1);
        status.applied = stats.applied;
        status.refused = stats.refused;
        status.last_error.clone_from(&stats.last_error);
        status.last_applied = stats.last_applied;
        inventory.set_config(status);
    }

    /// How reloads have gone.
    pub fn stats(&self) -> ReloadStats {
        self.inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads whenever the file changes (looked at every `poll`, when given: editors that
    /// replace the file, and mounted config maps, are followed too) and, on Unix, on
    /// `SIGHUP`. Runs until the task is dropped.
    pub async fn watch(self, poll: Option<Duration>) {
        let mut tick = poll.map(|every| {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let due = async {
                match tick.as_mut() {
                    Some(tick) => {
                        tick.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(unix)]
            {
                let signal = async {
                    match hangup.as_mut() {
                        Some(hangup) => hangup.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = due => {}
                    _ = signal => tracing::info!("SIGHUP: reloading the config"),
                }
            }
            #[cfg(not(unix))]
            due.await;
            // A refused reload was logged and counted; the next change is tried again.
            let _ = self.reload();
        }
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("file", &self.inner.file)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

// === impl LiveRouter ===

impl Service<Request<Body>> for LiveRouter {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = crate::router::ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The router of the moment; the request's future holds its route, not the router.
        self.router.load().dispatch(req)
    }
}

impl std::fmt::Debug for LiveRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveRouter").finish_non_exhaustive()
    }
}

/// The file's text.
fn read_text(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|e| {
        ConfigError::new(
            &file.display().to_string(),
            None,
            "",
            format!("cannot read it: {e}"),
        )
    })
}

/// `${VAR}` from the process environment.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}
