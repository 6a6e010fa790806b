use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway_core::metrics::{Format, Metrics};
use gateway_core::time::Deadline;
use gateway_core::{Body, BoxError, Error, ErrorKind, TriedEndpoints};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use super::replay::Replay;
use super::*;

/// What the fake upstream answers, one per call (the last one again when they run out).
#[derive(Clone)]
enum Answer {
    Status(StatusCode),
    RetryAfter(StatusCode, &'static str),
    Fail(ErrorKind),
    Reset,
    Hang,
}

/// A fake upstream: answers in order, and records each call's body (read to its end).
#[derive(Clone)]
struct Upstream {
    answers: Arc<Mutex<VecDeque<Answer>>>,
    bodies: Arc<Mutex<Vec<Result<Bytes, String>>>>,
    /// Whether to read the body before answering.
    reads: bool,
}

impl Upstream {
    fn new(answers: impl IntoIterator<Item = Answer>) -> Self {
        Self {
            answers: Arc::new(Mutex::new(answers.into_iter().collect())),
            bodies: Arc::default(),
            reads: true,
        }
    }

    fn not_reading(mut self) -> Self {
        self.reads = false;
        self
    }

    fn calls(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    fn bodies(&self) -> Vec<Result<Bytes, String>> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Body>, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let answer = {
                let mut answers = this.answers.lock().unwrap();
                if answers.len() > 1 {
                    answers.pop_front().unwrap()
                } else {
                    answers.front().cloned().unwrap()
                }
            };
            let body = if this.reads {
                req.into_body()
                    .collect_bytes()
                    .await
                    .map_err(|e| e.to_string())
            } else {
                Ok(Bytes::new())
            };
            this.bodies.lock().unwrap().push(body);
            match answer {
                Answer::Status(status) => Ok(response(status, None)),
                Answer::RetryAfter(status, after) => Ok(response(status, Some(after))),
                Answer::Fail(kind) => Err(Error::new(kind).into()),
                Answer::Reset => Err(Error::with_source(
                    ErrorKind::BadGateway,
                    io::Error::from(io::ErrorKind::ConnectionReset),
                )
                .into()),
                Answer::Hang => std::future::pending().await,
            }
        })
    }
}

fn response(status: StatusCode, retry_after: Option<&'static str>) -> Response<Body> {
    let mut res = Response::builder().status(status);
    if let Some(after) = retry_after {
        res = res.header("retry-after", after);
    }
    res.body(Body::empty()).unwrap()
}

fn get() -> Request<Body> {
    Request::get("/").body(Body::empty()).unwrap()
}

fn with_body(method: Method, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri("/")
        .body(body)
        .unwrap()
}

/// A body that streams `chunks` (then `trailers`), not in memory.
fn streaming(chunks: &[&'static str], trailers: Option<HeaderMap>) -> Body {
    let mut frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = chunks
        .iter()
        .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    if let Some(t) = trailers {
        frames.push(Ok(http_body::Frame::trailers(t)));
    }
    let body = http_body_util::StreamBody::new(futures_util_stream(frames));
    let body = Body::new(body);
    assert!(!body.is_complete());
    body
}

/// A stream of ready frames (without pulling in `futures`).
fn futures_util_stream(
    frames: Vec<Result<http_body::Frame<Bytes>, BoxError>>,
) -> impl futures_core::Stream<Item = Result<http_body::Frame<Bytes>, BoxError>> + Send {
    struct Frames(VecDeque<Result<http_body::Frame<Bytes>, BoxError>>);
    impl futures_core::Stream for Frames {
        type Item = Result<http_body::Frame<Bytes>, BoxError>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.pop_front())
        }
    }
    Frames(frames.into())
}

/// A policy with no backoff and a budget that never runs out, unless a test says.
fn policy() -> RetryPolicy {
    RetryPolicy::idempotent()
        .backoff(Duration::ZERO, Duration::ZERO)
        .budget(Budget::new(1000.0).unwrap())
}

async fn status(
    service: impl Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
    req: Request<Body>,
) -> Result<StatusCode, ErrorKind> {
    service
        .oneshot(req)
        .await
        .map(|res| res.status())
        .map_err(|e| Error::kind_of(&*e))
}

#[tokio::test(start_paused = true)]
async fn a_503_is_tried_again_until_it_succeeds() {
    let up = Upstream::new([
        Answer::Status(StatusCode::SERVICE_UNAVAILABLE),
        Answer::Status(StatusCode::BAD_GATEWAY),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy().tries(3)).layer(up.clone());
    assert_eq!(status(service, get()).await, Ok(StatusCode::OK));
    assert_eq!(up.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn tries_are_capped_and_the_last_answer_goes_back() {
    let metrics = Metrics::new();
    let up = Upstream::new([Answer::Status(StatusCode::SERVICE_UNAVAILABLE)]);
    let service = RetryLayer::new(policy().tries(4))
        .metrics(&metrics, "api")
        .layer(up.clone());
    assert_eq!(
        status(service, get()).await,
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(up.calls(), 4);
    let text = metrics.encode(Format::Prometheus);
    assert!(
        text.contains(r#"gateway_retry_attempts_total{route="api",reason="status"} 3"#),
        "{text}"
    );
    assert!(
        text.contains(r#"gateway_retry_skipped_total{route="api",reason="tries"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn other_statuses_and_client_errors_are_not_retried() {
    for answer in [
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::NOT_FOUND,
        StatusCode::TOO_MANY_REQUESTS,
    ] {
        let up = Upstream::new([Answer::Status(answer)]);
        let service = RetryLayer::new(policy()).layer(up.clone());
        assert_eq!(status(service, get()).await, Ok(answer));
        assert_eq!(up.calls(), 1, "{answer}");
    }
    // Unless listed.
    let up = Upstream::new([
        Answer::Status(StatusCode::TOO_MANY_REQUESTS),
        Answer::Status(StatusCode::OK),
    ]);
    let service =
        RetryLayer::new(policy().statuses([StatusCode::TOO_MANY_REQUESTS])).layer(up.clone());
    assert_eq!(status(service, get()).await, Ok(StatusCode::OK));
    // A protocol error from the upstream (not a reset) may have had effects.
    let up = Upstream::new([Answer::Fail(ErrorKind::BadGateway)]);
    let service = RetryLayer::new(policy()).layer(up.clone());
    assert_eq!(status(service, get()).await, Err(ErrorKind::BadGateway));
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_post_is_tried_again_only_when_nothing_was_sent() {
    // Sent and answered 503, or reset: never again.
    for answer in [
        Answer::Status(StatusCode::SERVICE_UNAVAILABLE),
        Answer::Reset,
    ] {
        let up = Upstream::new([answer, Answer::Status(StatusCode::OK)]);
        let service = RetryLayer::new(policy()).layer(up.clone());
        let req = with_body(Method::POST, Body::from("order"));
        assert_ne!(status(service, req).await, Ok(StatusCode::OK));
        assert_eq!(up.calls(), 1);
    }
    // The connection could not be opened: the body (in memory) goes to the next try.
    let up = Upstream::new([
        Answer::Fail(ErrorKind::UpstreamConnect),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy()).layer(up.clone());
    let req = with_body(Method::POST, Body::from("order"));
    assert_eq!(status(service, req).await, Ok(StatusCode::OK));
    assert_eq!(
        up.bodies(),
        [Ok(Bytes::from("order")), Ok(Bytes::from("order"))]
    );
    // The same for a streaming body nobody read...
    let up = Upstream::new([
        Answer::Fail(ErrorKind::UpstreamConnect),
        Answer::Status(StatusCode::OK),
    ])
    .not_reading();
    let service = RetryLayer::new(policy()).layer(up.clone());
    let req = with_body(Method::POST, streaming(&["a", "b"], None));
    assert_eq!(status(service, req).await, Ok(StatusCode::OK));
    assert_eq!(up.calls(), 2);
    // ...but once read, a POST is not sent again, whatever the failure.
    let up = Upstream::new([
        Answer::Fail(ErrorKind::UpstreamConnect),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy()).layer(up.clone());
    let req = with_body(Method::POST, streaming(&["a", "b"], None));
    assert_eq!(status(service, req).await, Err(ErrorKind::UpstreamConnect));
    assert_eq!(up.calls(), 1);
    // Listed, POST is retried like GET.
    let up = Upstream::new([
        Answer::Status(StatusCode::SERVICE_UNAVAILABLE),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy().methods([Method::POST])).layer(up.clone());
    let req = with_body(Method::POST, streaming(&["a", "b"], None));
    assert_eq!(status(service, req).await, Ok(StatusCode::OK));
    assert_eq!(up.bodies(), [Ok(Bytes::from("ab")), Ok(Bytes::from("ab"))]);
}

#[tokio::test(start_paused = true)]
async fn a_reset_is_retried_for_get() {
    let up = Upstream::new([Answer::Reset, Answer::Status(StatusCode::OK)]);
    let service = RetryLayer::new(policy()).layer(up.clone());
    assert_eq!(status(service, get()).await, Ok(StatusCode::OK));
    assert_eq!(up.calls(), 2);
    // Not when the policy leaves resets out.
    let up = Upstream::new([Answer::Reset, Answer::Status(StatusCode::OK)]);
    let service = RetryLayer::new(policy().on(On::STATUS)).layer(up.clone());
    assert_eq!(status(service, get()).await, Err(ErrorKind::BadGateway));
}

#[tokio::test(start_paused = true)]
async fn a_streaming_body_is_replayed_with_its_trailers_and_length() {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let replay = Replay::new(streaming(&["ab", "cd"], Some(trailers.clone())), 1024);
    let mut first = replay.body();
    assert!(replay.untouched());
    let collected = (&mut first).collect().await.unwrap();
    assert_eq!(collected.trailers(), Some(&trailers));
    assert_eq!(collected.to_bytes(), "abcd");
    assert!(replay.is_replayable() && !replay.untouched());
    for _ in 0..2 {
        let again = replay.body().collect().await.unwrap();
        assert_eq!(again.trailers(), Some(&trailers));
        assert_eq!(again.to_bytes(), "abcd");
    }
    // A length known up front is each copy's exact size hint.
    let sized = http_body_util::Full::new(Bytes::from_static(b"12345"));
    let replay = Replay::new(
        Body::new(http_body_util::BodyExt::boxed_unsync(
            sized.map_err(|e| match e {}),
        )),
        1024,
    );
    let copy = replay.body();
    assert_eq!(http_body::Body::size_hint(&copy).exact(), Some(5));
}

#[tokio::test(start_paused = true)]
async fn a_copy_started_mid_stream_catches_up_and_goes_on() {
    let replay = Replay::new(streaming(&["a", "b", "c"], None), 1024);
    let mut first = replay.body();
    let one = first.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(one, "a");
    // A second try starts while the first has read one frame: it replays it, then reads on.
    let second = replay.body().collect().await.unwrap().to_bytes();
    assert_eq!(second, "abc");
    // The first replays what the second read.
    let rest = first.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "bc");
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_replay_limit_streams_but_is_not_retried() {
    let metrics = Metrics::new();
    let up = Upstream::new([
        Answer::Status(StatusCode::SERVICE_UNAVAILABLE),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy().replay_limit(4))
        .metrics(&metrics, "api")
        .layer(up.clone());
    let req = with_body(Method::PUT, streaming(&["abc", "def"], None));
    assert_eq!(
        status(service, req).await,
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(up.bodies(), [Ok(Bytes::from("abcdef"))]);
    let text = metrics.encode(Format::Prometheus);
    assert!(
        text.contains(r#"gateway_retry_skipped_total{route="api",reason="body"} 1"#),
        "{text}"
    );
    // At the limit, it is.
    let up = Upstream::new([
        Answer::Status(StatusCode::SERVICE_UNAVAILABLE),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy().replay_limit(6)).layer(up.clone());
    let req = with_body(Method::PUT, streaming(&["abc", "def"], None));
    assert_eq!(status(service, req).await, Ok(StatusCode::OK));
    assert_eq!(
        up.bodies(),
        [Ok(Bytes::from("abcdef")), Ok(Bytes::from("abcdef"))]
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_waited_for_up_to_its_cap_and_the_deadline() {
    let up = Upstream::new([
        Answer::RetryAfter(StatusCode::SERVICE_UNAVAILABLE, "2"),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy()).layer(up.clone());
    let started = Instant::now();
    assert_eq!(status(service, get()).await, Ok(StatusCode::OK));
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    // Longer than the policy waits: the 503 goes to the client at once.
    let up = Upstream::new([
        Answer::RetryAfter(StatusCode::SERVICE_UNAVAILABLE, "30"),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy()).layer(up.clone());
    let started = Instant::now();
    assert_eq!(
        status(service, get()).await,
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!((started.elapsed(), up.calls()), (Duration::ZERO, 1));
    // Past the request's deadline: the same.
    let metrics = Metrics::new();
    let up = Upstream::new([
        Answer::RetryAfter(StatusCode::SERVICE_UNAVAILABLE, "2"),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy())
        .metrics(&metrics, "api")
        .layer(up.clone());
    let mut req = get();
    req.extensions_mut()
        .insert(Deadline::new(Instant::now() + Duration::from_secs(1)));
    assert_eq!(
        status(service, req).await,
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(up.calls(), 1);
    let text = metrics.encode(Format::Prometheus);
    assert!(
        text.contains(r#"gateway_retry_skipped_total{route="api",reason="deadline"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_try_over_its_timeout_is_abandoned_and_retried() {
    let up = Upstream::new([Answer::Hang, Answer::Status(StatusCode::OK)]);
    let service = RetryLayer::new(policy().per_try_timeout(Some(Duration::from_millis(300))))
        .layer(up.clone());
    let started = Instant::now();
    assert_eq!(status(service, get()).await, Ok(StatusCode::OK));
    assert_eq!(started.elapsed(), Duration::from_millis(300));
    assert_eq!(up.calls(), 2);
    // Every try hangs: the last one's timeout is the answer.
    let up = Upstream::new([Answer::Hang]);
    let service = RetryLayer::new(
        policy()
            .tries(2)
            .per_try_timeout(Some(Duration::from_millis(300))),
    )
    .layer(up.clone());
    assert_eq!(status(service, get()).await, Err(ErrorKind::GatewayTimeout));
    assert_eq!(up.calls(), 2);
    // A try never runs past the deadline, even without a per-try timeout.
    let up = Upstream::new([Answer::Hang]);
    let service = RetryLayer::new(policy()).layer(up.clone());
    let mut req = get();
    req.extensions_mut()
        .insert(Deadline::new(Instant::now() + Duration::from_secs(1)));
    let started = Instant::now();
    assert_eq!(status(service, req).await, Err(ErrorKind::GatewayTimeout));
    assert_eq!((started.elapsed(), up.calls()), (Duration::from_secs(1), 1));
}

#[tokio::test(start_paused = true)]
async fn backoff_is_full_jitter_under_an_exponential_ceiling() {
    let policy =
        RetryPolicy::idempotent().backoff(Duration::from_millis(10), Duration::from_millis(50));
    let mut seen = [Duration::ZERO; 4];
    for _ in 0..2000 {
        for (n, max) in seen.iter_mut().enumerate() {
            let wait = policy.backoff_for(u32::try_from(n).unwrap() + 1);
            *max = (*max).max(wait);
        }
    }
    // Ceilings 10, 20, 40, then capped at 50 ms; full jitter comes close to each.
    for (max, ceiling) in seen.iter().zip([10, 20, 40, 50]) {
        let ceiling = Duration::from_millis(ceiling);
        assert!(
            *max <= ceiling && *max > ceiling * 9 / 10,
            "{max:?} {ceiling:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_budget_caps_retries_at_its_ratio_plus_its_floor() {
    let budget = Budget::new(0.1).unwrap().floor(0);
    for _ in 0..100 {
        budget.deposit();
    }
    let granted = (0..100).filter(|_| budget.withdraw()).count();
    assert_eq!(granted, 10);
    // The floor: 2 per second over the 10 s window, whatever the traffic.
    let budget = Budget::new(0.0).unwrap().floor(2);
    assert_eq!((0..100).filter(|_| budget.withdraw()).count(), 20);
    // Requests leave the window: their retries with them.
    let budget = Budget::new(0.5).unwrap().floor(0);
    for _ in 0..10 {
        budget.deposit();
    }
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(!budget.withdraw());
    budget.deposit();
    budget.deposit();
    assert!(budget.withdraw());
    assert!(!budget.withdraw());
    assert!(Budget::new(-1.0).is_err() && Budget::new(f64::NAN).is_err());
    assert!(
        Budget::new(0.2)
            .unwrap()
            .window(Duration::from_millis(10))
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn an_empty_budget_passes_the_failure_on() {
    let metrics = Metrics::new();
    let up = Upstream::new([
        Answer::Status(StatusCode::SERVICE_UNAVAILABLE),
        Answer::Status(StatusCode::OK),
    ]);
    let service = RetryLayer::new(policy().budget(Budget::new(0.0).unwrap().floor(0)))
        .metrics(&metrics, "api")
        .layer(up.clone());
    assert_eq!(
        status(service, get()).await,
        Ok(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(up.calls(), 1);
    let text = metrics.encode(Format::Prometheus);
    assert!(
        text.contains(r#"gateway_retry_skipped_total{route="api",reason="budget"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn each_try_sees_the_endpoints_tried_before() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = tower::service_fn({
        let seen = Arc::clone(&seen);
        move |req: Request<Body>| {
            let tried = req.extensions().get::<TriedEndpoints>().cloned().unwrap();
            let n = tried.len();
            seen.lock().unwrap().push(n);
            // As the proxy's balancer does: the endpoint picked joins the list.
            tried.lock().push(u64::try_from(n).unwrap(), None);
            async move {
                Ok::<_, BoxError>(response(
                    if n < 2 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    },
                    None,
                ))
            }
        }
    });
    let service = RetryLayer::new(policy()).layer(service);
    assert_eq!(status(service, get()).await, Ok(StatusCode::OK));
    assert_eq!(*seen.lock().unwrap(), [0, 1, 2]);
}
