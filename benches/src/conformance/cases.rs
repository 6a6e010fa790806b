//! The cases, by RFC 9111 section. Each names the clause it checks.

use std::time::Duration;

use super::Expect::{
    AgeAtLeast, Conditional, Field, NoField, NotVersion, OriginCalls, Status, Version,
};
use super::{Answer, Case, Expect, Level, Step};

/// A fixed `Last-Modified` (validators must not move between answers).
const MODIFIED: &str = "Mon, 01 Jan 2024 00:00:00 GMT";
/// Long enough for `max-age=1` to have passed, whole seconds being what `Age` counts.
const STALE: Duration = Duration::from_millis(2100);

fn answer(status: u16, fields: &[(&'static str, &'static str)]) -> Answer {
    Answer {
        status,
        fields: fields.to_vec(),
    }
}

fn ok(fields: &[(&'static str, &'static str)]) -> Answer {
    answer(200, fields)
}

fn step(method: &'static str, fields: &[(&'static str, &'static str)], expect: &[Expect]) -> Step {
    Step {
        method,
        suffix: "",
        fields: fields.to_vec(),
        pause: Duration::ZERO,
        expect: expect.to_vec(),
    }
}

fn get(expect: &[Expect]) -> Step {
    step("GET", &[], expect)
}

fn get_with(fields: &[(&'static str, &'static str)], expect: &[Expect]) -> Step {
    step("GET", fields, expect)
}

impl Step {
    fn after(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    fn at(mut self, suffix: &'static str) -> Self {
        self.suffix = suffix;
        self
    }
}

fn case(
    id: &'static str,
    level: Level,
    title: &'static str,
    answers: Vec<Answer>,
    steps: Vec<Step>,
) -> Case {
    Case {
        id,
        level,
        title,
        answers,
        steps,
    }
}

/// A response reused: stored by step 1, served by step 2 without the origin.
fn reused(id: &'static str, level: Level, title: &'static str, first: Answer) -> Case {
    case(
        id,
        level,
        title,
        vec![first],
        vec![get(&[Version(1)]), get(&[Version(1), OriginCalls(1)])],
    )
}

/// A response not reused: step 2 reaches the origin.
fn not_reused(id: &'static str, level: Level, title: &'static str, first: Answer) -> Case {
    case(
        id,
        level,
        title,
        vec![first],
        vec![get(&[Version(1)]), get(&[Version(2), OriginCalls(2)])],
    )
}

/// A stored response invalidated by a `method` request's success (§4.4).
fn invalidated_by(method: &'static str) -> Case {
    let id = match method {
        "POST" => "invalidate-post",
        "PUT" => "invalidate-put",
        _ => "invalidate-delete",
    };
    case(
        id,
        Level::Must,
        "an unsafe method's success invalidates the stored response (§4.4)",
        vec![
            ok(&[("cache-control", "max-age=3600")]),
            ok(&[]),
            ok(&[("cache-control", "max-age=3600")]),
        ],
        vec![
            get(&[Version(1)]),
            step(method, &[], &[Version(2)]),
            get(&[Version(3)]),
        ],
    )
}

/// Every case of the suite.
#[expect(
    clippy::too_many_lines,
    reason = "one list of cases reads best as one list"
)]
pub fn cases() -> Vec<Case> {
    use Level::{May, Must, Should};
    vec![
        // RFC 9111 §4.2: freshness.
        reused(
            "freshness-max-age",
            Should,
            "a response fresh by max-age is reused",
            ok(&[("cache-control", "max-age=3600")]),
        ),
        not_reused(
            "freshness-max-age-0",
            Must,
            "max-age=0 is stale at once: not reused without the origin (§4.2)",
            ok(&[("cache-control", "max-age=0")]),
        ),
        reused(
            "freshness-s-maxage",
            Should,
            "a response fresh by s-maxage is reused by a shared cache (§5.2.2.10)",
            ok(&[("cache-control", "s-maxage=3600")]),
        ),
        not_reused(
            "freshness-s-maxage-over-max-age",
            Must,
            "s-maxage=0 overrides max-age=3600 in a shared cache (§5.2.2.10)",
            ok(&[("cache-control", "max-age=3600, s-maxage=0")]),
        ),
        reused(
            "freshness-expires-future",
            Should,
            "a response fresh by Expires is reused (§5.3)",
            ok(&[("expires", "{date+3600}")]),
        ),
        not_reused(
            "freshness-expires-past",
            Must,
            "an Expires in the past is stale (§5.3)",
            ok(&[("expires", "{date-3600}")]),
        ),
        not_reused(
            "freshness-expires-invalid",
            Must,
            "an invalid Expires (\"0\") is in the past (§5.3)",
            ok(&[("expires", "0")]),
        ),
        reused(
            "freshness-max-age-over-expires",
            Should,
            "max-age wins over an Expires in the past (§5.3)",
            ok(&[
                ("cache-control", "max-age=3600"),
                ("expires", "{date-3600}"),
            ]),
        ),
        not_reused(
            "freshness-age-over-max-age",
            Must,
            "an Age beyond max-age makes it stale on arrival (§4.2.3)",
            ok(&[("cache-control", "max-age=3600"), ("age", "7200")]),
        ),
        reused(
            "freshness-max-age-overflow",
            Must,
            "a max-age beyond 2^31 is taken as 2^31 (§1.2.2)",
            ok(&[("cache-control", "max-age=99999999999999999999")]),
        ),
        not_reused(
            "freshness-max-age-negative",
            Should,
            "an invalid max-age (-1) is taken as stale (§4.2.1)",
            ok(&[("cache-control", "max-age=-1")]),
        ),
        not_reused(
            "freshness-max-age-duplicate",
            Should,
            "conflicting max-age values are taken as stale (§4.2.1)",
            ok(&[("cache-control", "max-age=3600, max-age=0")]),
        ),
        reused(
            "freshness-expires-rfc850",
            Must,
            "an Expires in RFC 850 form is understood (RFC 9110 §5.6.7)",
            ok(&[("expires", "{rfc850+3600}")]),
        ),
        reused(
            "freshness-expires-asctime",
            Must,
            "an Expires in asctime form is understood (RFC 9110 §5.6.7)",
            ok(&[("expires", "{asctime+3600}")]),
        ),
        not_reused(
            "freshness-expires-from-date",
            Must,
            "Expires counts from Date: an hour-old Date with Expires half an hour ago is stale (§4.2.1)",
            ok(&[("date", "{date-3600}"), ("expires", "{date-1800}")]),
        ),
        reused(
            "freshness-heuristic",
            May,
            "a 200 with only a Last-Modified long ago may be given heuristic freshness (§4.2.2)",
            ok(&[("last-modified", MODIFIED)]),
        ),
        reused(
            "freshness-directive-case",
            Should,
            "directive names are case-insensitive (§5.2)",
            ok(&[("cache-control", "MAX-AGE=3600")]),
        ),
        reused(
            "freshness-unknown-directive",
            Must,
            "an unknown directive is ignored (§5.2.3)",
            ok(&[("cache-control", "max-age=3600, x-unknown=\"a, b\"")]),
        ),
        case(
            "freshness-stale-not-served",
            Must,
            "a response that went stale is not served without the origin (§4.2.4)",
            vec![ok(&[("cache-control", "max-age=1")])],
            vec![get(&[Version(1)]), get(&[Version(2)]).after(STALE)],
        ),
        // RFC 9111 §3: storing.
        not_reused(
            "store-no-store",
            Must,
            "no-store is not stored (§5.2.2.5)",
            ok(&[("cache-control", "max-age=3600, no-store")]),
        ),
        not_reused(
            "store-private",
            Must,
            "private is not stored by a shared cache (§5.2.2.7)",
            ok(&[("cache-control", "max-age=3600, private")]),
        ),
        case(
            "store-no-cache",
            Must,
            "no-cache is not reused without the origin (§5.2.2.4)",
            vec![ok(&[
                ("cache-control", "max-age=3600, no-cache"),
                ("etag", "\"a\""),
            ])],
            vec![get(&[Version(1)]), get(&[OriginCalls(2)])],
        ),
        case(
            "store-request-no-store",
            Must,
            "a request's no-store keeps its response out of the cache (§5.2.1.5)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get_with(&[("cache-control", "no-store")], &[Version(1)]),
                get(&[Version(2)]),
            ],
        ),
        case(
            "store-authorization",
            Must,
            "a response to a request with Authorization is not reused (§3.5)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get_with(&[("authorization", "Basic dTpw")], &[Version(1)]),
                get(&[Version(2)]),
            ],
        ),
        case(
            "store-authorization-s-maxage",
            May,
            "with Authorization, s-maxage allows reuse (§3.5)",
            vec![ok(&[("cache-control", "s-maxage=3600")])],
            vec![
                get_with(&[("authorization", "Basic dTpw")], &[Version(1)]),
                get_with(&[("authorization", "Basic dTpw")], &[Version(1)]),
            ],
        ),
        case(
            "store-authorization-public",
            May,
            "with Authorization, public allows reuse (§3.5)",
            vec![ok(&[("cache-control", "public, max-age=3600")])],
            vec![
                get_with(&[("authorization", "Basic dTpw")], &[Version(1)]),
                get_with(&[("authorization", "Basic dTpw")], &[Version(1)]),
            ],
        ),
        case(
            "store-404",
            Should,
            "a 404 with max-age is reused (§3)",
            vec![answer(404, &[("cache-control", "max-age=3600")])],
            vec![
                get(&[Status(404), Version(1)]),
                get(&[Status(404), Version(1)]),
            ],
        ),
        case(
            "store-301",
            Should,
            "a 301 with max-age is reused (§3)",
            vec![answer(
                301,
                &[
                    ("cache-control", "max-age=3600"),
                    ("location", "/elsewhere"),
                ],
            )],
            vec![
                get(&[Status(301), Version(1)]),
                get(&[Status(301), Version(1)]),
            ],
        ),
        case(
            "store-500",
            May,
            "a 500 with max-age may be reused (§3)",
            vec![answer(500, &[("cache-control", "max-age=3600")])],
            vec![
                get(&[Status(500), Version(1)]),
                get(&[Status(500), Version(1)]),
            ],
        ),
        case(
            "store-hop-by-hop",
            Must,
            "fields named by Connection are not stored (§3.1)",
            vec![ok(&[
                ("cache-control", "max-age=3600"),
                ("connection", "x-hop"),
                ("x-hop", "1"),
            ])],
            vec![get(&[Version(1)]), get(&[Version(1), NoField("x-hop")])],
        ),
        // RFC 9111 §2: the cache key.
        case(
            "key-query",
            Must,
            "the query is part of the key (§2)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get(&[Version(1)]).at("?a=1"),
                get(&[Version(2)]).at("?a=2"),
                get(&[Version(1)]).at("?a=1"),
            ],
        ),
        case(
            "key-host",
            Must,
            "the host is part of the key (§2)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get_with(&[("host", "a.conformance.test")], &[Version(1)]),
                get_with(&[("host", "b.conformance.test")], &[Version(2)]),
            ],
        ),
        // RFC 9111 §5.2.1: request directives.
        case(
            "request-no-cache",
            Must,
            "a request's no-cache goes to the origin (§5.2.1.4)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get(&[Version(1)]),
                get_with(&[("cache-control", "no-cache")], &[OriginCalls(2)]),
            ],
        ),
        case(
            "request-no-cache-validates",
            Should,
            "a request's no-cache is sent to the origin as a conditional request (§5.2.1.4)",
            vec![
                ok(&[("cache-control", "max-age=3600"), ("etag", "\"a\"")]),
                answer(304, &[("cache-control", "max-age=3600"), ("etag", "\"a\"")]),
            ],
            vec![
                get(&[Version(1)]),
                get_with(
                    &[("cache-control", "no-cache")],
                    &[Status(200), Version(1), Conditional(2)],
                ),
            ],
        ),
        case(
            "request-max-age-0",
            Must,
            "a request's max-age=0 goes to the origin (§5.2.1.1)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get(&[Version(1)]),
                get_with(&[("cache-control", "max-age=0")], &[OriginCalls(2)]),
            ],
        ),
        case(
            "request-min-fresh",
            Should,
            "a request's min-fresh beyond the freshness left goes to the origin (§5.2.1.3)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get(&[Version(1)]),
                get_with(&[("cache-control", "min-fresh=7200")], &[OriginCalls(2)]),
            ],
        ),
        case(
            "request-max-stale",
            Should,
            "a request's max-stale accepts a stale response (§5.2.1.2)",
            vec![ok(&[("cache-control", "max-age=1")])],
            vec![
                get(&[Version(1)]),
                get_with(&[("cache-control", "max-stale=60")], &[Version(1)]).after(STALE),
            ],
        ),
        case(
            "request-only-if-cached-miss",
            Must,
            "only-if-cached with nothing stored is a 504, without the origin (§5.2.1.7)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![get_with(
                &[("cache-control", "only-if-cached")],
                &[Status(504), OriginCalls(0)],
            )],
        ),
        case(
            "request-only-if-cached-hit",
            Should,
            "only-if-cached is answered from the cache (§5.2.1.7)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get(&[Version(1)]),
                get_with(&[("cache-control", "only-if-cached")], &[Version(1)]),
            ],
        ),
        // RFC 9111 §4.1: Vary.
        case(
            "vary-match",
            Should,
            "a request with the same selecting field is served the stored response (§4.1)",
            vec![ok(&[("cache-control", "max-age=3600"), ("vary", "accept")])],
            vec![
                get_with(&[("accept", "text/a")], &[Version(1)]),
                get_with(&[("accept", "text/a")], &[Version(1)]),
            ],
        ),
        case(
            "vary-mismatch",
            Must,
            "a request with another selecting field is not (§4.1)",
            vec![ok(&[("cache-control", "max-age=3600"), ("vary", "accept")])],
            vec![
                get_with(&[("accept", "text/a")], &[Version(1)]),
                get_with(&[("accept", "text/b")], &[Version(2)]),
            ],
        ),
        case(
            "vary-absent",
            Must,
            "a request that adds the selecting field is not (§4.1)",
            vec![ok(&[("cache-control", "max-age=3600"), ("vary", "accept")])],
            vec![
                get(&[Version(1)]),
                get_with(&[("accept", "text/b")], &[Version(2)]),
            ],
        ),
        case(
            "vary-two-fields",
            Must,
            "every field Vary names must match (§4.1)",
            vec![ok(&[
                ("cache-control", "max-age=3600"),
                ("vary", "accept, accept-language"),
            ])],
            vec![
                get_with(
                    &[("accept", "text/a"), ("accept-language", "en")],
                    &[Version(1)],
                ),
                get_with(
                    &[("accept", "text/a"), ("accept-language", "fr")],
                    &[Version(2)],
                ),
            ],
        ),
        not_reused(
            "vary-star",
            Must,
            "Vary: * never matches (§4.1)",
            ok(&[("cache-control", "max-age=3600"), ("vary", "*")]),
        ),
        case(
            "vary-order",
            Should,
            "the order of the fields Vary names does not matter (§4.1)",
            vec![ok(&[
                ("cache-control", "max-age=3600"),
                ("vary", "accept-language, accept"),
            ])],
            vec![
                get_with(
                    &[("accept", "text/a"), ("accept-language", "en")],
                    &[Version(1)],
                ),
                get_with(
                    &[("accept-language", "en"), ("accept", "text/a")],
                    &[Version(1)],
                ),
            ],
        ),
        case(
            "vary-name-case",
            Should,
            "field names in Vary are case-insensitive (§4.1)",
            vec![ok(&[("cache-control", "max-age=3600"), ("vary", "ACCEPT")])],
            vec![
                get_with(&[("accept", "text/a")], &[Version(1)]),
                get_with(&[("accept", "text/a")], &[Version(1)]),
            ],
        ),
        case(
            "vary-normalised",
            May,
            "selecting fields may be normalised: whitespace after commas (§4.1)",
            vec![ok(&[
                ("cache-control", "max-age=3600"),
                ("vary", "accept-encoding"),
            ])],
            vec![
                get_with(&[("accept-encoding", "gzip, br")], &[Version(1)]),
                get_with(&[("accept-encoding", "gzip,br")], &[Version(1)]),
            ],
        ),
        case(
            "vary-variants",
            Should,
            "two variants are kept side by side (§4.1)",
            vec![ok(&[("cache-control", "max-age=3600"), ("vary", "accept")])],
            vec![
                get_with(&[("accept", "text/a")], &[Version(1)]),
                get_with(&[("accept", "text/b")], &[Version(2)]),
                get_with(&[("accept", "text/a")], &[Version(1)]),
                get_with(&[("accept", "text/b")], &[Version(2), OriginCalls(2)]),
            ],
        ),
        // RFC 9111 §4.3: validation.
        case(
            "validate-etag",
            Should,
            "a stale response with an ETag is validated with If-None-Match (§4.3.1)",
            vec![
                ok(&[("cache-control", "max-age=1"), ("etag", "\"a\"")]),
                answer(304, &[("cache-control", "max-age=3600"), ("etag", "\"a\"")]),
            ],
            vec![
                get(&[Version(1)]),
                get(&[Status(200), Version(1), Conditional(2)]).after(STALE),
            ],
        ),
        case(
            "validate-weak-etag",
            Should,
            "a weak ETag is validated with If-None-Match too (§4.3.1)",
            vec![
                ok(&[("cache-control", "max-age=1"), ("etag", "W/\"a\"")]),
                answer(
                    304,
                    &[("cache-control", "max-age=3600"), ("etag", "W/\"a\"")],
                ),
            ],
            vec![
                get(&[Version(1)]),
                get(&[Status(200), Version(1), Conditional(2)]).after(STALE),
            ],
        ),
        case(
            "validate-last-modified",
            Should,
            "a stale response with Last-Modified is validated with If-Modified-Since (§4.3.1)",
            vec![
                ok(&[("cache-control", "max-age=1"), ("last-modified", MODIFIED)]),
                answer(304, &[("cache-control", "max-age=3600")]),
            ],
            vec![
                get(&[Version(1)]),
                get(&[Status(200), Version(1), Conditional(2)]).after(STALE),
            ],
        ),
        case(
            "validate-304-updates",
            Must,
            "a 304's fields replace the stored ones, and its freshness is used (§4.3.4)",
            vec![
                ok(&[
                    ("cache-control", "max-age=1"),
                    ("etag", "\"a\""),
                    ("x-version", "one"),
                ]),
                answer(
                    304,
                    &[
                        ("cache-control", "max-age=3600"),
                        ("etag", "\"a\""),
                        ("x-version", "two"),
                    ],
                ),
            ],
            vec![
                get(&[Version(1), Field("x-version", "one")]),
                get(&[Version(1), Field("x-version", "two")]).after(STALE),
                get(&[Version(1), Field("x-version", "two"), OriginCalls(2)]),
            ],
        ),
        case(
            "validate-client-etag",
            Should,
            "a client's matching If-None-Match is answered 304 from the cache (§4.3.2)",
            vec![ok(&[("cache-control", "max-age=3600"), ("etag", "\"a\"")])],
            vec![
                get(&[Version(1)]),
                get_with(
                    &[("if-none-match", "\"a\"")],
                    &[Status(304), OriginCalls(1)],
                ),
            ],
        ),
        case(
            "validate-client-date",
            Should,
            "a client's If-Modified-Since is answered 304 from the cache (§4.3.2)",
            vec![ok(&[
                ("cache-control", "max-age=3600"),
                ("last-modified", MODIFIED),
            ])],
            vec![
                get(&[Version(1)]),
                get_with(
                    &[("if-modified-since", MODIFIED)],
                    &[Status(304), OriginCalls(1)],
                ),
            ],
        ),
        // RFC 9111 §5.1: Age.
        case(
            "age-on-hit",
            Must,
            "a response served from the cache has Age (§4)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![get(&[Version(1)]), get(&[Version(1), AgeAtLeast(0)])],
        ),
        case(
            "age-from-upstream",
            Must,
            "Age counts the age the response arrived with (§4.2.3)",
            vec![ok(&[("cache-control", "max-age=3600"), ("age", "30")])],
            vec![get(&[Version(1)]), get(&[Version(1), AgeAtLeast(30)])],
        ),
        case(
            "age-grows",
            Must,
            "Age counts the time the response was held (§4.2.3)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get(&[Version(1)]),
                get(&[Version(1), AgeAtLeast(1)]).after(Duration::from_millis(1100)),
            ],
        ),
        // RFC 5861 and RFC 9111 §4.2.4: stale responses.
        case(
            "stale-while-revalidate",
            Should,
            "within stale-while-revalidate, the stale response is served and refreshed (RFC 5861 §3)",
            vec![ok(&[(
                "cache-control",
                "max-age=1, stale-while-revalidate=60",
            )])],
            vec![
                get(&[Version(1)]),
                get(&[Version(1)]).after(STALE),
                get(&[Version(2)]).after(Duration::from_secs(1)),
            ],
        ),
        case(
            "stale-if-error",
            Should,
            "within stale-if-error, a 500 from the origin is replaced by the stale response (RFC 5861 §4)",
            vec![
                ok(&[("cache-control", "max-age=1, stale-if-error=60")]),
                answer(500, &[]),
            ],
            vec![
                get(&[Version(1)]),
                get(&[Status(200), Version(1), OriginCalls(2)]).after(STALE),
            ],
        ),
        case(
            "stale-must-revalidate",
            Must,
            "must-revalidate forbids serving it stale, even on an error (§5.2.2.2)",
            vec![
                ok(&[(
                    "cache-control",
                    "max-age=1, must-revalidate, stale-if-error=60",
                )]),
                answer(500, &[]),
            ],
            vec![get(&[Version(1)]), get(&[NotVersion(1)]).after(STALE)],
        ),
        // RFC 9111 §4.4: invalidation.
        invalidated_by("POST"),
        invalidated_by("PUT"),
        invalidated_by("DELETE"),
        case(
            "invalidate-location",
            May,
            "a POST's success invalidates the URI in its Location (§4.4)",
            vec![
                ok(&[("cache-control", "max-age=3600")]),
                answer(201, &[("location", "./target")]),
                ok(&[("cache-control", "max-age=3600")]),
            ],
            vec![
                get(&[Version(1)]).at("/target"),
                step("POST", &[], &[Status(201)]).at("/new"),
                get(&[Version(3)]).at("/target"),
            ],
        ),
        // RFC 9110 §9.3.2 and §14: HEAD and ranges from a stored GET.
        case(
            "head-from-get",
            Should,
            "a HEAD is answered from a stored GET (RFC 9110 §9.3.2)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get(&[Version(1)]),
                step("HEAD", &[], &[Status(200), OriginCalls(1)]),
            ],
        ),
        case(
            "range-from-stored",
            May,
            "a range of a stored response is answered 206 from the cache (RFC 9110 §14)",
            vec![ok(&[("cache-control", "max-age=3600")])],
            vec![
                get(&[Version(1)]),
                get_with(&[("range", "bytes=0-3")], &[Status(206), OriginCalls(1)]),
            ],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_are_unique_path_segments() {
        let cases = cases();
        let ids: HashSet<_> = cases.iter().map(|c| c.id).collect();
        assert_eq!(ids.len(), cases.len());
        assert!(ids.iter().all(|id| {
            id.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'-' || b.is_ascii_digit())
        }));
    }
}
