//! OTLP export over real sockets: sampled requests arrive at a fake collector as `SERVER`
//! spans whose ids are the ones the upstream got in `traceparent`; unsampled ones do not;
//! a collector that is down or hung costs requests nothing, and what it costs the spans is
//! counted.
//!
//! The collector's protobuf is read by a decoder of the wire format written here from the
//! `.proto` field numbers, independent of the exporter's encoder.
#![expect(clippy::unwrap_used, reason = "tests")]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use gateway_core::metrics::{Format, Metrics};
use gateway_core::test_util::TestUpstream;
use gateway_middleware::otlp::{OtlpExporter, OtlpLayer};
use gateway_middleware::trace_context::TraceContextLayer;
use gateway_proxy::{HttpClient, Route, Router};
use support::{Gateway, proxy_to, raw, status, within};
use tower::ServiceBuilder;

const PARENT: &str = "00f067aa0ba902b7";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A protobuf field's value.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Len(Vec<u8>),
}

/// A message's fields by number, in order.
type Message = BTreeMap<u32, Vec<Value>>;

fn decode(mut buf: &[u8]) -> Message {
    fn varint(buf: &mut &[u8]) -> u64 {
        let (mut value, mut shift) = (0u64, 0);
        loop {
            let byte = buf[0];
            *buf = &buf[1..];
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return value;
            }
            shift += 7;
        }
    }
    let mut fields = Message::new();
    while !buf.is_empty() {
        let key = varint(&mut buf);
        let field = u32::try_from(key >> 3).unwrap();
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut buf)),
            1 => {
                let (v, rest) = buf.split_at(8);
                buf = rest;
                Value::Fixed64(u64::from_le_bytes(v.try_into().unwrap()))
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)).unwrap();
                let (v, rest) = buf.split_at(len);
                buf = rest;
                Value::Len(v.to_vec())
            }
            5 => {
                let (v, rest) = buf.split_at(4);
                buf = rest;
                Value::Fixed32(u32::from_le_bytes(v.try_into().unwrap()))
            }
            wire => panic!("wire type {wire}"),
        };
        fields.entry(field).or_default().push(value);
    }
    fields
}

fn messages(message: &Message, field: u32) -> Vec<Message> {
    message
        .get(&field)
        .into_iter()
        .flatten()
        .map(|v| match v {
            Value::Len(bytes) => decode(bytes),
            other => panic!("field {field} is {other:?}"),
        })
        .collect()
}

fn bytes(message: &Message, field: u32) -> Option<Vec<u8>> {
    match message.get(&field)?.as_slice() {
        [Value::Len(bytes)] => Some(bytes.clone()),
        other => panic!("field {field} is {other:?}"),
    }
}

fn text(message: &Message, field: u32) -> Option<String> {
    bytes(message, field).map(|b| String::from_utf8(b).unwrap())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A decoded span: the `Span` message, its attributes as text, and its resource's.
#[derive(Debug)]
struct Span {
    span: Message,
    attributes: BTreeMap<String, String>,
    resource: BTreeMap<String, String>,
}

impl Span {
    fn id(&self, field: u32) -> Option<String> {
        bytes(&self.span, field).map(|b| hex(&b))
    }

    fn fixed64(&self, field: u32) -> u64 {
        match self.span[&field].as_slice() {
            [Value::Fixed64(v)] => *v,
            other => panic!("{other:?}"),
        }
    }
}

/// `KeyValue`s as `key` to their string or integer value.
fn attributes(list: &[Message]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| {
            let key = text(kv, 1).unwrap();
            let value = &messages(kv, 2)[0];
            let value = match (text(value, 1), value.get(&3).map(Vec::as_slice)) {
                (Some(s), _) => s,
                (None, Some([Value::Varint(i)])) => i.to_string(),
                other => panic!("{key}: {other:?}"),
            };
            (key, value)
        })
        .collect()
}

/// Every span of every export request `collector` received.
fn spans(collector: &TestUpstream) -> Vec<Span> {
    let mut spans = Vec::new();
    for req in collector.requests() {
        assert_eq!(req.method, "POST");
        assert_eq!(req.uri.path(), "/v1/traces");
        assert_eq!(req.header("content-type"), Some("application/x-protobuf"));
        assert_eq!(req.header("x-api-key"), Some("k"));
        let export = decode(&req.body);
        for resource_spans in messages(&export, 1) {
            let resource = attributes(&messages(&messages(&resource_spans, 1)[0], 1));
            for scope_spans in messages(&resource_spans, 2) {
                let scope = &messages(&scope_spans, 1)[0];
                assert_eq!(text(scope, 1).as_deref(), Some("gateway"));
                for span in messages(&scope_spans, 2) {
                    spans.push(Span {
                        attributes: attributes(&messages(&span, 9)),
                        span,
                        resource: resource.clone(),
                    });
                }
            }
        }
    }
    spans
}

fn traceparent(flags: &str) -> String {
    format!("traceparent: 00-{TRACE}-{PARENT}-{flags}\r\n")
}

#[tokio::test]
async fn sampled_requests_arrive_as_spans_with_the_ids_sent_upstream() {
    let collector = TestUpstream::echo().await;
    let upstream = TestUpstream::echo().await;
    let metrics = Metrics::new();
    let exporter = OtlpExporter::builder(format!("{}/v1/traces", collector.url()).parse().unwrap())
        .service_name("edge")
        .header("x-api-key".parse().unwrap(), "k".parse().unwrap())
        .batch_delay(Duration::from_millis(20))
        .metrics(&metrics)
        .start(HttpClient::builder().build().unwrap())
        .unwrap();
    let app = ServiceBuilder::new()
        // New traces are never sampled: only the callers' choices count here.
        .layer(TraceContextLayer::new().sample_ratio(0.0))
        .layer(OtlpLayer::new(&exporter))
        .service(Router::new().route(Route::prefix("/api").id("api"), proxy_to(&upstream)));
    let gw = Gateway::start(app).await;

    let sampled = raw(
        gw.addr,
        &format!(
            "POST /api/items?secret=1 HTTP/1.1\r\nHost: edge.example:8443\r\n\
             User-Agent: curl/8.5\r\n{}tracestate: vendor=abc\r\nContent-Length: 5\r\n\
             Connection: close\r\n\r\nhello",
            traceparent("01")
        ),
    )
    .await;
    assert_eq!(status(&sampled), 200, "{sampled}");
    let unsampled = raw(
        gw.addr,
        &format!(
            "GET /api/quiet HTTP/1.1\r\nHost: gw\r\n{}Connection: close\r\n\r\n",
            traceparent("00")
        ),
    )
    .await;
    assert_eq!(status(&unsampled), 200);
    let untraced = raw(
        gw.addr,
        "GET /api/new HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&untraced), 200);
    let missing = raw(
        gw.addr,
        &format!(
            "GET /nowhere HTTP/1.1\r\nHost: gw\r\n{}Connection: close\r\n\r\n",
            traceparent("01")
        ),
    )
    .await;
    assert_eq!(status(&missing), 404);
    // A long path and a user agent with bytes that are not UTF-8, where the client
    // controls the text.
    let long = "/api/".to_owned() + &"a".repeat(5000);
    let mut hostile = format!(
        "GET {long} HTTP/1.1\r\nHost: gw\r\n{}Connection: close\r\nUser-Agent: evil",
        traceparent("01")
    )
    .into_bytes();
    hostile.extend_from_slice(b"\xff\r\n\r\n");
    let hostile =
        gateway_core::test_util::raw::exchange(gw.addr, &hostile, Duration::from_secs(3)).await;
    assert_eq!(status(&String::from_utf8_lossy(&hostile)), 200);

    within("the spans' export", exporter.flush(Duration::from_secs(5))).await;
    let spans = spans(&collector);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert_eq!(exporter.exported(), 3);
    assert_eq!((exporter.dropped(), exporter.lost()), (0, 0));

    // The POST: ids, name, kind, times, attributes.
    let post = &spans[0];
    let sent_upstream = upstream.requests()[0]
        .header("traceparent")
        .unwrap()
        .to_owned();
    let gateway_span = sent_upstream.split('-').nth(2).unwrap();
    assert_eq!(post.id(1).as_deref(), Some(TRACE));
    assert_eq!(
        post.id(2).as_deref(),
        Some(gateway_span),
        "the exported span is the upstream's parent"
    );
    assert_eq!(
        post.id(4).as_deref(),
        Some(PARENT),
        "the caller's span is its parent"
    );
    assert_eq!(text(&post.span, 3).as_deref(), Some("vendor=abc"));
    assert_eq!(text(&post.span, 5).as_deref(), Some("POST api"));
    assert_eq!(post.span[&6], [Value::Varint(2)], "SPAN_KIND_SERVER");
    assert!(post.fixed64(7) > 1_700_000_000_000_000_000);
    assert!(post.fixed64(7) <= post.fixed64(8));
    assert_eq!(
        post.span[&16],
        [Value::Fixed32(0x301)],
        "sampled, with a remote parent"
    );
    assert!(
        !post.span.contains_key(&15),
        "a 200 leaves the status unset"
    );
    let attrs = &post.attributes;
    assert_eq!(attrs["http.request.method"], "POST");
    assert_eq!(attrs["url.path"], "/api/items");
    assert_eq!(attrs["url.scheme"], "http");
    assert_eq!(attrs["server.address"], "edge.example");
    assert_eq!(attrs["client.address"], "127.0.0.1");
    assert_eq!(attrs["user_agent.original"], "curl/8.5");
    assert_eq!(attrs["network.protocol.version"], "1.1");
    assert_eq!(attrs["http.response.status_code"], "200");
    assert_eq!(attrs["http.response.body.size"], "5");
    assert_eq!(attrs["gateway.route"], "api");
    assert_eq!(
        attrs["gateway.upstream.endpoint"],
        upstream.url().trim_start_matches("http://")
    );
    assert_eq!(attrs["gateway.upstream.attempts"], "1");
    assert!(!attrs.values().any(|v| v.contains("secret")));
    assert_eq!(post.resource["service.name"], "edge");

    // The 404: no route, named by its method; a 4xx leaves a server span's status unset.
    let missing = &spans[1];
    assert_eq!(text(&missing.span, 5).as_deref(), Some("GET"));
    assert_eq!(missing.attributes["http.response.status_code"], "404");
    assert_eq!(missing.attributes["error.type"], "not_found");
    assert!(!missing.attributes.contains_key("gateway.route"));

    // The hostile one: cut, and valid UTF-8.
    let hostile = &spans[2];
    assert_eq!(hostile.attributes["url.path"].len(), 1024);
    assert_eq!(hostile.attributes["user_agent.original"], "evil\u{fffd}");

    let scraped = metrics.encode(Format::Prometheus);
    assert!(
        scraped.contains("gateway_otlp_exported_spans_total 3"),
        "{scraped}"
    );
}

#[tokio::test]
async fn a_failing_collector_costs_requests_nothing_and_its_spans_are_counted() {
    let upstream = TestUpstream::echo().await;
    let refused = gateway_core::test_util::refused_addr().await;
    let down = OtlpExporter::builder(format!("http://{refused}/v1/traces").parse().unwrap())
        .batch_delay(Duration::from_millis(10))
        .start(HttpClient::builder().build().unwrap())
        .unwrap();
    let app = ServiceBuilder::new()
        .layer(TraceContextLayer::new())
        .layer(OtlpLayer::new(&down))
        .service(proxy_to(&upstream));
    let gw = Gateway::start(app).await;
    for _ in 0..5 {
        let res = raw(
            gw.addr,
            "GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status(&res), 200);
    }
    within(
        "three tries of a refused export",
        down.flush(Duration::from_secs(10)),
    )
    .await;
    assert_eq!((down.exported(), down.lost()), (0, 5));

    // A collector that never answers, and a queue of two: the first span is being sent,
    // two wait, and the rest are dropped while requests go on.
    let hung = TestUpstream::hang().await;
    let stuck = OtlpExporter::builder(format!("{}/v1/traces", hung.url()).parse().unwrap())
        .batch_size(1)
        .capacity(2)
        .timeout(Duration::from_secs(30))
        .start(HttpClient::builder().build().unwrap())
        .unwrap();
    let app = ServiceBuilder::new()
        .layer(TraceContextLayer::new())
        .layer(OtlpLayer::new(&stuck))
        .service(proxy_to(&upstream));
    let gw = Gateway::start(app).await;
    for _ in 0..10 {
        let res = within(
            "a request while the collector hangs",
            Box::pin(raw(
                gw.addr,
                "GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
            )),
        )
        .await;
        assert_eq!(status(&res), 200);
    }
    support::eventually("the collector to get the first batch", || {
        hung.requests().len() == 1
    })
    .await;
    assert!(
        (7..=8).contains(&stuck.dropped()),
        "dropped {}",
        stuck.dropped()
    );
}
