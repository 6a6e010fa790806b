use std::convert::Infallible;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderValue, StatusCode};
use tower::{ServiceExt, service_fn};

use super::*;
use crate::ErrorKind;

/// Records what each hook saw; decisions are driven by request headers.
#[derive(Default)]
struct Probe {
    inner_calls: AtomicUsize,
    errors_seen: Mutex<Vec<String>>,
}

#[derive(Clone)]
struct ProbePlugin(Arc<Probe>);

struct Ctx {
    started_with: Option<HeaderValue>,
    phase: &'static str,
}

impl Plugin for ProbePlugin {
    type Ctx = Ctx;
    const NAME: &'static str = "probe";

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started_with: None,
            phase: "new",
        }
    }

    async fn on_request(&self, req: &mut request::Parts, ctx: &mut Ctx) -> Result<Flow, Error> {
        assert_eq!(ctx.phase, "new");
        ctx.phase = "request";
        ctx.started_with = req.headers.get("x-mark").cloned();
        req.headers
            .insert("x-seen-by", HeaderValue::from_static("probe"));
        match req.headers.get("x-action").map(HeaderValue::as_bytes) {
            Some(b"respond") => {
                let mut res = Response::new(Body::from("from plugin"));
                *res.status_mut() = StatusCode::ACCEPTED;
                Ok(Flow::Respond(res))
            }
            Some(b"deny") => Err(Error::new(ErrorKind::Forbidden)),
            Some(b"slow-down") => Err(Error::new(ErrorKind::TooManyRequests)
                .retry_after(std::time::Duration::from_secs(7))),
            _ => Ok(Flow::Continue),
        }
    }

    async fn on_response(&self, res: &mut response::Parts, ctx: &mut Ctx) -> Result<(), Error> {
        assert_eq!(ctx.phase, "request");
        ctx.phase = "response";
        if res.headers.contains_key("x-fail-response") {
            return Err(Error::new(ErrorKind::BadGateway));
        }
        if let Some(mark) = ctx.started_with.take() {
            res.headers.insert("x-mark-echo", mark);
        }
        Ok(())
    }

    fn on_error(&self, err: &BoxError, ctx: &mut Ctx) {
        assert_eq!(ctx.phase, "request");
        self.0
            .errors_seen
            .lock()
            .expect("not poisoned")
            .push(err.to_string());
    }
}

fn stack(
    probe: &Arc<Probe>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone {
    let counter = Arc::clone(probe);
    PluginLayer::new(ProbePlugin(Arc::clone(probe))).layer(service_fn(move |req: Request<Body>| {
        counter.inner_calls.fetch_add(1, Ordering::SeqCst);
        async move {
            match req.headers().get("x-upstream").map(HeaderValue::as_bytes) {
                Some(b"error") => Err::<Response<Body>, BoxError>("upstream exploded".into()),
                Some(b"fail-response") => {
                    let mut res = Response::new(Body::empty());
                    res.headers_mut()
                        .insert("x-fail-response", HeaderValue::from_static("1"));
                    Ok(res)
                }
                _ => {
                    let mut res = Response::new(Body::from("from inner"));
                    if let Some(v) = req.headers().get("x-seen-by") {
                        res.headers_mut().insert("x-inner-saw", v.clone());
                    }
                    Ok(res)
                }
            }
        }
    }))
}

fn request(headers: &[(&'static str, &'static str)]) -> Request<Body> {
    let mut req = Request::new(Body::empty());
    for (k, v) in headers {
        req.headers_mut().insert(*k, HeaderValue::from_static(v));
    }
    req
}

#[tokio::test]
async fn continue_edits_the_request_and_carries_ctx_to_the_response() {
    let probe = Arc::new(Probe::default());
    let res = stack(&probe)
        .oneshot(request(&[("x-mark", "m-1")]))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-inner-saw"], "probe");
    assert_eq!(res.headers()["x-mark-echo"], "m-1");
    assert_eq!(res.into_body().collect_bytes().await.unwrap(), "from inner");
    assert_eq!(probe.inner_calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn respond_short_circuits_and_still_runs_on_response() {
    let probe = Arc::new(Probe::default());
    let res = stack(&probe)
        .oneshot(request(&[("x-action", "respond"), ("x-mark", "m-2")]))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(res.headers()["x-mark-echo"], "m-2");
    assert_eq!(
        res.into_body().collect_bytes().await.unwrap(),
        "from plugin"
    );
    assert_eq!(probe.inner_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn request_errors_map_through_error_kind() {
    let probe = Arc::new(Probe::default());
    let res = stack(&probe)
        .oneshot(request(&[("x-action", "deny")]))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(res.headers()["content-type"], "application/problem+json");

    let res = stack(&probe)
        .oneshot(request(&[("x-action", "slow-down")]))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(res.headers()["retry-after"], "7");
    assert_eq!(probe.inner_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn response_errors_replace_the_response() {
    let probe = Arc::new(Probe::default());
    let res = stack(&probe)
        .oneshot(request(&[("x-upstream", "fail-response")]))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    assert!(!res.headers().contains_key("x-fail-response"));
}

#[tokio::test]
async fn inner_errors_pass_through_after_on_error() {
    let probe = Arc::new(Probe::default());
    let err = stack(&probe)
        .oneshot(request(&[("x-upstream", "error")]))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "upstream exploded");
    assert_eq!(
        *probe.errors_seen.lock().unwrap(),
        vec!["upstream exploded".to_owned()]
    );
}

#[tokio::test]
async fn readiness_is_delegated_and_the_ready_service_is_called() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let probe = Arc::new(Probe::default());
    let mut svc = PluginLayer::new(ProbePlugin(probe)).layer(mock);

    handle.allow(0);
    assert!(
        tokio_test_poll_ready(&mut svc).is_pending(),
        "a not-ready inner service must make the plugin not ready"
    );
    handle.allow(1);
    svc.ready().await.unwrap();
    // The inner service is called from the response future, so drive it concurrently.
    let fut = tokio::spawn(svc.call(request(&[])));
    let (req, send) = handle.next_request().await.expect("inner called");
    assert_eq!(req.headers()["x-seen-by"], "probe");
    send.send_response(Response::new(Body::empty()));
    assert_eq!(fut.await.unwrap().unwrap().status(), StatusCode::OK);
}

fn tokio_test_poll_ready<S: Service<Request<Body>>>(svc: &mut S) -> Poll<Result<(), S::Error>> {
    let waker = std::task::Waker::noop();
    svc.poll_ready(&mut Context::from_waker(waker))
}

#[tokio::test]
async fn default_hooks_continue() {
    struct Noop;
    impl Plugin for Noop {
        type Ctx = ();
        const NAME: &'static str = "noop";
        fn new_ctx(&self) {}
    }
    let svc = PluginLayer::new(Noop).layer(service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::from("x")))
    }));
    let res = svc.oneshot(Request::new(Body::empty())).await.unwrap();
    assert_eq!(res.into_body().collect_bytes().await.unwrap(), "x");
}
