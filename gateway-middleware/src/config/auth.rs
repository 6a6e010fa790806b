//! The auth sections: `jwt`, `key-auth`, `basic-auth`, `auth` (any of several, with an
//! anonymous consumer), `acl` and `forward-auth`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gateway_core::registry::{Context, PluginFactory, Registry, RouteLayer};
use gateway_core::units::{Period, Size};
use gateway_core::{BoxError, Identity};
use http::HeaderName;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::auth::WeakJwks;
use crate::auth::{
    Acl, AclLayer, ApiKeys, AuthLayer, Authenticate, BasicAuth, ForwardAuthLayer, Jwks, Jwt,
    JwtKey, KeyAuth, Source, Startup, Users,
};

/// Registers the auth sections.
pub(super) fn register(registry: &mut Registry) {
    let jwks = Arc::new(SharedJwks::default());
    registry.register("jwt", MethodFactory::<JwtConfig>::new(&jwks));
    registry.register("key-auth", MethodFactory::<KeyAuthConfig>::new(&jwks));
    registry.register("basic-auth", MethodFactory::<BasicAuthConfig>::new(&jwks));
    registry.register("auth", AnyOfFactory { jwks });
    registry.register("acl", AclFactory);
    registry.register("forward-auth", ForwardAuthFactory);
}

/// Remote key sets by URL and settings, shared by every route that names the same: one
/// refresh task per JWKS, however many routes (and reloads) use it. Weak, so a set no route
/// uses any more stops.
#[derive(Default)]
struct SharedJwks(super::Kept<(), WeakJwks>);

impl super::Downgraded for WeakJwks {
    type Strong = Jwks;

    fn upgrade(&self) -> Option<Jwks> {
        Self::upgrade(self)
    }
}

impl SharedJwks {
    fn get(
        &self,
        key: &str,
        start: impl FnOnce() -> Result<Jwks, BoxError>,
    ) -> Result<Jwks, BoxError> {
        self.0.get_or_try(key, (), || {
            let set = start()?;
            let weak = set.downgrade();
            Ok((set, weak))
        })
    }
}

/// Where a token or key is read: `bearer`, `{ header: NAME }`, `{ query: NAME }`,
/// `{ cookie: NAME }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// `Authorization: Bearer`.
    Bearer,
    /// A header.
    Header(String),
    /// A query parameter.
    Query(String),
    /// A cookie.
    Cookie(String),
}

impl SourceConfig {
    fn source(&self) -> Result<Source, BoxError> {
        Ok(match self {
            Self::Bearer => Source::Bearer,
            Self::Header(name) => Source::Header(header_name(name)?),
            Self::Query(name) => Source::query(name),
            Self::Cookie(name) => Source::cookie(name),
        })
    }
}

fn header_name(name: &str) -> Result<HeaderName, BoxError> {
    HeaderName::try_from(name.trim()).map_err(|_| format!("`{name}` is not a header name").into())
}

/// One value or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn list(&self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one.clone()],
            Self::Many(many) => many.clone(),
        }
    }
}

/// `jwt`'s section (see `docs/auth.md`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// A JWKS URL, fetched and refreshed in the background.
    pub jwks_url: Option<String>,
    /// A JWKS file.
    pub jwks_file: Option<String>,
    /// A PEM public key file (with `algorithm`).
    pub public_key_file: Option<String>,
    /// An HMAC secret (with `algorithm`; use `${ENV}`).
    pub secret: Option<String>,
    /// The algorithm of `public_key_file` or `secret`.
    pub algorithm: Option<String>,
    /// The allowed `iss` (one or a list).
    pub issuer: Option<OneOrMany>,
    /// The allowed `aud` (one or a list).
    pub audience: Option<OneOrMany>,
    /// Clock leeway for `exp` and `nbf` [default: 0s].
    pub leeway: Option<Period>,
    /// Refuse tokens expiring further ahead.
    pub max_lifetime: Option<Period>,
    /// Where the token is read [default: `[bearer]`].
    pub token_from: Option<Vec<SourceConfig>>,
    /// The claim naming the consumer [default: `sub`].
    pub consumer_claim: Option<String>,
    /// The claim listing the groups.
    pub groups_claim: Option<String>,
    /// Claims forwarded as request headers: `{ sub: x-user-id }`.
    #[serde(default)]
    pub claims_to_headers: BTreeMap<String, String>,
    /// Take the token out before the upstream.
    #[serde(default)]
    pub hide_credentials: bool,
    /// The challenge's realm.
    pub realm: Option<String>,
    /// Bytes of verified tokens kept [default: 8MiB; 0 for none].
    pub cache: Option<Size>,
    /// How often a JWKS URL is fetched when its response does not say [default: 5m].
    pub refresh: Option<Period>,
    /// The least time between fetches asked for by unknown `kid`s [default: 30s].
    pub refetch_cooldown: Option<Period>,
    /// How long a fetch may take [default: 5s].
    pub fetch_timeout: Option<Period>,
    /// Before the first key set: `wait` (up to `startup_wait`) or `fail` (503) [default: wait].
    pub startup: Option<String>,
    /// How long requests wait for the first key set [default: 5s].
    pub startup_wait: Option<Period>,
    /// Let requests without a token through as this consumer.
    pub anonymous: Option<String>,
    /// The anonymous consumer\'s groups (for an ACL after it).
    #[serde(default)]
    pub anonymous_groups: Vec<String>,
    /// Let CORS preflights through unauthenticated [default: false].
    #[serde(default)]
    pub allow_preflights: bool,
}

/// A consumer with API keys: `{ name: alice, keys: [...], groups: [...] }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// The consumer's name.
    pub name: String,
    /// Its keys (use `${ENV}`).
    #[serde(default)]
    pub keys: Vec<String>,
    /// Its groups.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `key-auth`'s section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyAuthConfig {
    /// The consumers.
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    /// A YAML file with more: a list of consumers, as `consumers`.
    pub consumers_file: Option<String>,
    /// Where the key is read [default: `[{header: x-api-key}]`].
    pub key_from: Option<Vec<SourceConfig>>,
    /// Take the key out before the upstream.
    #[serde(default)]
    pub hide_credentials: bool,
    /// The challenge's realm.
    pub realm: Option<String>,
    /// Let requests without a key through as this consumer.
    pub anonymous: Option<String>,
    /// The anonymous consumer\'s groups (for an ACL after it).
    #[serde(default)]
    pub anonymous_groups: Vec<String>,
    /// Let CORS preflights through unauthenticated.
    #[serde(default)]
    pub allow_preflights: bool,
}

/// A basic-auth user: `{ name: alice, password_hash: "$2y$...", groups: [...] }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name.
    pub name: String,
    /// A bcrypt or Argon2 hash.
    pub password_hash: String,
    /// Its groups.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `basic-auth`'s section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicAuthConfig {
    /// The users.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// An htpasswd file with more.
    pub htpasswd_file: Option<String>,
    /// Groups of the file's users: `{ alice: [admins] }`.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Take `Authorization` out before the upstream.
    #[serde(default)]
    pub hide_credentials: bool,
    /// The challenge's realm.
    pub realm: Option<String>,
    /// Hashes checked at once [default: 2].
    pub concurrency: Option<usize>,
    /// How long a success is remembered [default: 5m].
    pub cache_for: Option<Period>,
    /// Let requests without credentials through as this consumer.
    pub anonymous: Option<String>,
    /// The anonymous consumer\'s groups (for an ACL after it).
    #[serde(default)]
    pub anonymous_groups: Vec<String>,
    /// Let CORS preflights through unauthenticated.
    #[serde(default)]
    pub allow_preflights: bool,
}

/// One method of an `auth` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum MethodConfig {
    /// A `jwt` section.
    Jwt(Box<JwtConfig>),
    /// A `key-auth` section.
    KeyAuth(KeyAuthConfig),
    /// A `basic-auth` section.
    BasicAuth(BasicAuthConfig),
}

/// `auth`'s section: any of several methods.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnyOfConfig {
    /// The methods, tried in order.
    pub any_of: Vec<MethodConfig>,
    /// Let requests without any credential through as this consumer.
    pub anonymous: Option<String>,
    /// The anonymous consumer\'s groups (for an ACL after it).
    #[serde(default)]
    pub anonymous_groups: Vec<String>,
    /// Let CORS preflights through unauthenticated.
    #[serde(default)]
    pub allow_preflights: bool,
}

/// `acl`'s section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Groups let through.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Groups refused.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `forward-auth`'s section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// The authorization service's URL.
    pub url: String,
    /// Request headers sent to it [default: `[authorization, cookie]`].
    pub request_headers: Option<Vec<String>>,
    /// Headers of its 2xx copied onto the request.
    #[serde(default)]
    pub response_headers: Vec<String>,
    /// The header of its 2xx naming the consumer.
    pub identity_header: Option<String>,
    /// How long one ask may take [default: 5s].
    pub timeout: Option<Period>,
    /// How long a decision is remembered [default: none].
    pub cache_for: Option<Period>,
    /// Key remembered decisions by the headers sent alone [default: false].
    #[serde(default)]
    pub cache_by_headers_only: bool,
}

/// What a method section builds: the method, and the layer options it carries.
trait MethodSection:
    serde::de::DeserializeOwned + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    fn method(&self, cx: &Context, jwks: &SharedJwks) -> Result<Arc<dyn Authenticate>, BoxError>;
    fn anonymous(&self) -> Option<(&str, &[String])>;
    fn allow_preflights(&self) -> bool;
}

struct MethodFactory<C> {
    jwks: Arc<SharedJwks>,
    _config: std::marker::PhantomData<fn(&C)>,
}

impl<C> MethodFactory<C> {
    fn new(jwks: &Arc<SharedJwks>) -> Self {
        Self {
            jwks: Arc::clone(jwks),
            _config: std::marker::PhantomData,
        }
    }
}

fn finish(
    mut layer: AuthLayer,
    anonymous: Option<(&str, &[String])>,
    preflights: bool,
    cx: &Context,
) -> RouteLayer {
    if let Some((name, groups)) = anonymous {
        layer = layer
            .anonymous(Identity::anonymous_as(name).with_groups(groups.iter().map(String::as_str)));
    }
    layer = layer.allow_preflights(preflights);
    if let Some(metrics) = cx.metrics() {
        layer = layer.metrics(metrics, cx.route().as_str());
    }
    RouteLayer::new(layer)
}

impl<C: MethodSection> PluginFactory for MethodFactory<C> {
    type Config = C;

    fn layer(&self, config: &C, cx: &Context) -> Result<RouteLayer, BoxError> {
        let layer = AuthLayer::new(config.method(cx, &self.jwks)?);
        Ok(finish(
            layer,
            config.anonymous(),
            config.allow_preflights(),
            cx,
        ))
    }
}

struct AnyOfFactory {
    jwks: Arc<SharedJwks>,
}

impl PluginFactory for AnyOfFactory {
    type Config = AnyOfConfig;

    fn layer(&self, config: &AnyOfConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        let mut methods = config.any_of.iter().enumerate().map(|(i, m)| {
            let made = match m {
                MethodConfig::Jwt(c) => c.method(cx, &self.jwks),
                MethodConfig::KeyAuth(c) => c.method(cx, &self.jwks),
                MethodConfig::BasicAuth(c) => c.method(cx, &self.jwks),
            };
            made.map_err(|e| BoxError::from(format!("any_of[{i}]: {e}")))
        });
        let Some(first) = methods.next() else {
            return Err("`any_of` needs at least one method".into());
        };
        let mut layer = AuthLayer::new(first?);
        for method in methods {
            layer = layer.or(method?);
        }
        Ok(finish(
            layer,
            config
                .anonymous
                .as_deref()
                .map(|name| (name, config.anonymous_groups.as_slice())),
            config.allow_preflights,
            cx,
        ))
    }
}

fn algorithm(name: Option<&str>) -> Result<Algorithm, BoxError> {
    let name = name.ok_or("`algorithm` is required with `secret` or `public_key_file`")?;
    name.parse::<Algorithm>()
        .map_err(|_| format!("`{name}` is not a signing algorithm (HS256 ... EdDSA)").into())
}

fn read(path: &str) -> Result<Vec<u8>, BoxError> {
    std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}").into())
}

impl MethodSection for JwtConfig {
    fn method(&self, cx: &Context, shared: &SharedJwks) -> Result<Arc<dyn Authenticate>, BoxError> {
        let given = [
            self.jwks_url.is_some(),
            self.jwks_file.is_some(),
            self.public_key_file.is_some(),
            self.secret.is_some(),
        ];
        if given.iter().filter(|g| **g).count() != 1 {
            return Err(
                "give one of `jwks_url`, `jwks_file`, `public_key_file` or `secret`".into(),
            );
        }
        let keys = if let Some(url) = &self.jwks_url {
            let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
            let startup = match self.startup.as_deref() {
                None | Some("wait") => {
                    Startup::Wait(self.startup_wait.map_or(Duration::from_secs(5), |p| p.0))
                }
                Some("fail") => Startup::Fail,
                Some(other) => {
                    return Err(format!("`startup` is `wait` or `fail`, not `{other}`").into());
                }
            };
            let mut builder = Jwks::remote(uri).startup(startup);
            if let Some(p) = self.refresh {
                builder = builder.refresh(p.0);
            }
            if let Some(p) = self.refetch_cooldown {
                builder = builder.refetch_cooldown(p.0);
            }
            if let Some(p) = self.fetch_timeout {
                builder = builder.timeout(p.0);
            }
            let key = format!(
                "{url} {startup:?} {:?} {:?} {:?}",
                self.refresh, self.refetch_cooldown, self.fetch_timeout
            );
            shared.get(&key, || {
                let client = cx
                    .client()
                    .ok_or("a `jwks_url` needs an HTTP client: lend one with `Registry::client`")?;
                Ok(builder.start(client.clone())?)
            })?
        } else if let Some(path) = &self.jwks_file {
            Jwks::from_file(path)?
        } else if let Some(path) = &self.public_key_file {
            Jwks::keys([JwtKey::public_pem(
                algorithm(self.algorithm.as_deref())?,
                &read(path)?,
            )?])
        } else {
            let secret = self.secret.as_deref().unwrap_or_default();
            Jwks::keys([JwtKey::hmac(
                algorithm(self.algorithm.as_deref())?,
                secret.as_bytes(),
            )?])
        };
        let mut jwt = Jwt::builder(keys).hide_credentials(self.hide_credentials);
        for issuer in self.issuer.iter().flat_map(OneOrMany::list) {
            jwt = jwt.issuer(issuer);
        }
        for audience in self.audience.iter().flat_map(OneOrMany::list) {
            jwt = jwt.audience(audience);
        }
        if let Some(p) = self.leeway {
            jwt = jwt.leeway(p.0);
        }
        if let Some(p) = self.max_lifetime {
            jwt = jwt.max_lifetime(p.0);
        }
        if let Some(from) = &self.token_from {
            jwt = jwt.sources(
                from.iter()
                    .map(SourceConfig::source)
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        if let Some(claim) = &self.consumer_claim {
            jwt = jwt.consumer_claim(claim);
        }
        if let Some(claim) = &self.groups_claim {
            jwt = jwt.groups_claim(claim);
        }
        for (claim, header) in &self.claims_to_headers {
            jwt = jwt.claim_header(claim, header_name(header)?);
        }
        if let Some(realm) = &self.realm {
            jwt = jwt.realm(realm);
        }
        if let Some(size) = self.cache {
            jwt = jwt.cache(usize::try_from(size.0).unwrap_or(usize::MAX));
        }
        Ok(Arc::new(jwt.build()?))
    }

    fn anonymous(&self) -> Option<(&str, &[String])> {
        Some((self.anonymous.as_deref()?, &self.anonymous_groups))
    }

    fn allow_preflights(&self) -> bool {
        self.allow_preflights
    }
}

fn realm_ok(realm: &str) -> Result<&str, BoxError> {
    if realm.chars().any(char::is_control) {
        return Err("`realm` cannot hold control characters".into());
    }
    Ok(realm)
}

impl MethodSection for KeyAuthConfig {
    fn method(&self, _: &Context, _: &SharedJwks) -> Result<Arc<dyn Authenticate>, BoxError> {
        let mut consumers = self.consumers.clone();
        if let Some(path) = &self.consumers_file {
            let text =
                String::from_utf8(read(path)?).map_err(|_| format!("{path} is not UTF-8"))?;
            let more: Vec<ConsumerConfig> = serde_saphyr::from_str(&text)
                .map_err(|e| format!("{path}: not a list of consumers: {e}"))?;
            consumers.extend(more);
        }
        let mut keys = ApiKeys::new();
        let mut seen = std::collections::HashSet::new();
        for consumer in &consumers {
            for key in &consumer.keys {
                if key.len() < 16 {
                    return Err(format!(
                        "consumer `{}`: a key of fewer than 16 characters is guessable",
                        consumer.name
                    )
                    .into());
                }
                if !seen.insert(key.as_str()) {
                    return Err(
                        format!("consumer `{}`: a key is given twice", consumer.name).into(),
                    );
                }
            }
            let identity = Identity::consumer(consumer.name.as_str())
                .with_groups(consumer.groups.iter().map(String::as_str));
            keys = keys.consumer(identity, &consumer.keys);
        }
        if keys.is_empty() {
            return Err("no consumer has a key".into());
        }
        let mut method = KeyAuth::new(keys).hide_credentials(self.hide_credentials);
        if let Some(from) = &self.key_from {
            method = method.sources(
                from.iter()
                    .map(SourceConfig::source)
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        if let Some(realm) = &self.realm {
            method = method.realm(realm_ok(realm)?);
        }
        Ok(Arc::new(method))
    }

    fn anonymous(&self) -> Option<(&str, &[String])> {
        Some((self.anonymous.as_deref()?, &self.anonymous_groups))
    }

    fn allow_preflights(&self) -> bool {
        self.allow_preflights
    }
}

impl MethodSection for BasicAuthConfig {
    fn method(&self, _: &Context, _: &SharedJwks) -> Result<Arc<dyn Authenticate>, BoxError> {
        let groups = |user: &str| self.groups.get(user).cloned().unwrap_or_default();
        let mut users = match &self.htpasswd_file {
            Some(path) => Users::from_htpasswd_file(path, groups)?,
            None => Users::new(),
        };
        for user in &self.users {
            let identity = Identity::consumer(user.name.as_str())
                .with_groups(user.groups.iter().map(String::as_str));
            users = users.user(identity, &user.password_hash)?;
        }
        if users.is_empty() {
            return Err("no users".into());
        }
        let mut method = BasicAuth::new(users).hide_credentials(self.hide_credentials);
        if let Some(realm) = &self.realm {
            method = method.realm(realm_ok(realm)?);
        }
        if let Some(n) = self.concurrency {
            method = method.concurrency(n);
        }
        if let Some(p) = self.cache_for {
            method = method.cache_for(p.0);
        }
        Ok(Arc::new(method))
    }

    fn anonymous(&self) -> Option<(&str, &[String])> {
        Some((self.anonymous.as_deref()?, &self.anonymous_groups))
    }

    fn allow_preflights(&self) -> bool {
        self.allow_preflights
    }
}

struct AclFactory;

impl PluginFactory for AclFactory {
    type Config = AclConfig;

    fn layer(&self, config: &AclConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        if config.allow.is_empty() && config.deny.is_empty() {
            return Err("an acl needs an `allow` or a `deny` list".into());
        }
        let acl = Acl::allow(config.allow.iter().map(String::as_str))
            .and_deny(config.deny.iter().map(String::as_str));
        let mut layer = AclLayer::new(acl);
        if let Some(metrics) = cx.metrics() {
            layer = layer.metrics(metrics, cx.route().as_str());
        }
        Ok(RouteLayer::new(layer))
    }
}

struct ForwardAuthFactory;

impl PluginFactory for ForwardAuthFactory {
    type Config = ForwardAuthConfig;

    fn layer(&self, config: &ForwardAuthConfig, cx: &Context) -> Result<RouteLayer, BoxError> {
        let uri: http::Uri = config
            .url
            .parse()
            .map_err(|_| format!("`{}` is not a URL", config.url))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!("`{}` is not an absolute http(s) URL", config.url).into());
        }
        let client = cx
            .client()
            .ok_or("forward-auth needs an HTTP client: lend one with `Registry::client`")?;
        let names = |list: &[String]| {
            list.iter()
                .map(|n| header_name(n))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut layer = ForwardAuthLayer::new(client.clone(), uri)
            .response_headers(names(&config.response_headers)?);
        if let Some(list) = &config.request_headers {
            layer = layer.request_headers(names(list)?);
        }
        if let Some(name) = &config.identity_header {
            layer = layer.identity_header(header_name(name)?);
        }
        if let Some(p) = config.timeout {
            layer = layer.timeout(p.0);
        }
        if let Some(p) = config.cache_for {
            layer = layer.cache_for(p.0);
        }
        if config.cache_by_headers_only {
            layer = layer.cache_by_headers_only();
        }
        Ok(RouteLayer::new(layer))
    }
}
