//! Fuzz target `headers` (see `crate::fuzz`): header maps with hop-by-hop fields and
//! `Connection` values in every spelling (any case, optional whitespace, empty elements),
//! through `strip_request` and `strip_response`.
//!
//! The oracle (RFC 9110 §7.6.1): no hop-by-hop field survives, nor any field a `Connection`
//! value names; `Content-Length` and `Expect` go from requests, `Content-Length` from
//! responses unless kept; every other field survives, with its values in their order.

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::{strip_request, strip_response};
use crate::fuzz::{self, ensure};

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
];

const NAMES: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "http2-settings",
    "content-length",
    "expect",
    "trailer",
    "close",
    "x-a",
    "x-b",
    "cookie",
    "accept",
    "x-forwarded-for",
    "authorization",
];

#[derive(Debug, Clone)]
struct Case {
    fields: Vec<(&'static str, String)>,
    request: bool,
    keep_length: bool,
}

#[test]
fn fuzz_headers() {
    let corpus = [
        vec![
            ("connection", "close, x-a".to_owned()),
            ("x-a", "1".to_owned()),
        ],
        vec![
            ("connection", "X-A ,\t,keep-alive".to_owned()),
            ("x-a", "1".to_owned()),
        ],
        vec![
            ("connection", "close".to_owned()),
            ("close", "1".to_owned()),
        ],
        vec![
            ("connection", "x-b".to_owned()),
            ("connection", "cookie".to_owned()),
            ("cookie", "a=1".to_owned()),
            ("x-b", "2".to_owned()),
        ],
    ]
    .into_iter()
    .map(|fields| Case {
        fields,
        request: true,
        keep_length: false,
    });
    fuzz::run("headers", corpus, case(), check);
}

fn check(case: Case) -> Result<(), TestCaseError> {
    let mut map = HeaderMap::new();
    for (name, value) in &case.fields {
        let value = HeaderValue::from_str(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
        map.append(HeaderName::from_static(name), value);
    }
    let before = map.clone();
    if case.request {
        strip_request(&mut map);
    } else {
        strip_response(&mut map, case.keep_length);
    }
    let nominated: Vec<String> = before
        .get_all("connection")
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| {
            String::from_utf8_lossy(t)
                .trim_matches([' ', '\t'])
                .to_ascii_lowercase()
        })
        .filter(|t| !t.is_empty())
        .collect();
    let goes = |name: &str| {
        HOP_BY_HOP.contains(&name)
            || nominated.iter().any(|n| n == name)
            || (name == "content-length" && (case.request || !case.keep_length))
            || (name == "expect" && case.request)
    };
    // The order of fields of different names means nothing (RFC 9110 §5.3); that of one
    // name's values does, and `iter` gives those in order.
    let mut want: Vec<_> = before
        .iter()
        .filter(|(name, _)| !goes(name.as_str()))
        .collect();
    let mut got: Vec<_> = map.iter().collect();
    want.sort_by_key(|(name, _)| name.as_str());
    got.sort_by_key(|(name, _)| name.as_str());
    ensure!(
        got == want,
        "stripped {before:?}\ninto     {map:?}\nexpected {want:?}"
    );
    Ok(())
}

fn token() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(NAMES),
        any::<bool>(),
        proptest::sample::select(&["", " ", "\t", "  "][..]),
        proptest::sample::select(&["", " ", "\t"][..]),
    )
        .prop_map(|(name, upper, before, after)| {
            let name = if upper {
                name.to_ascii_uppercase()
            } else {
                name.to_owned()
            };
            format!("{before}{name}{after}")
        })
}

fn field() -> impl Strategy<Value = (&'static str, String)> {
    prop_oneof![
        (proptest::sample::select(NAMES), "[a-z0-9=;, ]{0,8}").prop_map(|(n, v)| (n, v)),
        proptest::collection::vec(
            prop_oneof![token(), Just(String::new()), Just(" ".to_owned())],
            1..5
        )
        .prop_map(|tokens| ("connection", tokens.join(","))),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec(field(), 0..10),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(fields, request, keep_length)| Case {
            fields,
            request,
            keep_length,
        })
}
