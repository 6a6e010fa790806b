//! The built-in demo upstream the gateway fronts when no `--upstream` is given.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;

use gateway_core::Body;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Starts the demo upstream on `127.0.0.1:0` and returns its address.
pub(crate) async fn start() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(handle);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/hello" => (StatusCode::OK, "hello from the demo upstream\n".to_owned()),
        "/headers" => {
            // What the upstream received, so the gateway's header rules are visible.
            let mut out = format!("{} {}\n", req.method(), req.uri());
            for (name, value) in req.headers() {
                let _ = writeln!(out, "{name}: {}", String::from_utf8_lossy(value.as_bytes()));
            }
            (StatusCode::OK, out)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "the demo upstream has /hello and /headers\n".to_owned(),
        ),
    };
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(res)
}
