//! Where a credential is in a request, how to read exactly one, and how to take it out.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::request;
use http::uri::{PathAndQuery, Uri};

/// Where a method reads its credential.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// `Authorization: Bearer TOKEN` (RFC 6750 §2.1).
    Bearer,
    /// The whole value of a header (`X-API-Key: KEY`).
    Header(HeaderName),
    /// A query parameter (`?apikey=KEY`): visible in logs and browser histories, so only
    /// by choice (RFC 6750 §2.3).
    Query(Arc<str>),
    /// A cookie (`Cookie: session=TOKEN`).
    Cookie(Arc<str>),
}

/// Why a credential could not be read; the reason label of the rejection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unreadable {
    /// Present more than once (two headers, two parameters, two cookies): which one a
    /// server behind would read is anyone's guess, so neither is.
    Ambiguous,
    /// Present but empty, not text, or not of the form the scheme requires.
    Malformed,
}

impl Unreadable {
    pub(crate) const fn reason(self) -> &'static str {
        match self {
            Self::Ambiguous => "ambiguous",
            Self::Malformed => "malformed",
        }
    }
}

/// The most bytes of a credential read (a token, a key); a longer one is malformed.
pub(crate) const MAX_CREDENTIAL: usize = 16 * 1024;

impl Source {
    /// A query parameter source.
    pub fn query(name: &str) -> Self {
        Self::Query(name.into())
    }

    /// A cookie source.
    pub fn cookie(name: &str) -> Self {
        Self::Cookie(name.into())
    }

    /// The credential in `req`: `Ok(None)` when there is none of this kind.
    pub(crate) fn find<'a>(
        &self,
        req: &'a request::Parts,
    ) -> Result<Option<Cow<'a, str>>, Unreadable> {
        let found = match self {
            Self::Bearer => bearer(req)?.map(Cow::Borrowed),
            Self::Header(name) => {
                let Some(value) = only(req.headers.get_all(name).iter())? else {
                    return Ok(None);
                };
                Some(Cow::Borrowed(text(value)?))
            }
            Self::Query(name) => query(req.uri.query(), name)?,
            Self::Cookie(name) => cookie(req, name)?.map(Cow::Borrowed),
        };
        match found {
            Some(c) if c.is_empty() || c.len() > MAX_CREDENTIAL => Err(Unreadable::Malformed),
            found => Ok(found),
        }
    }

    /// Takes the credential out of `req`, so that the upstream never sees it.
    pub(crate) fn strip(&self, req: &mut request::Parts) {
        match self {
            Self::Bearer => {
                req.headers.remove(header::AUTHORIZATION);
            }
            Self::Header(name) => {
                req.headers.remove(name);
            }
            Self::Query(name) => {
                if let Some(uri) = without_param(&req.uri, name) {
                    req.uri = uri;
                }
            }
            Self::Cookie(name) => strip_cookie(req, name),
        }
    }

    /// The name a challenge or a log line gives this source.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Bearer => "authorization".to_owned(),
            Self::Header(name) => name.as_str().to_owned(),
            Self::Query(name) => format!("?{name}"),
            Self::Cookie(name) => format!("cookie {name}"),
        }
    }
}

/// The one value of an iterator, `None` for none, an error for more.
fn only<'a>(
    mut values: impl Iterator<Item = &'a HeaderValue>,
) -> Result<Option<&'a HeaderValue>, Unreadable> {
    let first = values.next();
    if first.is_some() && values.next().is_some() {
        return Err(Unreadable::Ambiguous);
    }
    Ok(first)
}

fn text(value: &HeaderValue) -> Result<&str, Unreadable> {
    value.to_str().map_err(|_| Unreadable::Malformed)
}

/// The bytes of RFC 7235's token68 but its trailing `=`: checked by lookup, a JWT's
/// hundreds of bytes being on every request's path.
const TOKEN68: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] =
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
        b += 1;
    }
    table
};

/// The token of `Authorization: Bearer TOKEN`. Another scheme is not ours (`Ok(None)`): a
/// basic-auth method may take it.
fn bearer(req: &request::Parts) -> Result<Option<&str>, Unreadable> {
    let Some(value) = only(req.headers.get_all(header::AUTHORIZATION).iter())? else {
        return Ok(None);
    };
    let value = value.as_bytes();
    let scheme_end = value.iter().position(|&b| b == b' ').unwrap_or(value.len());
    if !value[..scheme_end].eq_ignore_ascii_case(b"bearer") {
        return Ok(None);
    }
    // RFC 6750 §2.1: `Bearer` 1*SP b64token, where b64token is token68. One space, as
    // every client sends; anything else is a malformed credential, not a guess.
    let token = value.get(scheme_end + 1..).unwrap_or_default();
    let body = token.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    if body == 0 || !token[..body].iter().all(|&b| TOKEN68[usize::from(b)]) {
        return Err(Unreadable::Malformed);
    }
    // NOTE: token68 is ASCII.
    std::str::from_utf8(token)
        .map(Some)
        .map_err(|_| Unreadable::Malformed)
}

/// The value of the query parameter `name`, percent-decoded.
fn query<'a>(query: Option<&'a str>, name: &str) -> Result<Option<Cow<'a, str>>, Unreadable> {
    let Some(query) = query else {
        return Ok(None);
    };
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(key).as_deref() != Some(name) {
            continue;
        }
        if found.is_some() {
            return Err(Unreadable::Ambiguous);
        }
        found = Some(decode(value).ok_or(Unreadable::Malformed)?);
    }
    Ok(found)
}

/// `s` percent-decoded (and `+` as a space, as forms send it); `None` when the result is not
/// UTF-8 or an escape is broken.
fn decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The cookie `name` (RFC 6265 §5.4: `name=value` pairs split by `; `, in any number of
/// `Cookie` headers).
fn cookie<'a>(req: &'a request::Parts, name: &str) -> Result<Option<&'a str>, Unreadable> {
    let mut found = None;
    for header in req.headers.get_all(header::COOKIE) {
        let Ok(header) = header.to_str() else {
            continue;
        };
        for pair in header.split(';') {
            let Some((key, value)) = pair.trim().split_once('=') else {
                continue;
            };
            if key != name {
                continue;
            }
            if found.is_some() {
                return Err(Unreadable::Ambiguous);
            }
            // RFC 6265 §4.1.1: a value may be in double quotes.
            let unquoted = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
            found = Some(unquoted.unwrap_or(value));
        }
    }
    Ok(found)
}

fn strip_cookie(req: &mut request::Parts, name: &str) {
    let kept: Vec<String> = req
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|h| h.to_str().ok())
        .flat_map(|h| h.split(';'))
        .map(str::trim)
        .filter(|pair| pair.split_once('=').is_none_or(|(key, _)| key != name))
        .filter(|pair| !pair.is_empty())
        .map(str::to_owned)
        .collect();
    req.headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(value) = HeaderValue::from_str(&kept.join("; "))
    {
        req.headers.insert(header::COOKIE, value);
    }
}

/// `uri` without any query parameter `name`; `None` when it has none.
fn without_param(uri: &Uri, name: &str) -> Option<Uri> {
    let query = uri.query()?;
    let is_it =
        |pair: &&str| decode(pair.split_once('=').map_or(*pair, |p| p.0)).as_deref() == Some(name);
    if !query.split('&').any(|pair| is_it(&pair)) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !is_it(pair)).collect();
    let mut path_and_query = uri.path().to_owned();
    if !kept.is_empty() {
        path_and_query.push('?');
        path_and_query.push_str(&kept.join("&"));
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> request::Parts {
        let mut req = Request::builder().uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap_or_default().into_parts().0
    }

    #[test]
    fn bearer_tokens_are_read_strictly() {
        let find = |value: &str| {
            let req = parts("/", &[("authorization", value)]);
            Source::Bearer
                .find(&req)
                .map(|found| found.map(Cow::into_owned))
        };
        assert_eq!(
            find("Bearer abc.def-_~+/=="),
            Ok(Some("abc.def-_~+/==".to_owned()))
        );
        assert_eq!(find("bearer abc"), Ok(Some("abc".to_owned())));
        assert_eq!(
            find("Basic YTpi"),
            Ok(None),
            "another scheme is another method's"
        );
        for bad in [
            "Bearer",
            "Bearer ",
            "Bearer  abc",
            "Bearer a b",
            "Bearer ===",
            "Bearer a=b",
        ] {
            assert_eq!(find(bad), Err(Unreadable::Malformed), "{bad:?}");
        }
        let two = parts(
            "/",
            &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
        );
        assert_eq!(Source::Bearer.find(&two), Err(Unreadable::Ambiguous));
        assert_eq!(Source::Bearer.find(&parts("/", &[])), Ok(None));
    }

    #[test]
    fn headers_query_parameters_and_cookies() {
        let key = Source::Header(HeaderName::from_static("x-api-key"));
        assert_eq!(
            key.find(&parts("/", &[("x-api-key", "k1")])),
            Ok(Some("k1".into()))
        );
        assert_eq!(
            key.find(&parts("/", &[("x-api-key", "")])),
            Err(Unreadable::Malformed)
        );
        let two = parts("/", &[("x-api-key", "a"), ("x-api-key", "b")]);
        assert_eq!(key.find(&two), Err(Unreadable::Ambiguous));

        let q = Source::query("apikey");
        assert_eq!(
            q.find(&parts("/?a=1&apikey=k%2F1", &[])),
            Ok(Some("k/1".into()))
        );
        assert_eq!(
            q.find(&parts("/?apikey=a&apikey=b", &[])),
            Err(Unreadable::Ambiguous)
        );
        assert_eq!(
            q.find(&parts("/?apikey=%ZZ", &[])),
            Err(Unreadable::Malformed)
        );
        assert_eq!(q.find(&parts("/?apikeys=a", &[])), Ok(None));

        let c = Source::cookie("jwt");
        let req = parts("/", &[("cookie", "a=1; jwt=tok"), ("cookie", "b=2")]);
        assert_eq!(c.find(&req), Ok(Some("tok".into())));
        let req = parts("/", &[("cookie", "jwt=a; jwt=b")]);
        assert_eq!(c.find(&req), Err(Unreadable::Ambiguous));
    }

    #[test]
    fn stripping_leaves_the_rest() {
        let mut req = parts("/p?a=1&apikey=k&b=2", &[("cookie", "a=1; jwt=tok; b=2")]);
        Source::query("apikey").strip(&mut req);
        assert_eq!(req.uri, "/p?a=1&b=2");
        Source::cookie("jwt").strip(&mut req);
        assert_eq!(req.headers[header::COOKIE], "a=1; b=2");
        let mut req = parts("/p?apikey=k", &[("cookie", "jwt=tok")]);
        Source::query("apikey").strip(&mut req);
        Source::cookie("jwt").strip(&mut req);
        assert_eq!(req.uri, "/p");
        assert!(!req.headers.contains_key(header::COOKIE));
    }
}
