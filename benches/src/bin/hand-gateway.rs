//! The example gateway's stack for one route, built by hand in code: what `loadbench`
//! compares a config-built gateway with (`--config benches/ab-config.yaml --targets
//! gateway,hand`), so that the price of the config path (a live router swapped on reload,
//! boxed plugin layers) is measured rather than assumed.
//!
//! The route is the one `benches/ab-config.yaml` describes: every path to one upstream
//! (round robin, no ejection), under a request id.
//!
//! ```text
//! hand-gateway --listen 127.0.0.1:0 --upstream http://127.0.0.1:9000
//! ```

#![forbid(unsafe_code)]

use std::process::ExitCode;

use gateway_benches::arg_value;
use gateway_core::RescueLayer;
use gateway_core::client_ip::{SetClientIpLayer, TrustedProxies};
use gateway_middleware::request_id::SetRequestIdLayer;
use gateway_proxy::upstream::RoundRobin;
use gateway_proxy::{Endpoint, ReverseProxy, Route, Router, Server, Upstream};
use tower::ServiceBuilder;

fn main() -> ExitCode {
    let (listen, upstream) = match parse() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("hand-gateway: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime.and_then(|rt| rt.block_on(run(&listen, &upstream))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hand-gateway: {err}");
            ExitCode::FAILURE
        }
    }
}

fn parse() -> Result<(String, String), String> {
    use lexopt::prelude::*;
    let (mut listen, mut upstream) = (None, None);
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("listen") => listen = Some(arg_value(&mut parser)?),
            Long("upstream") => upstream = Some(arg_value(&mut parser)?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok((
        listen.ok_or("--listen is required")?,
        upstream.ok_or("--upstream is required")?,
    ))
}

async fn run(listen: &str, upstream: &str) -> std::io::Result<()> {
    let endpoint: Endpoint = upstream.parse().map_err(std::io::Error::other)?;
    let upstream = Upstream::builder([endpoint], RoundRobin::default()).build();
    let proxy = ReverseProxy::builder(upstream)
        .build()
        .map_err(std::io::Error::other)?;
    let router = Router::new().route(
        Route::prefix("/").id("all"),
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::new())
            .service(proxy),
    );
    let server = Server::bind(listen).await?;
    // The gateway's form of this line, which is what loadbench reads the address from.
    println!("gateway listening on http://{}", server.local_addr()?);
    let stack = ServiceBuilder::new()
        .layer(RescueLayer::new())
        .layer(SetClientIpLayer::new(TrustedProxies::none()))
        .service(router);
    server.serve(stack).await
}
