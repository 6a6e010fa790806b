//! Plugins by name, for the declarative config: a [`Registry`] maps a name to a
//! [`PluginFactory`], which reads its typed config section and makes a layer for a route's
//! stack.
//!
//! This is the config-driven path, and the only place layers are boxed ([`RouteLayer`]):
//! composed in code, every layer keeps its own type.
//!
//! ```
//! use gateway_core::registry::Registry;
//! use gateway_core::{Error, Flow, Plugin};
//! use http::request;
//! use serde::Deserialize;
//!
//! /// Adds a fixed header to every request.
//! struct Tag(http::HeaderValue);
//!
//! impl Plugin for Tag {
//!     type Ctx = ();
//!     const NAME: &'static str = "tag";
//!     fn new_ctx(&self) {}
//!     async fn on_request(&self, req: &mut request::Parts, _: &mut ()) -> Result<Flow, Error> {
//!         req.headers.insert("x-tag", self.0.clone());
//!         Ok(Flow::Continue)
//!     }
//! }
//!
//! /// Its config section: `- tag: { value: blue }`.
//! #[derive(Debug, PartialEq, Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct TagConfig {
//!     value: String,
//! }
//!
//! let mut registry = Registry::new();
//! registry.plugin("tag", |config: &TagConfig| Ok(Tag(config.value.parse()?)));
//! assert!(registry.contains("tag"));
//! ```

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use std::task::{self, Poll};

use bytes::Bytes;
use http::{Request, Response};
use serde::Deserializer;
use serde::de::{DeserializeOwned, Error as _};
use tower::{Layer, Service};

#[cfg(feature = "metrics")]
use crate::metrics::Metrics;
use crate::rescue::Rescue;
use crate::{Body, BoxError, Plugin, PluginLayer, RescueLayer, RouteId};

/// A route's service, boxed: what the layers of a config-built stack wrap.
///
/// Like tower's `BoxCloneSyncService`, with one difference that matters per request: a
/// clone is an `Arc` bump, not a new box. A call clones the service inside into the one
/// boxed future it returns (readiness is awaited there), so each boxed level of a stack
/// costs one allocation per request instead of two.
#[derive(Clone)]
pub struct RouteService {
    inner: Arc<dyn ErasedRoute>,
}

/// The future of a [`RouteService`].
pub type RouteFuture = crate::boxed::BoxResponseFuture;

trait ErasedRoute: Send + Sync {
    fn oneshot(&self, req: Request<Body>) -> RouteFuture;
}

impl<S> ErasedRoute for S
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn oneshot(&self, req: Request<Body>) -> RouteFuture {
        crate::boxed::oneshot(self.clone(), req)
    }
}

impl RouteService {
    /// Boxes `service`.
    pub fn new<S>(service: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        Self {
            inner: Arc::new(service),
        }
    }
}

impl Service<Request<Body>> for RouteService {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _: &mut task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> RouteFuture {
        self.inner.oneshot(req)
    }
}

impl fmt::Debug for RouteService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteService").finish_non_exhaustive()
    }
}

/// A layer of a config-built route stack, boxed.
///
/// Most layers answer in-band ([`RouteLayer::new`]): an error that reaches them (their own,
/// or one passed up from below) becomes its problem response right there, through
/// [`Rescue`]. The layers outside (CORS, compression, the access log)
/// therefore see a `502` or a `504` as a response they decorate, never as an error that
/// skips them. Layers of the upstream path (a timeout, retries, a breaker) pass errors up
/// instead ([`RouteLayer::passing_errors`]), so that the layers around them can judge them;
/// the first in-band layer outside answers them (or the edge `Rescue`, when none is).
#[derive(Clone)]
pub struct RouteLayer {
    wrap: Arc<dyn Fn(RouteService) -> RouteService + Send + Sync>,
    passes_errors: bool,
}

/// Makes a layer from a typed config section.
pub trait PluginFactory: Send + Sync + 'static {
    /// The config section, read with serde (use `#[serde(deny_unknown_fields)]`).
    /// Equality decides whether a reload may keep what an unchanged section built.
    type Config: DeserializeOwned + PartialEq + fmt::Debug + Send + Sync + 'static;

    /// The layer `config` describes, for the route `cx` names.
    ///
    /// # Errors
    ///
    /// When the section is well-formed but cannot be used (a file that is not there, a
    /// value out of range, a URL without the client to fetch it); the config is then
    /// refused as a whole.
    fn layer(&self, config: &Self::Config, cx: &Context) -> Result<RouteLayer, BoxError>;
}

/// What a [`PluginFactory`] builds a layer with besides its section: the route the layer
/// is for (the `route` label of the series it reports, see `docs/observability.md`) and
/// what the gateway lends every plugin ([`Registry::metrics`], [`Registry::client`]).
///
/// A config reload keeps a layer whose route, place and section did not change, so a layer
/// may hold state (buckets, key sets, caches) for as long as its config stays.
#[derive(Clone)]
pub struct Context {
    route: RouteId,
    lent: Lent,
    upstreams: Option<Upstreams>,
}

/// The services of a config's upstreams, by name: what the config's builder lends the
/// layers of its routes ([`Context::upstream`]), for those that send requests elsewhere
/// (a circuit breaker's fallback).
pub type Upstreams = Arc<dyn Fn(&str) -> Option<RouteService> + Send + Sync>;

/// What the registry lends the factories.
#[derive(Clone, Default)]
struct Lent {
    #[cfg(feature = "metrics")]
    metrics: Option<Metrics>,
    client: Option<RouteService>,
    purgers: Option<crate::purge::Purgers>,
}

/// Plugin factories by name, and what they are lent to build with. Cloning is cheap (one
/// `Arc` each): a parse holds a clone.
#[derive(Clone, Default)]
pub struct Registry {
    factories: Arc<BTreeMap<String, Arc<dyn Erased>>>,
    lent: Lent,
}

// === impl Context ===

impl Context {
    /// The context of a layer for `route`, with what `registry` lends.
    pub fn new(route: RouteId, registry: &Registry) -> Self {
        Self {
            route,
            lent: registry.lent.clone(),
            upstreams: None,
        }
    }

    /// The route the layer is for.
    pub const fn route(&self) -> &RouteId {
        &self.route
    }

    /// The gateway's metrics, when it keeps them: a layer registers its families here
    /// (once, when it is built) and reports under this route's label.
    #[cfg(feature = "metrics")]
    pub const fn metrics(&self) -> Option<&Metrics> {
        self.lent.metrics.as_ref()
    }

    /// A client for the HTTP calls a layer makes of its own (fetching a JWKS, asking an
    /// authorization service): requests with absolute `http://` or `https://` URIs.
    pub const fn client(&self) -> Option<&RouteService> {
        self.lent.client.as_ref()
    }

    /// Where a layer that caches lists itself, so that the admin listener can purge it
    /// ([`Registry::purgers`]).
    pub const fn purgers(&self) -> Option<&crate::purge::Purgers> {
        self.lent.purgers.as_ref()
    }

    /// The service of the config's upstream `name` (a proxy to it), when the layer is
    /// built from a config that has one.
    pub fn upstream(&self, name: &str) -> Option<RouteService> {
        self.upstreams
            .as_ref()
            .and_then(|upstreams| upstreams(name))
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("route", &self.route)
            .field("lent", &self.lent)
            .field("upstreams", &self.upstreams.is_some())
            .finish()
    }
}

impl fmt::Debug for Lent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Lent");
        #[cfg(feature = "metrics")]
        d.field("metrics", &self.metrics.is_some());
        d.field("client", &self.client.is_some())
            .field("purgers", &self.purgers.is_some())
            .finish()
    }
}

/// A plugin's config section, read and ready to build. Cloning is cheap.
#[derive(Clone)]
pub struct Section {
    name: Arc<str>,
    inner: Arc<dyn ErasedSection>,
    lent: Lent,
}

// === impl RouteLayer ===

impl RouteLayer {
    /// Boxes `layer`, its errors answered in-band (see [`RouteLayer`]): the choice for every
    /// layer that rejects, decorates or transforms.
    ///
    /// The layer sits between two [`Rescue`]s: the inner one answers what
    /// comes up from below (so the layer decorates a `502` like any response), the outer one
    /// answers the layer's own errors.
    pub fn new<L, ResB>(layer: L) -> Self
    where
        L: Layer<Rescue<RouteService>> + Send + Sync + 'static,
        L::Service:
            Service<Request<Body>, Response = Response<ResB>> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Body>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Body>>>::Future: Send + 'static,
        ResB: http_body::Body<Data = Bytes> + Send + 'static,
        ResB::Error: Into<BoxError>,
    {
        Self {
            wrap: Arc::new(move |inner| {
                let inner = RescueLayer::new().layer(inner);
                RouteService::new(RescueLayer::new().layer(layer.layer(inner)))
            }),
            passes_errors: false,
        }
    }

    /// Boxes `layer`, its errors passed up as errors (see [`RouteLayer`]): for layers of
    /// the upstream path, whose failures the layers around them judge.
    pub fn passing_errors<L>(layer: L) -> Self
    where
        L: Layer<RouteService> + Send + Sync + 'static,
        L::Service:
            Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
        <L::Service as Service<Request<Body>>>::Error: Into<BoxError>,
        <L::Service as Service<Request<Body>>>::Future: Send + 'static,
    {
        Self {
            wrap: Arc::new(move |inner| RouteService::new(layer.layer(inner))),
            passes_errors: true,
        }
    }

    /// Whether the layer passes errors up ([`RouteLayer::passing_errors`]) rather than
    /// answering them in-band.
    pub const fn passes_errors(&self) -> bool {
        self.passes_errors
    }
}

impl Layer<RouteService> for RouteLayer {
    type Service = RouteService;

    fn layer(&self, inner: RouteService) -> RouteService {
        (self.wrap)(inner)
    }
}

impl fmt::Debug for RouteLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteLayer").finish_non_exhaustive()
    }
}

// === impl Registry ===

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `factory` under `name`, replacing any factory of that name.
    pub fn register<F: PluginFactory>(&mut self, name: &str, factory: F) -> &mut Self {
        Arc::make_mut(&mut self.factories)
            .insert(name.to_owned(), Arc::new(Typed(Arc::new(factory))));
        self
    }

    /// Registers a [`Plugin`] made from its config section `C` by `make`: the one call that
    /// makes a user's plugin usable from a config file.
    pub fn plugin<P, C, F>(&mut self, name: &str, make: F) -> &mut Self
    where
        P: Plugin,
        C: DeserializeOwned + PartialEq + fmt::Debug + Send + Sync + 'static,
        F: Fn(&C) -> Result<P, BoxError> + Send + Sync + 'static,
    {
        self.register(name, PluginFn::new(make))
    }

    /// Lends `metrics` to the factories ([`Context::metrics`]).
    #[cfg(feature = "metrics")]
    pub fn metrics(&mut self, metrics: &Metrics) -> &mut Self {
        self.lent.metrics = Some(metrics.clone());
        self
    }

    /// Lends `client` to the factories ([`Context::client`]): the gateway's HTTP client,
    /// boxed (`gateway_proxy::HttpClient` in the example gateway).
    pub fn client<S>(&mut self, client: S) -> &mut Self
    where
        S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.lent.client = Some(RouteService::new(client));
        self
    }

    /// Lends `purgers` to the factories ([`Context::purgers`]): the caches a config builds
    /// list themselves there, and an admin listener given the same list purges them.
    pub fn purgers(&mut self, purgers: &crate::purge::Purgers) -> &mut Self {
        self.lent.purgers = Some(purgers.clone());
        self
    }

    /// Whether a factory is registered under `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// The registered names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// Reads the config section of plugin `name` from `deserializer`.
    ///
    /// # Errors
    ///
    /// When no plugin is registered under `name`, or the section is not its config.
    pub fn section<'de, D: Deserializer<'de>>(
        &self,
        name: &str,
        deserializer: D,
    ) -> Result<Section, D::Error> {
        let Some(factory) = self.factories.get(name) else {
            let known: Vec<&str> = self.names().collect();
            return Err(D::Error::custom(format!(
                "no plugin is named `{name}` (registered: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )));
        };
        let mut erased = <dyn erased_serde::Deserializer<'de>>::erase(deserializer);
        let inner = factory.parse(&mut erased).map_err(D::Error::custom)?;
        Ok(Section {
            name: name.into(),
            inner: Arc::from(inner),
            lent: self.lent.clone(),
        })
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

// === impl Section ===

impl Section {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Builds the layer for `route`, with what the registry that read the section lends.
    ///
    /// # Errors
    ///
    /// As [`PluginFactory::layer`].
    pub fn layer(&self, route: &RouteId) -> Result<RouteLayer, BoxError> {
        self.layer_with(route, None)
    }

    /// Builds the layer for `route`, lending it the config's `upstreams` as well
    /// ([`Context::upstream`]).
    ///
    /// # Errors
    ///
    /// As [`PluginFactory::layer`].
    pub fn layer_with(
        &self,
        route: &RouteId,
        upstreams: Option<Upstreams>,
    ) -> Result<RouteLayer, BoxError> {
        self.inner.layer(&Context {
            route: route.clone(),
            lent: self.lent.clone(),
            upstreams,
        })
    }

    /// Whether `other` is the same plugin (the same factory) with an equal config.
    pub fn same_as(&self, other: &Self) -> bool {
        self.name == other.name && self.inner.same(other.inner.as_ref())
    }
}

impl PartialEq for Section {
    fn eq(&self, other: &Self) -> bool {
        self.same_as(other)
    }
}

impl fmt::Debug for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Section")
            .field("name", &self.name)
            .field("config", &self.inner.config())
            .finish()
    }
}

// === erasure ===

/// A factory behind a name.
trait Erased: Send + Sync {
    fn parse(
        &self,
        de: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<Box<dyn ErasedSection>, erased_serde::Error>;
}

trait ErasedSection: Send + Sync {
    fn layer(&self, cx: &Context) -> Result<RouteLayer, BoxError>;
    fn same(&self, other: &dyn ErasedSection) -> bool;
    fn as_any(&self) -> &dyn Any;
    fn config(&self) -> &dyn fmt::Debug;
}

struct Typed<F>(Arc<F>);

struct Parsed<F: PluginFactory> {
    factory: Arc<F>,
    config: F::Config,
}

impl<F: PluginFactory> Erased for Typed<F> {
    fn parse(
        &self,
        de: &mut dyn erased_serde::Deserializer<'_>,
    ) -> Result<Box<dyn ErasedSection>, erased_serde::Error> {
        let config: F::Config = erased_serde::deserialize(de)?;
        Ok(Box::new(Parsed {
            factory: Arc::clone(&self.0),
            config,
        }))
    }
}

impl<F: PluginFactory> ErasedSection for Parsed<F> {
    fn layer(&self, cx: &Context) -> Result<RouteLayer, BoxError> {
        self.factory.layer(&self.config, cx)
    }

    fn same(&self, other: &dyn ErasedSection) -> bool {
        other
            .as_any()
            .downcast_ref::<Self>()
            .is_some_and(|o| Arc::ptr_eq(&o.factory, &self.factory) && o.config == self.config)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn config(&self) -> &dyn fmt::Debug {
        &self.config
    }
}

/// [`Registry::plugin`]'s factory: a [`Plugin`] from its config, under [`PluginLayer`].
struct PluginFn<F, C> {
    make: F,
    _config: std::marker::PhantomData<fn(&C)>,
}

impl<F, C> PluginFn<F, C> {
    const fn new(make: F) -> Self {
        Self {
            make,
            _config: std::marker::PhantomData,
        }
    }
}

impl<P, C, F> PluginFactory for PluginFn<F, C>
where
    P: Plugin,
    C: DeserializeOwned + PartialEq + fmt::Debug + Send + Sync + 'static,
    F: Fn(&C) -> Result<P, BoxError> + Send + Sync + 'static,
{
    type Config = C;

    fn layer(&self, config: &C, _: &Context) -> Result<RouteLayer, BoxError> {
        Ok(RouteLayer::new(PluginLayer::new((self.make)(config)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Error, ErrorKind};
    use http::StatusCode;

    fn failing(kind: ErrorKind) -> RouteService {
        RouteService::new(tower::service_fn(move |_: Request<Body>| {
            std::future::ready(Err::<Response<Body>, BoxError>(Error::new(kind).into()))
        }))
    }

    #[tokio::test]
    async fn in_band_layers_answer_errors_and_passing_ones_pass_them_up() {
        let identity = tower::layer::util::Identity::new;
        let in_band = RouteLayer::new(identity()).layer(failing(ErrorKind::GatewayTimeout));
        let res = in_band.oneshot(Request::new(Body::empty())).await;
        let res = res.expect("answered in-band");
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            res.extensions().get::<ErrorKind>(),
            Some(&ErrorKind::GatewayTimeout)
        );
        let passing =
            RouteLayer::passing_errors(identity()).layer(failing(ErrorKind::GatewayTimeout));
        assert!(passing.oneshot(Request::new(Body::empty())).await.is_err());
        assert!(RouteLayer::passing_errors(identity()).passes_errors());
        assert!(!RouteLayer::new(identity()).passes_errors());
    }

    #[test]
    fn a_factory_builds_for_its_route_with_what_the_registry_lends() {
        use std::sync::Mutex;

        #[derive(Default)]
        struct Seen(Mutex<Vec<(String, bool)>>);
        impl PluginFactory for Arc<Seen> {
            type Config = ();
            fn layer(&self, (): &(), cx: &Context) -> Result<RouteLayer, BoxError> {
                let seen = (cx.route().as_str().to_owned(), cx.client().is_some());
                self.0.lock().map_err(|_| "poisoned")?.push(seen);
                Ok(RouteLayer::new(tower::layer::util::Identity::new()))
            }
        }

        let seen = Arc::new(Seen::default());
        let mut registry = Registry::new();
        registry.register("seen", Arc::clone(&seen));
        let bare = registry.section(
            "seen",
            serde::de::value::UnitDeserializer::<serde::de::value::Error>::new(),
        );
        registry.client(tower::service_fn(|_: Request<Body>| async {
            Ok::<_, BoxError>(Response::new(Body::empty()))
        }));
        let lent = registry.section(
            "seen",
            serde::de::value::UnitDeserializer::<serde::de::value::Error>::new(),
        );
        let (bare, lent) = (bare.expect("a unit section"), lent.expect("a unit section"));
        bare.layer(&RouteId::new("a")).expect("built");
        lent.layer(&RouteId::new("b")).expect("built");
        let seen = seen.0.lock().expect("not poisoned").clone();
        assert_eq!(seen, [("a".to_owned(), false), ("b".to_owned(), true)]);
    }
}
