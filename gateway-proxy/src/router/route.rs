//! Route definitions and the lookup table built from them.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use gateway_core::RouteId;
use http::Method;

use super::path;

/// What a route matches: host, path and method.
#[derive(Clone, Debug)]
#[must_use]
pub struct Route {
    host: HostPattern,
    path: PathPattern,
    methods: Option<Vec<Method>>,
    id: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum HostPattern {
    Any,
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
}

#[derive(Clone, Debug)]
enum PathPattern {
    Exact(String),
    Prefix(String),
}

/// A route definition that cannot be used.
#[derive(Debug)]
pub struct InvalidRoute {
    route: String,
    reason: &'static str,
}

/// One route in a host's table: the methods it takes and the index of its service.
#[derive(Clone, Debug)]
struct Entry {
    methods: Option<Vec<Method>>,
    index: usize,
}

/// The routes of one host pattern.
#[derive(Clone, Debug, Default)]
struct Paths {
    exact: HashMap<Box<str>, Vec<Entry>>,
    prefix: HashMap<Box<str>, Vec<Entry>>,
    /// `prefix_lens[n]`: some prefix key is `n` bytes long. A candidate of another length
    /// is skipped without hashing it, so a deep path under `/` costs one probe, not one per
    /// segment.
    prefix_lens: Vec<bool>,
}

/// Every route, indexed for lookup in a few hash probes per request.
#[derive(Clone, Debug, Default)]
pub(super) struct Table {
    exact_hosts: HashMap<Box<str>, Paths>,
    /// Longest suffix first.
    suffix_hosts: Vec<(Box<str>, Paths)>,
    any_host: Paths,
    ids: Vec<RouteId>,
}

// === impl Route ===

impl Route {
    /// Matches `path` exactly (after normalization).
    pub fn exact(path: impl Into<String>) -> Self {
        Self::new(PathPattern::Exact(path.into()))
    }

    /// Matches `prefix` and everything under it, on segment boundaries: `/api` matches
    /// `/api`, `/api/` and `/api/users`, never `/apiadmin`. `/` matches everything.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Self::new(PathPattern::Prefix(prefix.into()))
    }

    const fn new(path: PathPattern) -> Self {
        Self {
            host: HostPattern::Any,
            path,
            methods: None,
            id: None,
        }
    }

    /// Matches only requests for `host`: an exact name or `*.suffix`.
    pub fn host(mut self, host: &str) -> Self {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.host = match host.strip_prefix('*') {
            Some(suffix) => HostPattern::Suffix(suffix.to_owned()),
            None => HostPattern::Exact(host),
        };
        self
    }

    /// Matches only `method` (may be called several times).
    pub fn method(mut self, method: Method) -> Self {
        self.methods.get_or_insert_with(Vec::new).push(method);
        self
    }

    /// Names the route (for logs and metrics, via [`RouteId`]); defaults to its pattern.
    pub fn id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.id = Some(id.into());
        self
    }

    fn validate(&self) -> Result<(), InvalidRoute> {
        let invalid = |reason| InvalidRoute {
            route: self.to_string(),
            reason,
        };
        let p = match &self.path {
            PathPattern::Exact(p) | PathPattern::Prefix(p) => p,
        };
        match path::normalize(p) {
            Ok(n) if n == p.as_str() => {}
            Ok(_) => return Err(invalid("the path is not in normalized form")),
            Err(_) => return Err(invalid("the path is not a valid origin-form path")),
        }
        match &self.host {
            HostPattern::Any => {}
            HostPattern::Exact(h) => {
                if h.is_empty() || h.contains(['*', '/', ':', '@', ' ']) {
                    return Err(invalid("the host is not a host name"));
                }
            }
            HostPattern::Suffix(s) => {
                if !s.starts_with('.') || s.len() < 2 || s.contains(['*', '/', ':', '@', ' ']) {
                    return Err(invalid("a wildcard host must look like `*.example.com`"));
                }
            }
        }
        if self.methods.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid("the method list is empty"));
        }
        Ok(())
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(methods) = &self.methods {
            for (i, m) in methods.iter().enumerate() {
                write!(f, "{}{m}", if i == 0 { "" } else { "," })?;
            }
            f.write_str(" ")?;
        }
        match &self.host {
            HostPattern::Any => {}
            HostPattern::Exact(h) => f.write_str(h)?,
            HostPattern::Suffix(s) => write!(f, "*{s}")?,
        }
        match &self.path {
            PathPattern::Exact(p) => f.write_str(p),
            PathPattern::Prefix(p) if p == "/" => f.write_str("/*"),
            PathPattern::Prefix(p) => write!(f, "{p}/*"),
        }
    }
}

// === impl InvalidRoute ===

impl fmt::Display for InvalidRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid route `{}`: {}", self.route, self.reason)
    }
}

impl std::error::Error for InvalidRoute {}

// === impl Paths ===

impl Paths {
    fn lookup(&self, path: &str, method: &Method) -> Option<usize> {
        if let Some(i) = self.exact.get(path).and_then(|e| pick(e, method)) {
            return Some(i);
        }
        if self.prefix.is_empty() {
            return None;
        }
        // Candidate prefixes, longest first, cut only at `/`: so `/api` can never match
        // `/apiadmin`. Prefix keys carry no trailing slash (except the root).
        let mut candidate = match path.strip_suffix('/') {
            Some(p) if !p.is_empty() => p,
            _ => path,
        };
        loop {
            if self.prefix_lens.get(candidate.len()) == Some(&true)
                && let Some(i) = self.prefix.get(candidate).and_then(|e| pick(e, method))
            {
                return Some(i);
            }
            if candidate == "/" {
                return None;
            }
            candidate = match candidate.rfind('/') {
                Some(0) | None => "/",
                Some(i) => &candidate[..i],
            };
        }
    }
}

/// Method-specific entries come first, so the first match is the most specific.
fn pick(entries: &[Entry], method: &Method) -> Option<usize> {
    entries
        .iter()
        .find(|e| e.methods.as_ref().is_none_or(|m| m.contains(method)))
        .map(|e| e.index)
}

// === impl Table ===

impl Table {
    /// Adds `route` for the service at `index` (which must equal the number of routes so far).
    pub(super) fn insert(&mut self, route: Route, index: usize) -> Result<(), InvalidRoute> {
        route.validate()?;
        debug_assert_eq!(index, self.ids.len());
        let id = RouteId::new(route.id.clone().unwrap_or_else(|| route.to_string().into()));
        let paths = match &route.host {
            HostPattern::Any => &mut self.any_host,
            HostPattern::Exact(h) => self.exact_hosts.entry(h.as_str().into()).or_default(),
            HostPattern::Suffix(s) => {
                let pos = self.suffix_hosts.iter().position(|(k, _)| **k == **s);
                let pos = pos.unwrap_or_else(|| {
                    self.suffix_hosts
                        .push((s.as_str().into(), Paths::default()));
                    self.suffix_hosts
                        .sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
                    self.suffix_hosts
                        .iter()
                        .position(|(k, _)| **k == **s)
                        .unwrap_or_default()
                });
                &mut self.suffix_hosts[pos].1
            }
        };
        let (map, key) = match &route.path {
            PathPattern::Exact(p) => (&mut paths.exact, p.as_str()),
            PathPattern::Prefix(p) => {
                let key = match p.strip_suffix('/') {
                    Some(k) if !k.is_empty() => k,
                    _ => p.as_str(),
                };
                if paths.prefix_lens.len() <= key.len() {
                    paths.prefix_lens.resize(key.len() + 1, false);
                }
                paths.prefix_lens[key.len()] = true;
                (&mut paths.prefix, key)
            }
        };
        let entries = map.entry(key.into()).or_default();
        let overlaps = |e: &Entry| match (&e.methods, &route.methods) {
            (None, None) => true,
            (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
            _ => false,
        };
        if entries.iter().any(overlaps) {
            return Err(InvalidRoute {
                route: route.to_string(),
                reason: "another route already matches the same host, path and method",
            });
        }
        let entry = Entry {
            methods: route.methods,
            index,
        };
        if entry.methods.is_some() {
            entries.insert(0, entry);
        } else {
            entries.push(entry);
        }
        self.ids.push(id);
        Ok(())
    }

    /// The most specific route for `host` (normalized, if any), `path` (normalized) and
    /// `method`.
    pub(super) fn lookup(&self, host: Option<&str>, path: &str, method: &Method) -> Option<usize> {
        if let Some(host) = host {
            if let Some(i) = self
                .exact_hosts
                .get(host)
                .and_then(|p| p.lookup(path, method))
            {
                return Some(i);
            }
            for (suffix, paths) in &self.suffix_hosts {
                if host.len() > suffix.len()
                    && host.ends_with(&**suffix)
                    && let Some(i) = paths.lookup(path, method)
                {
                    return Some(i);
                }
            }
        }
        self.any_host.lookup(path, method)
    }

    pub(super) fn id(&self, index: usize) -> Option<&RouteId> {
        self.ids.get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: Vec<Route>) -> Table {
        let mut t = Table::default();
        for (i, r) in routes.into_iter().enumerate() {
            t.insert(r, i).unwrap();
        }
        t
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let t = table(vec![Route::prefix("/api"), Route::prefix("/")]);
        let get = |p| t.lookup(None, p, &Method::GET);
        assert_eq!(get("/api"), Some(0));
        assert_eq!(get("/api/"), Some(0));
        assert_eq!(get("/api/x/y"), Some(0));
        assert_eq!(get("/apiadmin"), Some(1));
        assert_eq!(get("/ap"), Some(1));
        assert_eq!(get("/"), Some(1));
    }

    #[test]
    fn the_most_specific_route_wins() {
        let t = table(vec![
            Route::prefix("/"),
            Route::prefix("/api"),
            Route::prefix("/api/v2"),
            Route::exact("/api/v2/health"),
            Route::prefix("/api").method(Method::POST),
            Route::prefix("/api").host("api.example.com"),
            Route::prefix("/").host("*.example.com"),
            Route::prefix("/").host("*.eu.example.com"),
        ]);
        let l = |h, p, m| t.lookup(h, p, &m);
        assert_eq!(l(None, "/api/v2/health", Method::GET), Some(3));
        assert_eq!(l(None, "/api/v2/health/x", Method::GET), Some(2));
        assert_eq!(l(None, "/api/v1", Method::GET), Some(1));
        assert_eq!(l(None, "/api/v1", Method::POST), Some(4));
        assert_eq!(l(Some("api.example.com"), "/api/x", Method::GET), Some(5));
        // A more specific host that has no matching path falls through to less specific ones.
        assert_eq!(l(Some("api.example.com"), "/other", Method::GET), Some(6));
        assert_eq!(l(Some("x.eu.example.com"), "/", Method::GET), Some(7));
        assert_eq!(l(Some("x.example.com"), "/", Method::GET), Some(6));
        assert_eq!(l(Some("example.com"), "/", Method::GET), Some(0));
        assert_eq!(l(Some("evil-example.com"), "/", Method::GET), Some(0));
    }

    #[test]
    fn prefixes_of_every_length_are_found() {
        // Lookup skips candidate lengths that no prefix has: the longest, the shortest and
        // the ones between must all still be tried.
        let t = table(vec![
            Route::prefix("/a"),
            Route::prefix("/a/bb/ccc"),
            Route::prefix("/a/bb/ccc/dddd/eeeee"),
            Route::prefix("/x").host("h.example"),
        ]);
        let get = |p| t.lookup(None, p, &Method::GET);
        assert_eq!(get("/a/bb/ccc/dddd/eeeee/f"), Some(2));
        assert_eq!(get("/a/bb/ccc/dddd/eeeee"), Some(2));
        assert_eq!(get("/a/bb/ccc/dddd"), Some(1));
        assert_eq!(get("/a/bb/cc"), Some(0));
        assert_eq!(get("/a"), Some(0));
        assert_eq!(get("/b/bb/ccc"), None);
        // Each host has its own set of lengths.
        assert_eq!(t.lookup(Some("h.example"), "/x/y", &Method::GET), Some(3));
        assert_eq!(
            t.lookup(Some("h.example"), "/a/bb/ccc", &Method::GET),
            Some(1)
        );
    }

    #[test]
    fn no_match_is_none() {
        let t = table(vec![
            Route::exact("/a"),
            Route::prefix("/b").method(Method::GET),
        ]);
        assert_eq!(t.lookup(None, "/a/", &Method::GET), None);
        assert_eq!(t.lookup(None, "/b", &Method::DELETE), None);
        assert_eq!(t.lookup(None, "/c", &Method::GET), None);
    }

    #[test]
    fn invalid_and_duplicate_routes_are_refused() {
        let mut t = Table::default();
        for (i, bad) in [
            Route::prefix("api"),
            Route::prefix("/a/../b"),
            Route::prefix("/a%2fb"),
            Route::exact("//x"),
            Route::prefix("/").host("a*b"),
            Route::prefix("/").host("*"),
        ]
        .into_iter()
        .enumerate()
        {
            assert!(t.insert(bad, i).is_err());
        }
        t.insert(Route::prefix("/a"), 0).unwrap();
        assert!(t.insert(Route::prefix("/a/"), 1).is_err());
        t.insert(Route::prefix("/a").method(Method::GET), 1)
            .unwrap();
        assert!(
            t.insert(Route::prefix("/a").method(Method::GET), 2)
                .is_err()
        );
    }

    #[test]
    fn ids_default_to_the_pattern() {
        let t = table(vec![
            Route::prefix("/api").host("*.x.io").method(Method::GET),
            Route::exact("/h").id("health"),
        ]);
        assert_eq!(t.id(0).unwrap().as_str(), "GET *.x.io/api/*");
        assert_eq!(t.id(1).unwrap().as_str(), "health");
    }
}
