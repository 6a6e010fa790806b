//! What a shared cache may store (RFC 9111 §3), how long it stays fresh (§4.2.1, §4.2.2),
//! its age (§4.2.3), and whether a request may be answered with it (§4.2, §5.2.1, RFC
//! 5861).

use std::time::{Duration, SystemTime};

use http::header::{AGE, AUTHORIZATION, DATE, ETAG, EXPIRES, LAST_MODIFIED, SET_COOKIE, VARY};
use http::{HeaderMap, Method, StatusCode};

use super::CacheControl;

/// The statuses stored: those a cache may give heuristic freshness (RFC 9110 §15.1) and
/// the redirects. A 206 is not stored (ranges are answered from a stored full response);
/// other statuses (401, 403, 429, 500, 502...) are not stored even when they say they may
/// be, so that a passing failure or a refusal is never served from the cache.
const STORED: [u16; 14] = [
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// The statuses that may be given heuristic freshness (RFC 9110 §15.1).
const HEURISTIC: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Why a response was not stored (a `Cache-Status` detail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStorable {
    /// Not a `GET`.
    Method,
    /// A status the cache does not store.
    Status,
    /// `no-store`, in the request or the response.
    NoStore,
    /// `private`: for one user.
    Private,
    /// The request carried `Authorization` and the response does not allow sharing it
    /// (`public`, `s-maxage` or `must-revalidate`; RFC 9111 §3.5).
    Authorization,
    /// The response sets a cookie: it is for the client that got it.
    SetCookie,
    /// `Vary: *`: no later request can match it.
    VaryStar,
    /// Neither freshness nor a validator: it could never be reused.
    Unusable,
}

impl NotStorable {
    /// The name used in `Cache-Status` details and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Method => "method",
            Self::Status => "status",
            Self::NoStore => "no-store",
            Self::Private => "private",
            Self::Authorization => "authorization",
            Self::SetCookie => "set-cookie",
            Self::VaryStar => "vary-star",
            Self::Unusable => "unusable",
        }
    }
}

/// Heuristic freshness (RFC 9111 §4.2.2): a response with a `Last-Modified` but no explicit
/// lifetime is fresh for a `fraction` of the time since it was modified, at most `max`.
/// Off unless configured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Heuristic {
    /// The share of the time since `Last-Modified` (0.1 in most caches).
    pub fraction: f64,
    /// The longest heuristic lifetime.
    pub max: Duration,
}

/// Whether a shared cache may store the response of status `status` and headers `res` to
/// a request of `method` and headers `req` (RFC 9111 §3, §3.5, and the rules above).
///
/// # Errors
///
/// Why it may not.
pub fn storable(
    method: &Method,
    req: &HeaderMap,
    req_cc: &CacheControl,
    status: StatusCode,
    res: &HeaderMap,
    res_cc: &CacheControl,
    heuristic: Option<Heuristic>,
) -> Result<(), NotStorable> {
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    if !STORED.contains(&status.as_u16()) {
        return Err(NotStorable::Status);
    }
    // `must-understand` from a cache that understands the status: `no-store` (sent for
    // the caches that do not) is ignored (§5.2.2.3).
    if req_cc.no_store() || (res_cc.no_store() && !res_cc.must_understand()) {
        return Err(NotStorable::NoStore);
    }
    if res_cc.private() {
        return Err(NotStorable::Private);
    }
    if req.contains_key(AUTHORIZATION)
        && !(res_cc.public() || res_cc.s_maxage().is_some() || res_cc.must_revalidate())
    {
        return Err(NotStorable::Authorization);
    }
    if res.contains_key(SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    if res.get_all(VARY).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|n| n.trim_ascii() == b"*")
    }) {
        return Err(NotStorable::VaryStar);
    }
    let explicit =
        res_cc.s_maxage().is_some() || res_cc.max_age().is_some() || res.contains_key(EXPIRES);
    let heuristic = heuristic.is_some()
        && res.contains_key(LAST_MODIFIED)
        && (res_cc.public() || HEURISTIC.contains(&status.as_u16()));
    let validator = res.contains_key(ETAG) || res.contains_key(LAST_MODIFIED);
    if explicit || heuristic || validator {
        Ok(())
    } else {
        Err(NotStorable::Unusable)
    }
}

/// A stored response's freshness and age, computed once when it is stored (or
/// revalidated) and then read on every hit without parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// The freshness lifetime (§4.2.1).
    lifetime: Duration,
    /// The age when it was received (`corrected_initial_age`, §4.2.3).
    initial_age: Duration,
    /// When it was received.
    received: SystemTime,
    /// Never served stale: `must-revalidate`, `proxy-revalidate`, or a `Cache-Control` not
    /// to be trusted.
    must_revalidate: bool,
    /// `no-cache`: validated before every reuse.
    no_cache: bool,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
}

/// What a request may get from a stored response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh (for this request): served as it is.
    Fresh,
    /// Stale, within what the request accepts (`max-stale`): served as it is.
    Stale,
    /// Stale, within `stale-while-revalidate`: served, and refreshed in the background.
    StaleWhileRevalidate,
    /// To be validated with the upstream first (a conditional request).
    Validate,
}

impl Freshness {
    /// The freshness of a response with headers `res` whose request was sent at
    /// `requested` and which arrived at `received`.
    pub fn new(
        status: StatusCode,
        res: &HeaderMap,
        res_cc: &CacheControl,
        requested: SystemTime,
        received: SystemTime,
        heuristic: Option<Heuristic>,
    ) -> Self {
        let date = http_date(res, DATE).unwrap_or(received);
        let lifetime = if res_cc.is_invalid() {
            // Invalid freshness information: stale (§4.2.1).
            Duration::ZERO
        } else if let Some(s) = res_cc.s_maxage().or(res_cc.max_age()) {
            secs(s)
        } else if res.contains_key(EXPIRES) {
            // An invalid `Expires` (such as `0`) is a time in the past (§5.3).
            http_date(res, EXPIRES)
                .and_then(|expires| expires.duration_since(date).ok())
                .unwrap_or(Duration::ZERO)
        } else {
            match (heuristic, http_date(res, LAST_MODIFIED)) {
                (Some(h), Some(modified))
                    if res_cc.public() || HEURISTIC.contains(&status.as_u16()) =>
                {
                    date.duration_since(modified)
                        .map_or(Duration::ZERO, |since| since.mul_f64(h.fraction).min(h.max))
                }
                _ => Duration::ZERO,
            }
        };
        // §4.2.3: the age it had on arrival, from its `Age` and its `Date`.
        let age_value = res
            .get(AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        let apparent_age = received.duration_since(date).unwrap_or(Duration::ZERO);
        let response_delay = received.duration_since(requested).unwrap_or(Duration::ZERO);
        let initial_age = apparent_age.max(age_value.saturating_add(response_delay));
        Self {
            lifetime,
            initial_age,
            received,
            must_revalidate: res_cc.must_revalidate()
                || res_cc.proxy_revalidate()
                || res_cc.is_invalid(),
            no_cache: res_cc.no_cache(),
            stale_while_revalidate: res_cc.stale_while_revalidate().map_or(Duration::ZERO, secs),
            stale_if_error: res_cc.stale_if_error().map_or(Duration::ZERO, secs),
        }
    }

    /// When it was received (or last validated).
    pub const fn received(&self) -> SystemTime {
        self.received
    }

    pub(super) fn write(&self, w: &mut super::codec::Writer) {
        w.duration(self.lifetime);
        w.duration(self.initial_age);
        w.time(self.received);
        w.u8(u8::from(self.must_revalidate) | u8::from(self.no_cache) << 1);
        w.duration(self.stale_while_revalidate);
        w.duration(self.stale_if_error);
    }

    pub(super) fn read(r: &mut super::codec::Reader) -> Option<Self> {
        let (lifetime, initial_age, received) = (r.duration()?, r.duration()?, r.time()?);
        let flags = r.u8()?;
        if flags > 0b11 {
            return None;
        }
        Some(Self {
            lifetime,
            initial_age,
            received,
            must_revalidate: flags & 1 != 0,
            no_cache: flags & 2 != 0,
            stale_while_revalidate: r.duration()?,
            stale_if_error: r.duration()?,
        })
    }

    /// Its age at `now` (`current_age`, §4.2.3): what the `Age` field says.
    pub fn age(&self, now: SystemTime) -> Duration {
        let resident = now.duration_since(self.received).unwrap_or(Duration::ZERO);
        self.initial_age.saturating_add(resident)
    }

    /// Its freshness lifetime.
    pub const fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// How long it stays fresh after `now` (zero once stale).
    pub fn ttl(&self, now: SystemTime) -> Duration {
        self.lifetime.saturating_sub(self.age(now))
    }

    /// How long it has been stale at `now` (zero while fresh).
    pub fn staleness(&self, now: SystemTime) -> Duration {
        self.age(now).saturating_sub(self.lifetime)
    }

    /// How long after it turns stale it is still worth keeping: the longest window in
    /// which a stale copy may be served (`stale-while-revalidate`, `stale-if-error`).
    pub fn stale_window(&self) -> Duration {
        if self.must_revalidate {
            Duration::ZERO
        } else {
            self.stale_while_revalidate.max(self.stale_if_error)
        }
    }

    /// What a request with directives `req_cc` may get from it at `now`.
    pub fn reuse(&self, req_cc: &CacheControl, now: SystemTime) -> Reuse {
        if req_cc.no_cache() || self.no_cache {
            return Reuse::Validate;
        }
        let age = self.age(now);
        if req_cc.max_age().is_some_and(|max| age > secs(max)) {
            return Reuse::Validate;
        }
        let ttl = self.lifetime.saturating_sub(age);
        if req_cc.min_fresh().is_some_and(|min| ttl < secs(min)) {
            return Reuse::Validate;
        }
        if age < self.lifetime {
            return Reuse::Fresh;
        }
        if self.must_revalidate {
            return Reuse::Validate;
        }
        let stale = age - self.lifetime;
        if req_cc.max_stale().is_some_and(|max| stale <= secs(max)) {
            return Reuse::Stale;
        }
        if stale < self.stale_while_revalidate {
            return Reuse::StaleWhileRevalidate;
        }
        Reuse::Validate
    }

    /// Whether it may answer a request with directives `req_cc` at `now` when the upstream
    /// failed (`stale-if-error`, of the response or of the request; RFC 5861 §4).
    pub fn usable_on_error(&self, req_cc: &CacheControl, now: SystemTime) -> bool {
        if self.must_revalidate || self.no_cache || req_cc.no_cache() {
            return false;
        }
        let window = req_cc
            .stale_if_error()
            .map_or(self.stale_if_error, |s| self.stale_if_error.max(secs(s)));
        self.staleness(now) <= window
    }
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

/// The HTTP date of the one field `name`; `None` when absent, repeated or malformed.
fn http_date(headers: &HeaderMap, name: http::header::HeaderName) -> Option<SystemTime> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    httpdate::parse_http_date(value.to_str().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        h
    }

    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(at(secs))
    }

    fn check(req: &[(&str, &str)], status: u16, res: &[(&str, &str)]) -> Result<(), NotStorable> {
        let (req, res) = (headers(req), headers(res));
        storable(
            &Method::GET,
            &req,
            &CacheControl::parse_request(&req),
            StatusCode::from_u16(status).unwrap(),
            &res,
            &CacheControl::parse(&res),
            None,
        )
    }

    fn fresh(res: &[(&str, &str)], received: u64) -> Freshness {
        let res = headers(res);
        Freshness::new(
            StatusCode::OK,
            &res,
            &CacheControl::parse(&res),
            at(received),
            at(received),
            None,
        )
    }

    #[test]
    fn what_a_shared_cache_stores() {
        let max_age = [("cache-control", "max-age=60")];
        assert_eq!(check(&[], 200, &max_age), Ok(()));
        assert_eq!(check(&[], 200, &[("expires", &date(60))]), Ok(()));
        assert_eq!(
            check(&[], 200, &[("etag", "\"v1\"")]),
            Ok(()),
            "validated each time"
        );
        assert_eq!(check(&[], 200, &[]), Err(NotStorable::Unusable));
        assert_eq!(check(&[], 206, &max_age), Err(NotStorable::Status));
        assert_eq!(check(&[], 500, &max_age), Err(NotStorable::Status));
        assert_eq!(check(&[], 401, &max_age), Err(NotStorable::Status));
        for cc in ["no-store", "max-age=60, no-store"] {
            assert_eq!(
                check(&[], 200, &[("cache-control", cc)]),
                Err(NotStorable::NoStore)
            );
        }
        assert_eq!(
            check(&[("cache-control", "no-store")], 200, &max_age),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "max-age=60, must-understand, no-store")]
            ),
            Ok(()),
            "must-understand: no-store is for the caches that do not"
        );
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "private=\"x-user\", max-age=60")]
            ),
            Err(NotStorable::Private)
        );
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
            ),
            Err(NotStorable::SetCookie)
        );
        assert_eq!(
            check(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept, *")]
            ),
            Err(NotStorable::VaryStar)
        );
        assert_eq!(check(&[], 405, &max_age), Ok(()));
    }

    #[test]
    fn authorization_is_shared_only_when_the_response_allows_it() {
        let auth = [("authorization", "Bearer a")];
        assert_eq!(
            check(&auth, 200, &[("cache-control", "max-age=60")]),
            Err(NotStorable::Authorization)
        );
        for allows in [
            "public, max-age=60",
            "s-maxage=60",
            "max-age=60, must-revalidate",
        ] {
            assert_eq!(
                check(&auth, 200, &[("cache-control", allows)]),
                Ok(()),
                "{allows}"
            );
        }
    }

    #[test]
    fn lifetime_prefers_s_maxage_then_max_age_then_expires() {
        let f = fresh(&[("cache-control", "max-age=60, s-maxage=120")], 0);
        assert_eq!(f.lifetime(), Duration::from_secs(120));
        let f = fresh(
            &[("cache-control", "max-age=60"), ("expires", &date(600))],
            0,
        );
        assert_eq!(f.lifetime(), Duration::from_secs(60));
        let f = fresh(&[("date", &date(0)), ("expires", &date(600))], 0);
        assert_eq!(f.lifetime(), Duration::from_secs(600));
        let f = fresh(&[("date", &date(0)), ("expires", "0")], 0);
        assert_eq!(
            f.lifetime(),
            Duration::ZERO,
            "an invalid Expires is in the past"
        );
        let f = fresh(&[("cache-control", "max-age=60, max-age=70")], 0);
        assert_eq!(
            f.lifetime(),
            Duration::ZERO,
            "conflicting directives: stale"
        );
        assert_eq!(f.reuse(&CacheControl::default(), at(0)), Reuse::Validate);
    }

    #[test]
    fn heuristic_freshness_only_when_configured() {
        let res = headers(&[("date", &date(1000)), ("last-modified", &date(0))]);
        let cc = CacheControl::parse(&res);
        let none = Freshness::new(StatusCode::OK, &res, &cc, at(1000), at(1000), None);
        assert_eq!(none.lifetime(), Duration::ZERO);
        let heuristic = Heuristic {
            fraction: 0.1,
            max: Duration::from_secs(60),
        };
        let some = Freshness::new(
            StatusCode::OK,
            &res,
            &cc,
            at(1000),
            at(1000),
            Some(heuristic),
        );
        assert_eq!(
            some.lifetime(),
            Duration::from_secs(60),
            "10% of 1000 s, capped at 60"
        );
        let redirect = Freshness::new(
            StatusCode::FOUND,
            &res,
            &cc,
            at(1000),
            at(1000),
            Some(heuristic),
        );
        assert_eq!(
            redirect.lifetime(),
            Duration::ZERO,
            "302 has no heuristic freshness"
        );
    }

    #[test]
    fn age_counts_the_upstreams_age_the_trip_and_the_time_held() {
        let res = headers(&[
            ("cache-control", "max-age=100"),
            ("age", "30"),
            ("date", &date(0)),
        ]);
        let f = Freshness::new(
            StatusCode::OK,
            &res,
            &CacheControl::parse(&res),
            at(0),
            at(2),
            None,
        );
        // corrected_initial_age = max(apparent 2, 30 + 2) = 32; then held 10 s.
        assert_eq!(f.age(at(12)), Duration::from_secs(42));
        assert_eq!(f.ttl(at(12)), Duration::from_secs(58));
        // A Date in the future (clock skew) is no negative age.
        let res = headers(&[("cache-control", "max-age=100"), ("date", &date(50))]);
        let f = Freshness::new(
            StatusCode::OK,
            &res,
            &CacheControl::parse(&res),
            at(0),
            at(0),
            None,
        );
        assert_eq!(f.age(at(0)), Duration::ZERO);
    }

    #[test]
    fn requests_narrow_or_widen_what_they_accept() {
        let req = |cc: &str| CacheControl::parse(&headers(&[("cache-control", cc)]));
        let f = fresh(&[("cache-control", "max-age=60")], 0);
        let none = CacheControl::default();
        assert_eq!(f.reuse(&none, at(30)), Reuse::Fresh);
        assert_eq!(f.reuse(&req("no-cache"), at(30)), Reuse::Validate);
        assert_eq!(f.reuse(&req("max-age=20"), at(30)), Reuse::Validate);
        assert_eq!(f.reuse(&req("max-age=40"), at(30)), Reuse::Fresh);
        assert_eq!(f.reuse(&req("min-fresh=40"), at(30)), Reuse::Validate);
        assert_eq!(
            f.reuse(&none, at(60)),
            Reuse::Validate,
            "stale at its lifetime"
        );
        assert_eq!(f.reuse(&req("max-stale=10"), at(65)), Reuse::Stale);
        assert_eq!(f.reuse(&req("max-stale=10"), at(75)), Reuse::Validate);
        assert_eq!(f.reuse(&req("max-stale"), at(7500)), Reuse::Stale);

        let must = fresh(&[("cache-control", "max-age=60, must-revalidate")], 0);
        assert_eq!(must.reuse(&req("max-stale"), at(65)), Reuse::Validate);
        let no_cache = fresh(&[("cache-control", "max-age=60, no-cache")], 0);
        assert_eq!(no_cache.reuse(&none, at(1)), Reuse::Validate);
    }

    #[test]
    fn stale_while_revalidate_and_stale_if_error() {
        let none = CacheControl::default();
        let f = fresh(
            &[(
                "cache-control",
                "max-age=60, stale-while-revalidate=30, stale-if-error=300",
            )],
            0,
        );
        assert_eq!(f.reuse(&none, at(70)), Reuse::StaleWhileRevalidate);
        assert_eq!(f.reuse(&none, at(95)), Reuse::Validate);
        assert!(f.usable_on_error(&none, at(300)));
        assert!(!f.usable_on_error(&none, at(400)));
        assert_eq!(f.stale_window(), Duration::from_secs(300));
        let req = CacheControl::parse(&headers(&[("cache-control", "stale-if-error=1000")]));
        assert!(
            f.usable_on_error(&req, at(400)),
            "the request's window is wider"
        );

        let must = fresh(
            &[(
                "cache-control",
                "max-age=60, must-revalidate, stale-if-error=300",
            )],
            0,
        );
        assert!(!must.usable_on_error(&none, at(70)), "must-revalidate wins");
        assert_eq!(must.stale_window(), Duration::ZERO);
    }
}
