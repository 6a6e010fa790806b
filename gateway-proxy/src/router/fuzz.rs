//! Fuzz target `path` (see `crate::fuzz`): request paths built from the pieces path
//! confusion attacks use (dot segments, encoded dots and separators, doubled slashes,
//! control bytes, escapes of unreserved characters), through `normalize` and the
//! [`Router`].
//!
//! The oracle:
//! - a normalized path is canonical: normalizing it again returns it unchanged; it has no
//!   `.` or `..` segment, no `//`, no encoded `/` or `\`, no control byte, no escape of an
//!   unreserved character and no lower-case hex digit;
//! - a refused path has what the refusal names;
//! - the route chosen is the route of the path the upstream receives (routing that path
//!   again chooses the same route and passes it on unchanged), and it is the route a plain
//!   matcher picks for the normalized path: exact first, then the longest prefix on a
//!   segment boundary.

use std::convert::Infallible;

use bytes::Bytes;
use gateway_core::Body;
use http::{Request, Response, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tower::ServiceExt as _;

use super::path::{PathError, normalize};
use super::{Route, Router};
use crate::fuzz::{self, ensure};

/// Exact routes, then prefixes, as the router is built.
const EXACT: &[&str] = &["/a/b", "/admin/login"];
const PREFIXES: &[&str] = &[
    "/admin",
    "/admin/api",
    "/public",
    "/public/static/v1",
    "/a",
    "/~u",
    "/x%20y",
];

#[test]
fn fuzz_path() {
    let router = router();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let corpus = CORPUS.iter().map(|p| (*p).to_owned());
    fuzz::run("path", corpus, path(), |path| {
        check_normalize(&path)?;
        rt.block_on(check_route(&router, &path))
    });
}

fn check_normalize(path: &str) -> Result<(), TestCaseError> {
    match normalize(path) {
        Ok(normal) => {
            let again = normalize(&normal);
            ensure!(
                matches!(&again, Ok(std::borrow::Cow::Borrowed(p)) if *p == normal),
                "not idempotent: {path:?} -> {normal:?} -> {again:?}"
            );
            ensure!(normal.starts_with('/'), "{normal:?}");
            ensure!(!normal.contains("//"), "{path:?} -> {normal:?}");
            for segment in normal.split('/') {
                ensure!(
                    segment != "." && segment != "..",
                    "a dot segment: {path:?} -> {normal:?}"
                );
            }
            let bytes = normal.as_bytes();
            for (i, &b) in bytes.iter().enumerate() {
                ensure!(
                    !b.is_ascii_control() && b != b'\\',
                    "{path:?} -> {normal:?}"
                );
                if b == b'%' {
                    let hex = bytes.get(i + 1..i + 3).unwrap_or_default();
                    ensure!(
                        hex.len() == 2
                            && hex
                                .iter()
                                .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                        "an escape not in upper-case hex: {path:?} -> {normal:?}"
                    );
                    let value = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16)
                        .unwrap_or(0);
                    ensure!(
                        !value.is_ascii_alphanumeric()
                            && !matches!(value, b'-' | b'.' | b'_' | b'~' | b'/' | b'\\')
                            && !value.is_ascii_control(),
                        "{value:#x} stays escaped: {path:?} -> {normal:?}"
                    );
                }
            }
        }
        Err(err) => {
            let lower = path.to_ascii_lowercase();
            let consistent = match err {
                PathError::NotOriginForm => !path.starts_with('/'),
                PathError::BadEncoding => path.contains('%'),
                PathError::EncodedSeparator => lower.contains("%2f") || lower.contains("%5c"),
                PathError::Forbidden => {
                    path.bytes().any(|b| b.is_ascii_control() || b == b'\\')
                        || lower.contains("%0")
                        || lower.contains("%1")
                        || lower.contains("%7f")
                }
                PathError::AboveRoot => path.contains("..") || lower.contains("%2e"),
            };
            ensure!(consistent, "{path:?} refused as {err:?}");
        }
    }
    Ok(())
}

async fn check_route(router: &Router, path: &str) -> Result<(), TestCaseError> {
    let Some((status, first)) = route(router, path).await else {
        // Not a valid request target: the server refuses it before any router.
        return Ok(());
    };
    let Ok(normal) = normalize(path.split('?').next().unwrap_or_default()) else {
        ensure!(
            status == StatusCode::BAD_REQUEST,
            "a refused path is answered {status}: {path:?}"
        );
        return Ok(());
    };
    let expected = pick(&normal);
    let Some((id, sent)) = first.split_once(' ') else {
        ensure!(
            expected.is_none() && status == StatusCode::NOT_FOUND,
            "{path:?} ({normal:?}) matched nothing: {status}, expected {expected:?}"
        );
        return Ok(());
    };
    ensure!(
        Some(id) == expected,
        "{path:?} ({normal:?}) went to {id}, expected {expected:?}"
    );
    let sent_path = sent.split('?').next().unwrap_or_default();
    ensure!(
        sent_path == normal,
        "{path:?}: the upstream got {sent:?}, normalized {normal:?}"
    );
    let again = route(router, sent).await;
    ensure!(
        again.as_ref().map(|(_, body)| body.as_str()) == Some(first.as_str()),
        "{path:?} went to {first:?}; what the upstream received goes to {again:?}"
    );
    Ok(())
}

/// Routes a GET for `target`: the status and the body, `<route> <target it received>`
/// from a route; `None` if `target` is not a valid request target.
async fn route(router: &Router, target: &str) -> Option<(StatusCode, String)> {
    let req = Request::get(target)
        .header("host", "h")
        .body(Body::empty())
        .ok()?;
    let res = router.clone().oneshot(req).await.ok()?;
    let status = res.status();
    let body = res.into_body().collect_bytes().await.ok()?;
    let body = if status == StatusCode::OK {
        String::from_utf8_lossy(&body).into_owned()
    } else {
        String::new()
    };
    Some((status, body))
}

/// The route a plain matcher picks for a normalized path.
fn pick(normal: &str) -> Option<&'static str> {
    if let Some(exact) = EXACT.iter().find(|e| **e == normal) {
        return Some(exact);
    }
    PREFIXES
        .iter()
        .filter(|prefix| {
            normal == **prefix
                || normal
                    .strip_prefix(**prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|prefix| prefix.len())
        .copied()
}

fn router() -> Router {
    let mut router = Router::new();
    for id in EXACT.iter().copied() {
        router = router.route(Route::exact(id).id(id), tag(id));
    }
    for id in PREFIXES.iter().copied() {
        router = router.route(Route::prefix(id).id(id), tag(id));
    }
    router
}

/// A route's service: answers `<id> <the target it received>`.
fn tag(
    id: &'static str,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<Body>, Infallible>>,
> + Clone {
    tower::service_fn(move |req: Request<Body>| {
        std::future::ready(Ok(Response::new(Body::from(Bytes::from(format!(
            "{id} {}",
            req.uri()
        ))))))
    })
}

/// A path from the pieces of path confusion.
fn path() -> impl Strategy<Value = String> {
    const PIECES: &[&str] = &[
        "", ".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "%2e.", "a", "b", "admin", "public",
        "login", "api", "static", "v1", "A", "%41", "%61", "%2f", "%2F", "%5c", "%5C", "\\", "%00",
        "%0a", "%0D", "%7f", "~u", "%7e", "%7Eu", "%25", "%252e", ";", ";a=b", "%3B", "%3b", "-",
        "_", "%20", "x%20y", "%", "%4", "%zz", "%c3%a9", "%C3%A9", "*",
    ];
    (
        proptest::collection::vec(
            (
                proptest::sample::select(&["/", "/", "/", "//", "///"][..]),
                proptest::collection::vec(proptest::sample::select(PIECES), 1..3),
            ),
            0..7,
        ),
        proptest::bool::weighted(0.2),
        proptest::bool::weighted(0.1),
        proptest::sample::select(&["", "?q", "?a=/../admin", "?%2f"][..]),
    )
        .prop_map(|(segments, trailing, relative, query)| {
            let mut path = String::new();
            for (slashes, pieces) in segments {
                path.push_str(slashes);
                pieces.iter().for_each(|p| path.push_str(p));
            }
            if trailing || path.is_empty() {
                path.push('/');
            }
            if relative {
                path.remove(0);
            }
            path.push_str(query);
            path
        })
}

/// Path confusion vectors.
const CORPUS: &[&str] = &[
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin/login",
    "/public/.%2e/admin",
    "/public/..;/admin",
    "/public;/../admin",
    "/admin%2flogin",
    "/public%5c..%5cadmin",
    "//admin",
    "/./admin",
    "/%61dmin",
    "/%61%64%6d%69%6e/login",
    "/a/b/",
    "/a/b/.",
    "/a/./b",
    "/a/c/../b",
    "/admin%00",
    "/admin%0a",
    "/admin\\login",
    "/%7eu/x",
    "/x%20y/z",
    "/../admin",
    "/a/../..",
    "/admin/..%252f",
];
