//! A bare reverse proxy on hyper's HTTP/1 server and hyper-util's pooled client: no
//! routing, no header rules, no limits, one thread.
//!
//! `loadbench` runs it next to the gateway as the floor of any proxy built on hyper, so
//! its table separates what the gateway's own layers cost from what hyper costs.
//!
//! ```text
//! hyper-proxy --listen 127.0.0.1:0 --upstream http://127.0.0.1:9000
//! ```

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;

use gateway_benches::arg_value;
use http::uri::{Authority, Scheme, Uri};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

fn main() -> ExitCode {
    let (listen, upstream) = match parse() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("hyper-proxy: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime.and_then(|rt| rt.block_on(run(listen, upstream))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hyper-proxy: {err}");
            ExitCode::FAILURE
        }
    }
}

fn parse() -> Result<(SocketAddr, Authority), String> {
    use lexopt::prelude::*;
    let (mut listen, mut upstream) = (None, None);
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("listen") => {
                let v = arg_value(&mut parser)?;
                listen = Some(
                    v.parse()
                        .map_err(|_| format!("--listen: bad address `{v}`"))?,
                );
            }
            Long("upstream") => {
                let v = arg_value(&mut parser)?;
                let uri: Uri = v
                    .parse()
                    .map_err(|_| format!("--upstream: bad URL `{v}`"))?;
                if uri.scheme() != Some(&Scheme::HTTP) {
                    return Err(format!("--upstream: `{v}` is not an http:// URL"));
                }
                upstream = uri.into_parts().authority;
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok((
        listen.ok_or("--listen is required")?,
        upstream.ok_or("--upstream is required")?,
    ))
}

async fn run(listen: SocketAddr, upstream: Authority) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    // The gateway's form of this line, which is what loadbench reads the address from.
    println!("hyper-proxy listening on http://{}", listener.local_addr()?);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build(connector);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors, say: the connection waiting is not this loop's fault.
            Err(err) => {
                eprintln!("hyper-proxy: accept: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let service = service_fn(move |mut req: http::Request<Incoming>| {
                let mut parts = http::uri::Parts::default();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = Some(upstream.clone());
                parts.path_and_query = req.uri().path_and_query().cloned();
                if let Ok(uri) = Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
                client.request(req)
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
