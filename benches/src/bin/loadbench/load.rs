//! Load: `wrk` at a fixed concurrency, an open-loop generator at a fixed rate, and a crowd
//! of idle keep-alive connections.

use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};

/// What one `wrk` run reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wrk {
    pub(crate) requests: u64,
    pub(crate) rps: f64,
    /// Non-2xx/3xx responses plus socket errors.
    pub(crate) errors: u64,
}

/// Runs `wrk` (pinned to `core` when given) with `connections` for `secs` against `url`.
pub(crate) fn wrk(
    core: Option<&str>,
    connections: u32,
    secs: u64,
    url: &str,
    auth: Option<&HeaderValue>,
) -> io::Result<Wrk> {
    let mut cmd = match core {
        Some(core) => {
            let mut c = Command::new("taskset");
            c.args(["-c", core, "wrk"]);
            c
        }
        None => Command::new("wrk"),
    };
    if let Some(auth) = auth.and_then(|a| a.to_str().ok()) {
        cmd.arg("-H").arg(format!("authorization: {auth}"));
    }
    let out = cmd
        .args([
            "-t1",
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{secs}s"),
            url,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(io::Error::other(format!("wrk failed: {text}")));
    }
    parse_wrk(&text).ok_or_else(|| io::Error::other(format!("unexpected wrk output: {text}")))
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let non_2xx: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|rest| {
            rest.split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Some(Wrk {
        requests,
        rps,
        errors: non_2xx + socket,
    })
}

/// Latency percentiles of one fixed-rate run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Latency {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    /// Requests answered.
    pub(crate) requests: u64,
    pub(crate) errors: u64,
}

/// Sends `rate` requests per second for `secs` over `connections` keep-alive connections
/// (open loop: each connection sends on its own schedule, whatever the others do) and
/// returns the latency percentiles, from just before each request is written to the end of
/// its response body.
pub(crate) async fn fixed_rate(
    addr: SocketAddr,
    path: &'static str,
    rate: u32,
    secs: u64,
    connections: u32,
    auth: Option<HeaderValue>,
) -> io::Result<Latency> {
    let period = Duration::from_secs(1) / rate;
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs(secs);
    let mut tasks = JoinSet::new();
    for i in 0..connections {
        let auth = auth.clone();
        tasks.spawn(async move {
            let mut send = connect(addr).await?;
            let (mut samples, mut errors) = (Vec::new(), 0_u64);
            let mut at = start + period * i;
            while at < end {
                sleep_until(at).await;
                let sent = Instant::now();
                match get(&mut send, addr, path, auth.as_ref()).await {
                    Ok(()) => samples.push(sent.elapsed()),
                    Err(_) => errors += 1,
                }
                at += period * connections;
            }
            io::Result::Ok((samples, errors))
        });
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    while let Some(done) = tasks.join_next().await {
        let (samples, e) = done.map_err(io::Error::other)??;
        all.extend(samples);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len().max(1)) - 1;
        all.get(i).copied().unwrap_or_default()
    };
    Ok(Latency {
        p50: pct(0.50),
        p99: pct(0.99),
        p999: pct(0.999),
        requests: all.len() as u64,
        errors,
    })
}

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> io::Result<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get(
    send: &mut Sender,
    addr: SocketAddr,
    path: &str,
    auth: Option<&HeaderValue>,
) -> io::Result<()> {
    send.ready().await.map_err(io::Error::other)?;
    let mut req = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::new())
        .map_err(io::Error::other)?;
    if let Some(auth) = auth {
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, auth.clone());
    }
    let res = send.send_request(req).await.map_err(io::Error::other)?;
    let ok = res.status().is_success();
    res.into_body().collect().await.map_err(io::Error::other)?;
    if ok {
        Ok(())
    } else {
        Err(io::Error::other("non-2xx"))
    }
}

/// Sends `n` requests one after another over one connection (a warm-up).
pub(crate) async fn sequential(
    addr: SocketAddr,
    n: u32,
    auth: Option<&HeaderValue>,
) -> io::Result<()> {
    let mut send = connect(addr).await?;
    for _ in 0..n {
        get(&mut send, addr, "/", auth).await?;
    }
    Ok(())
}

/// Opens `n` keep-alive connections, each after one request, and keeps them open until
/// the returned value is dropped.
pub(crate) async fn idle_connections(
    addr: SocketAddr,
    n: usize,
    auth: Option<HeaderValue>,
) -> io::Result<Vec<Sender>> {
    let mut open = Vec::with_capacity(n);
    let batch = 250;
    while open.len() < n {
        let mut tasks = JoinSet::new();
        for _ in 0..batch.min(n - open.len()) {
            let auth = auth.clone();
            tasks.spawn(async move {
                let mut send = connect(addr).await?;
                get(&mut send, addr, "/", auth.as_ref()).await?;
                io::Result::Ok(send)
            });
        }
        while let Some(done) = tasks.join_next().await {
            open.push(done.map_err(io::Error::other)??);
        }
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n  \
                    150000 requests in 5.00s, 12.0MB read\n  Socket errors: connect 0, read 2, \
                    write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  29999.50\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.requests, 150_000);
        assert!((w.rps - 29_999.5).abs() < 1e-6);
        assert_eq!(w.errors, 7);
    }
}
