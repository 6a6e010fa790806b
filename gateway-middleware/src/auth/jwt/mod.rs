//! JSON Web Tokens (RFC 7519), verified strictly: see [`Jwt`].

mod keys;
mod remote;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use gateway_core::Identity;
use http::header::{HeaderName, HeaderValue};
use http::request;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

pub use keys::{JwtKey, KeyError};
#[cfg(feature = "config")]
pub(crate) use remote::WeakJwks;
pub use remote::{Jwks, JwksBuilder, Startup};

use super::credential::Source;
use super::{Authenticate, Check, Grant, Rejection, Verdict, challenge};
use remote::Lookup;

const NAME: &str = "jwt";

/// The bytes of verified tokens kept by default.
const DEFAULT_CACHE: usize = 8 * 1024 * 1024;

/// The most groups taken from a token, and the most bytes of each.
const MAX_GROUPS: usize = 64;
const MAX_GROUP_LEN: usize = 256;

/// Authenticates by JSON Web Token (RFC 7519), verified strictly. Build it with
/// [`Jwt::builder`].
///
/// The signature is checked by `jsonwebtoken` (its RustCrypto backend); everything else is
/// checked here, because `jsonwebtoken`'s `Validation` is lenient where a gateway must not
/// be: it skips `iss` and `aud` when a token leaves them out unless they are listed as
/// required, and skips them when they have the wrong JSON type (`"iss": 123`), leaves
/// `nbf` unchecked by default, and has a 60 s leeway nobody chose. Here:
///
/// - the header is read first: `alg` must be the algorithm of the key that verifies (the
///   key pins it; `none` names none), a `kid` is only looked up among the loaded keys, a
///   `crit` header refuses the token (no extension is understood), and `jku`, `x5u`,
///   `jwk` and `x5c` are never followed;
/// - `exp` is required and must be a number; `nbf` and `iat`, when present, must be numbers,
///   and `nbf` is checked; the leeway is explicit (default 0);
/// - a configured issuer makes `iss` required, a string, and one of those allowed; a
///   configured audience makes `aud` required, a string or an array of strings, and (one
///   of them) allowed;
/// - an optional `max_lifetime` refuses tokens that expire too far ahead (Kong's
///   `maximum_expiration`).
#[derive(Clone)]
pub struct Jwt {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Jwks,
    sources: Vec<Source>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    leeway: u64,
    max_lifetime: Option<u64>,
    consumer_claim: String,
    groups_claim: Option<String>,
    claim_headers: Vec<(String, HeaderName)>,
    hide: bool,
    challenge: HeaderValue,
    invalid: HeaderValue,
    cache: Option<TokenCache>,
}

/// Builds a [`Jwt`].
#[derive(Debug)]
#[must_use]
pub struct JwtBuilder {
    keys: Jwks,
    sources: Vec<Source>,
    issuers: Vec<String>,
    audiences: Vec<String>,
    leeway: Duration,
    max_lifetime: Option<Duration>,
    consumer_claim: String,
    groups_claim: Option<String>,
    claim_headers: Vec<(String, HeaderName)>,
    hide: bool,
    realm: String,
    cache: usize,
}

impl Jwt {
    /// Tokens verified by `keys`, from `Authorization: Bearer`, with no leeway, and the
    /// consumer named by the `sub` claim.
    pub fn builder(keys: Jwks) -> JwtBuilder {
        JwtBuilder {
            keys,
            sources: vec![Source::Bearer],
            issuers: Vec::new(),
            audiences: Vec::new(),
            leeway: Duration::ZERO,
            max_lifetime: None,
            consumer_claim: "sub".to_owned(),
            groups_claim: None,
            claim_headers: Vec::new(),
            hide: false,
            realm: "gateway".to_owned(),
            cache: DEFAULT_CACHE,
        }
    }

    /// The key set the tokens are verified with.
    pub fn keys(&self) -> &Jwks {
        &self.inner.keys
    }
}

impl JwtBuilder {
    /// Requires `iss` to be `issuer` (call again to allow several).
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuers.push(issuer.into());
        self
    }

    /// Requires `aud` to be, or to contain, `audience` (call again to allow several).
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audiences.push(audience.into());
        self
    }

    /// How far `exp` and `nbf` may be off, for clocks that disagree [default: 0].
    pub const fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Refuses tokens whose `exp` is further ahead than `max` [default: no limit].
    pub const fn max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = Some(max);
        self
    }

    /// Reads the token from these places instead of `Authorization: Bearer` (the first
    /// that has one). A query parameter puts tokens in URLs, and so in logs: only by choice.
    pub fn sources(mut self, sources: impl IntoIterator<Item = Source>) -> Self {
        self.sources = sources.into_iter().collect();
        self
    }

    /// The claim that names the consumer [default: `sub`]; a token without it is refused.
    pub fn consumer_claim(mut self, claim: impl Into<String>) -> Self {
        self.consumer_claim = claim.into();
        self
    }

    /// The claim that lists the consumer's groups, for ACLs: an array of strings, or one
    /// string of space-separated names (as `scope` is) [default: none].
    pub fn groups_claim(mut self, claim: impl Into<String>) -> Self {
        self.groups_claim = Some(claim.into());
        self
    }

    /// Forwards `claim` to the upstream as the request header `header` (a string, number
    /// or boolean claim; others are left out). A client's own `header` is always removed
    /// first, token or not, so the upstream can trust it.
    pub fn claim_header(mut self, claim: impl Into<String>, header: HeaderName) -> Self {
        self.claim_headers.push((claim.into(), header));
        self
    }

    /// Takes the token out of the request before it goes on (Kong's `hide_credentials`).
    pub const fn hide_credentials(mut self, hide: bool) -> Self {
        self.hide = hide;
        self
    }

    /// Keeps verified tokens, up to `bytes` of them, so that a token sent again is not
    /// verified again until it expires (its `exp` and `nbf` are checked on every use); 0
    /// turns the cache off [default: 8 MiB, some 8,000 typical tokens]. A key removed from
    /// the set does not end the tokens it verified before they expire.
    pub const fn cache(mut self, bytes: usize) -> Self {
        self.cache = bytes;
        self
    }

    /// The realm of the 401's challenge (`Bearer realm="..."`) [default: `gateway`].
    pub fn realm(mut self, realm: impl Into<String>) -> Self {
        self.realm = realm.into();
        self
    }

    /// The method.
    ///
    /// # Errors
    ///
    /// When the realm cannot be in a header.
    pub fn build(self) -> Result<Jwt, KeyError> {
        let header = |params| {
            challenge("Bearer", &self.realm, params)
                .map_err(|_| KeyError("the realm cannot be in a header".into()))
        };
        let challenge = header("")?;
        let invalid = header(", error=\"invalid_token\"")?;
        Ok(Jwt {
            inner: Arc::new(Inner {
                keys: self.keys,
                sources: self.sources,
                issuers: self.issuers,
                audiences: self.audiences,
                leeway: self.leeway.as_secs(),
                max_lifetime: self.max_lifetime.map(|d| d.as_secs()),
                consumer_claim: self.consumer_claim,
                groups_claim: self.groups_claim,
                claim_headers: self.claim_headers,
                hide: self.hide,
                challenge,
                invalid,
                cache: (self.cache > 0).then(|| {
                    let bytes = self.cache as u64;
                    TokenCache::with_weighter((self.cache / 1024).max(16), bytes, TokenWeight)
                }),
            }),
        })
    }
}

impl fmt::Debug for Jwt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwt")
            .field("keys", &self.inner.keys)
            .field("issuers", &self.inner.issuers)
            .field("audiences", &self.inner.audiences)
            .field("leeway", &self.inner.leeway)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused: the reason label, and what the log says.
type Refusal = (&'static str, Cow<'static, str>);

fn refuse(reason: &'static str, detail: impl Into<Cow<'static, str>>) -> Refusal {
    (reason, detail.into())
}

/// A token split and its header read.
struct Parsed<'a> {
    alg: Algorithm,
    kid: Option<String>,
    /// `header.payload`, what the signature signs.
    message: &'a str,
    payload: &'a str,
    signature: &'a str,
}

#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// The most bytes of a `kid`.
const MAX_KID: usize = 256;

fn parse(token: &str) -> Result<Parsed<'_>, Refusal> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse("malformed", "not three dot-separated parts"));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| refuse("malformed", "the header is not base64url"))?;
    let head: Header = serde_json::from_slice(&bytes)
        .map_err(|e| refuse("malformed", format!("the header is not a JWS header: {e}")))?;
    if head.crit.is_some() {
        return Err(refuse(
            "critical",
            "a `crit` header names extensions not understood",
        ));
    }
    let alg = head.alg.parse::<Algorithm>().map_err(|_| {
        refuse(
            "algorithm",
            format!("`alg` {:?} is not a signing algorithm", head.alg),
        )
    })?;
    if head.kid.as_ref().is_some_and(|k| k.len() > MAX_KID) {
        return Err(refuse("malformed", "the `kid` is too long"));
    }
    Ok(Parsed {
        alg,
        kid: head.kid,
        message: &token[..header.len() + 1 + payload.len()],
        payload,
        signature,
    })
}

impl Inner {
    /// Verifies `token` with `keys`: the claims, or why not.
    fn verify(&self, parsed: &Parsed<'_>, keys: &[JwtKey]) -> Result<Map<String, Value>, Refusal> {
        // Without a `kid`, the keys of the token's algorithm are tried, a few at most: a
        // token must not make the gateway try every key of a large set.
        const MAX_TRIES: usize = 3;
        let matches = |k: &&JwtKey| match &parsed.kid {
            Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
            None => k.alg == parsed.alg,
        };
        let tries = if parsed.kid.is_some() {
            usize::MAX
        } else {
            MAX_TRIES
        };
        let mut candidates = keys.iter().filter(matches).take(tries).peekable();
        if candidates.peek().is_none() {
            return Err(refuse(
                "unknown_key",
                "no loaded key matches its `kid` or algorithm",
            ));
        }
        let mut verified = false;
        for key in candidates {
            if key.alg != parsed.alg {
                return Err(refuse(
                    "algorithm",
                    format!("`alg` {:?} is not its key's {:?}", parsed.alg, key.alg),
                ));
            }
            let ok = key
                .verifies(parsed.message.as_bytes(), parsed.signature)
                .map_err(|e| {
                    refuse("signature", format!("the signature cannot be checked: {e}"))
                })?;
            if ok {
                verified = true;
                break;
            }
        }
        if !verified {
            return Err(refuse("signature", "the signature does not verify"));
        }
        let payload = URL_SAFE_NO_PAD
            .decode(parsed.payload)
            .map_err(|_| refuse("malformed", "the payload is not base64url"))?;
        let claims: Map<String, Value> = serde_json::from_slice(&payload)
            .map_err(|_| refuse("malformed", "the payload is not a JSON object"))?;
        self.check_claims(&claims, now())?;
        Ok(claims)
    }

    /// The registered claims, strictly (see the module docs).
    fn check_claims(&self, claims: &Map<String, Value>, now: u64) -> Result<(), Refusal> {
        let time = |name: &'static str| -> Result<Option<f64>, Refusal> {
            match claims.get(name) {
                None => Ok(None),
                Some(Value::Number(n)) => n
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| refuse("claims", format!("`{name}` is not a NumericDate"))),
                Some(_) => Err(refuse("claims", format!("`{name}` is not a number"))),
            }
        };
        #[expect(
            clippy::cast_precision_loss,
            reason = "seconds since 1970 fit in f64 exactly"
        )]
        let (now, leeway) = (now as f64, self.leeway as f64);
        let exp = time("exp")?.ok_or_else(|| refuse("claims", "no `exp`"))?;
        if now >= exp + leeway {
            return Err(refuse("expired", "`exp` has passed"));
        }
        if let Some(nbf) = time("nbf")?
            && now + leeway < nbf
        {
            return Err(refuse("not_yet_valid", "`nbf` is ahead"));
        }
        time("iat")?;
        if let Some(max) = self.max_lifetime {
            #[expect(
                clippy::cast_precision_loss,
                reason = "a lifetime in seconds fits in f64"
            )]
            let max = max as f64;
            if exp - now > max + leeway {
                return Err(refuse(
                    "lifetime",
                    "`exp` is further ahead than `max_lifetime`",
                ));
            }
        }
        if !self.issuers.is_empty() {
            match claims.get("iss") {
                Some(Value::String(iss)) if self.issuers.iter().any(|i| i == iss) => {}
                Some(Value::String(_)) => return Err(refuse("issuer", "`iss` is not allowed")),
                Some(_) => return Err(refuse("issuer", "`iss` is not a string")),
                None => return Err(refuse("issuer", "no `iss`")),
            }
        }
        if !self.audiences.is_empty() {
            let allowed = |a: &str| self.audiences.iter().any(|x| x == a);
            let ok = match claims.get("aud") {
                Some(Value::String(aud)) => allowed(aud),
                Some(Value::Array(auds)) => {
                    if !auds.iter().all(Value::is_string) {
                        return Err(refuse("audience", "`aud` is not a list of strings"));
                    }
                    auds.iter().filter_map(Value::as_str).any(allowed)
                }
                Some(_) => return Err(refuse("audience", "`aud` is not a string or a list")),
                None => return Err(refuse("audience", "no `aud`")),
            };
            if !ok {
                return Err(refuse("audience", "`aud` is not allowed"));
            }
        }
        Ok(())
    }

    /// Who verified `claims` name, and the headers they give.
    fn accept(&self, claims: &Map<String, Value>) -> Result<Accepted, Refusal> {
        let consumer = match claims.get(&self.consumer_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.as_str(),
            _ => {
                return Err(refuse(
                    "claims",
                    format!("no string `{}` to name the consumer", self.consumer_claim),
                ));
            }
        };
        let mut identity = Identity::consumer(consumer);
        if let Some(claim) = &self.groups_claim {
            let groups: Vec<&str> = match claims.get(claim) {
                Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
                Some(Value::String(s)) => s.split(' ').filter(|g| !g.is_empty()).collect(),
                _ => Vec::new(),
            };
            identity = identity.with_groups(
                groups
                    .into_iter()
                    .filter(|g| g.len() <= MAX_GROUP_LEN)
                    .take(MAX_GROUPS),
            );
        }
        let mut headers = Vec::new();
        let mut attributes = Vec::new();
        for (claim, header) in &self.claim_headers {
            let text = match claims.get(claim) {
                Some(Value::String(s)) => s.clone(),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
                _ => continue,
            };
            if let Ok(value) = HeaderValue::try_from(text.as_str()) {
                headers.push((header.clone(), value));
                attributes.push((claim.as_str(), text));
            }
        }
        identity = identity.with_attributes(attributes);
        let time = |name| claims.get(name).and_then(Value::as_f64);
        Ok(Accepted {
            identity,
            headers: headers.into(),
            exp: time("exp").unwrap_or(0.0),
            nbf: time("nbf"),
        })
    }

    /// The grant of an accepted token, read from `source`.
    fn grant(&self, accepted: &Accepted, source: &Source) -> Grant {
        let mut grant =
            Grant::new(NAME, accepted.identity.clone()).headers(Arc::clone(&accepted.headers));
        if self.hide {
            grant = grant.strip(source.clone());
        }
        grant
    }

    /// The cached acceptance of `token`, while its times still hold.
    fn cached(&self, token: &str) -> Option<Arc<Accepted>> {
        let cache = self.cache.as_ref()?;
        let hit = cache.get(token)?;
        #[expect(
            clippy::cast_precision_loss,
            reason = "seconds since 1970 fit in f64 exactly"
        )]
        let (now, leeway) = (now() as f64, self.leeway as f64);
        if now >= hit.exp + leeway || hit.nbf.is_some_and(|nbf| now + leeway < nbf) {
            cache.remove(token);
            return None;
        }
        Some(hit)
    }

    fn rejection(&self, (reason, detail): Refusal) -> Rejection {
        let challenge = match reason {
            // RFC 6750 §3.1: `invalid_token` for an expired, revoked, malformed or otherwise
            // invalid token; nothing about which.
            "unavailable" => self.challenge.clone(),
            _ => self.invalid.clone(),
        };
        Rejection::unauthenticated(NAME, reason)
            .challenge(challenge)
            .detail(detail)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Authenticate for Jwt {
    fn name(&self) -> &'static str {
        NAME
    }

    fn prepare(&self, req: &mut request::Parts) {
        for (_, header) in &self.inner.claim_headers {
            req.headers.remove(header);
        }
    }

    fn authenticate(&self, req: &request::Parts) -> Check {
        let inner = &self.inner;
        let mut found = None;
        for source in &inner.sources {
            match source.find(req) {
                Ok(None) => {}
                Ok(Some(token)) if found.is_none() => found = Some((source, token)),
                Ok(Some(_)) => {
                    let r = refuse("ambiguous", "a token in two places");
                    return Verdict::Rejected(inner.rejection(r)).into();
                }
                Err(why) => {
                    let r = refuse(why.reason(), format!("the token in {}", source.describe()));
                    return Verdict::Rejected(inner.rejection(r)).into();
                }
            }
        }
        let Some((source, token)) = found else {
            return Verdict::Absent.into();
        };
        if let Some(hit) = inner.cached(&token) {
            return Verdict::Accepted(inner.grant(&hit, source)).into();
        }
        let parsed = match parse(&token) {
            Ok(parsed) => parsed,
            Err(r) => return Verdict::Rejected(inner.rejection(r)).into(),
        };
        match inner.keys.lookup(parsed.kid.as_deref()) {
            Lookup::Ready(keys) => self.judge(&token, &parsed, &keys, source).into(),
            Lookup::Unavailable => Verdict::Rejected(
                Rejection::unavailable(NAME, "unavailable").detail("no keys loaded yet"),
            )
            .into(),
            Lookup::Wait(wait) => {
                // The key set is being fetched (the first time, or for an unknown `kid`):
                // judge the token once it is in.
                let this = self.clone();
                let token = token.into_owned();
                let source = source.clone();
                Check::Pending(Box::pin(async move {
                    let keys = wait.await;
                    let Some(keys) = keys else {
                        return Verdict::Rejected(
                            Rejection::unavailable(NAME, "unavailable")
                                .detail("the JWKS could not be fetched"),
                        );
                    };
                    match parse(&token) {
                        Ok(parsed) => this.judge(&token, &parsed, &keys, &source),
                        Err(r) => Verdict::Rejected(this.inner.rejection(r)),
                    }
                }))
            }
        }
    }

    fn challenge(&self) -> Option<HeaderValue> {
        Some(self.inner.challenge.clone())
    }
}

impl Jwt {
    fn judge(&self, token: &str, parsed: &Parsed<'_>, keys: &[JwtKey], source: &Source) -> Verdict {
        let inner = &self.inner;
        match inner
            .verify(parsed, keys)
            .and_then(|claims| inner.accept(&claims))
        {
            Ok(accepted) => {
                let grant = inner.grant(&accepted, source);
                if let Some(cache) = &inner.cache {
                    cache.insert(token.into(), Arc::new(accepted));
                }
                Verdict::Accepted(grant)
            }
            Err(r) => Verdict::Rejected(inner.rejection(r)),
        }
    }
}

/// A verified token's identity, the headers it gives and its times, as cached.
struct Accepted {
    identity: Identity,
    headers: Arc<[(HeaderName, HeaderValue)]>,
    exp: f64,
    nbf: Option<f64>,
}

/// A cached token weighs its bytes and a fixed share for what it holds.
#[derive(Clone)]
struct TokenWeight;

impl quick_cache::Weighter<Box<str>, Arc<Accepted>> for TokenWeight {
    fn weight(&self, token: &Box<str>, _: &Arc<Accepted>) -> u64 {
        token.len() as u64 + 256
    }
}

type TokenCache = quick_cache::sync::Cache<Box<str>, Arc<Accepted>, TokenWeight>;

#[cfg(test)]
mod tests {
    use super::*;

    fn inner() -> Inner {
        let jwt = Jwt::builder(Jwks::keys([]))
            .issuer("https://idp")
            .audience("api")
            .leeway(Duration::from_secs(30))
            .max_lifetime(Duration::from_secs(3600))
            .build()
            .unwrap();
        Arc::try_unwrap(jwt.inner).ok().unwrap()
    }

    fn claims(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn registered_claims_are_checked_strictly() {
        let i = inner();
        let now = 1_000_000;
        let check = |json: &str| i.check_claims(&claims(json), now).map_err(|r| r.0);
        let good = r#"{"exp":1000100,"iss":"https://idp","aud":"api"}"#;
        assert_eq!(check(good), Ok(()));
        assert_eq!(check(r#"{"iss":"https://idp","aud":"api"}"#), Err("claims"));
        assert_eq!(
            check(r#"{"exp":"9999999999","iss":"https://idp","aud":"api"}"#),
            Err("claims")
        );
        assert_eq!(
            check(r#"{"exp":999970,"iss":"https://idp","aud":"api"}"#),
            Err("expired")
        );
        assert_eq!(
            check(r#"{"exp":999971,"iss":"https://idp","aud":"api"}"#),
            Ok(()),
            "leeway"
        );
        assert_eq!(
            check(r#"{"exp":1000100,"nbf":1000031,"iss":"https://idp","aud":"api"}"#),
            Err("not_yet_valid")
        );
        assert_eq!(
            check(r#"{"exp":1000100,"nbf":1000030,"iss":"https://idp","aud":"api"}"#),
            Ok(())
        );
        assert_eq!(
            check(r#"{"exp":1000100,"nbf":"0","iss":"https://idp","aud":"api"}"#),
            Err("claims")
        );
        assert_eq!(
            check(r#"{"exp":1003700,"iss":"https://idp","aud":"api"}"#),
            Err("lifetime")
        );
        for iss in [r#""evil""#, "12345", r#"["https://idp"]"#] {
            let json = format!(r#"{{"exp":1000100,"iss":{iss},"aud":"api"}}"#);
            assert_eq!(check(&json), Err("issuer"), "{iss}");
        }
        assert_eq!(check(r#"{"exp":1000100,"aud":"api"}"#), Err("issuer"));
        for aud in [r#""web""#, "42", "{}", r#"["web",1]"#, r#"["web"]"#] {
            let json = format!(r#"{{"exp":1000100,"iss":"https://idp","aud":{aud}}}"#);
            assert_eq!(check(&json), Err("audience"), "{aud}");
        }
        assert_eq!(
            check(r#"{"exp":1000100,"iss":"https://idp"}"#),
            Err("audience")
        );
        assert_eq!(
            check(r#"{"exp":1000100,"iss":"https://idp","aud":["web","api"]}"#),
            Ok(())
        );
    }

    #[test]
    fn headers_are_read_before_any_key() {
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let token = |h: &str| format!("{}.{}.sig", b64(h), b64("{}"));
        let reason = |t: &str| parse(t).err().map(|r| r.0);
        assert_eq!(reason(&token(r#"{"alg":"none"}"#)), Some("algorithm"));
        assert_eq!(
            reason(&token(r#"{"alg":"HS256","crit":["exp"]}"#)),
            Some("critical")
        );
        assert_eq!(
            reason(&token(r#"{"alg":"HS256","alg":"RS256"}"#)),
            Some("malformed")
        );
        assert_eq!(
            reason(&token(&format!(
                r#"{{"alg":"HS256","kid":"{}"}}"#,
                "k".repeat(300)
            ))),
            Some("malformed")
        );
        assert_eq!(reason("a.b"), Some("malformed"));
        assert_eq!(reason("a.b.c.d"), Some("malformed"));
        assert_eq!(reason("!!!.b.c"), Some("malformed"));
        let ok = token(r#"{"alg":"RS256","kid":"k1","jku":"https://evil/jwks"}"#);
        let parsed = parse(&ok).unwrap();
        assert_eq!(
            (parsed.alg, parsed.kid.as_deref()),
            (Algorithm::RS256, Some("k1"))
        );
    }
}
