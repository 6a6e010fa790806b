//! A bounded soak of the example gateway: mixed traffic for a fixed time, with upstream
//! restarts and client aborts, sampling the gateway process's RSS, open descriptors and
//! sockets as it goes. Run it with `bash benches/soak.sh` (release build; 10 minutes by
//! default, `--secs` to change).
//!
//! Two origins (in this process, on their own runtime) sit behind one gateway process.
//! Client tasks, each on its own loop:
//! - keep-alive GETs (small bodies), and a GET per new connection;
//! - 64 KiB uploads and 1 MiB downloads;
//! - aborts: a download dropped after its first bytes, an upload dropped halfway, a head
//!   dropped halfway;
//! - malformed requests (a bad chunk, conflicting lengths), which get 400.
//!
//! Every 30 s one origin stops (its listener and connections go) and comes back 3 s later
//! on the same port. Every `--sample` seconds it prints the gateway's RSS, descriptors,
//! sockets, and the requests and errors since the last sample; at the end, a verdict: the
//! maximum growth of each after the warm-up (the first fifth), and whether it is flat.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gateway_benches::arg_value;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

const HELP: &str = "\
soak: mixed traffic through the example gateway for a fixed time, with upstream restarts
and client aborts, reporting the gateway's RSS, descriptors and sockets over time (see
benches/soak.sh)

OPTIONS:
    --gateway PATH   the gateway binary [default: target/release/gateway]
    --secs N         how long [default: 600]
    --sample N       seconds between samples [default: 10]
    --clients N      concurrent client loops of each kind [default: 4]
";

const DOWNLOAD: usize = 1 << 20;
const UPLOAD: usize = 64 * 1024;

struct Opts {
    gateway: PathBuf,
    secs: u64,
    sample: u64,
    clients: usize,
}

/// What the clients did since the last sample.
#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    /// 4xx for the malformed requests, as expected.
    refused: AtomicU64,
    /// 5xx (the origin restarts), resets, timeouts.
    failed: AtomicU64,
    aborted: AtomicU64,
}

fn main() -> ExitCode {
    gateway_benches::bin_main("soak", HELP, parse, |opts| async move {
        run(&opts).await.map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        })
    })
}

fn parse() -> Result<Option<Opts>, String> {
    use lexopt::prelude::*;
    let mut opts = Opts {
        gateway: PathBuf::from("target/release/gateway"),
        secs: 600,
        sample: 10,
        clients: 4,
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let number = |parser: &mut lexopt::Parser, name: &str| -> Result<u64, String> {
            arg_value(parser)?
                .parse()
                .map_err(|_| format!("--{name} takes a whole number"))
        };
        match arg {
            Long("gateway") => opts.gateway = PathBuf::from(arg_value(&mut parser)?),
            Long("secs") => opts.secs = number(&mut parser, "secs")?.max(10),
            Long("sample") => opts.sample = number(&mut parser, "sample")?.max(1),
            Long("clients") => {
                opts.clients = usize::try_from(number(&mut parser, "clients")?.max(1))
                    .map_err(|e| e.to_string())?;
            }
            Short('h') | Long("help") => return Ok(None),
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    Ok(Some(opts))
}

async fn run(opts: &Opts) -> io::Result<bool> {
    let origins = [Origin::start().await?, Origin::start().await?];
    let listen = free_port()?;
    let mut gateway = spawn_gateway(opts, listen, &origins)?;
    let pid = gateway.id();
    wait_for(listen).await?;
    println!(
        "soak: gateway pid {pid} on {listen}, origins {} and {}, {} s, {} client loops of each kind",
        origins[0].addr, origins[1].addr, opts.secs, opts.clients
    );

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = JoinSet::new();
    for i in 0..opts.clients {
        for kind in Kind::ALL {
            let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
            clients.spawn(client(kind, listen, counts, stop, i));
        }
    }

    let started = Instant::now();
    let end = started + Duration::from_secs(opts.secs);
    let mut next_sample = started + Duration::from_secs(opts.sample);
    let mut next_restart = started + Duration::from_secs(30);
    let mut restarts = 0usize;
    let mut samples = Vec::new();
    println!(
        "{:>6} {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "secs", "rss_kib", "fds", "sockets", "ok", "refused", "failed", "aborted"
    );
    while Instant::now() < end {
        let next = next_sample.min(next_restart).min(end);
        tokio::time::sleep_until(next).await;
        if Instant::now() >= next_restart {
            let origin = &origins[restarts % origins.len()];
            origin.restart(Duration::from_secs(3));
            restarts += 1;
            next_restart += Duration::from_secs(30);
        }
        if Instant::now() >= next_sample {
            let sample = Sample::take(pid, started, &counts)?;
            sample.print();
            samples.push(sample);
            next_sample += Duration::from_secs(opts.sample);
        }
        if let Ok(Some(status)) = gateway.try_wait() {
            return Err(io::Error::other(format!("the gateway exited: {status}")));
        }
    }
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    // Idle again: what is left once the traffic has stopped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = Sample::take(pid, started, &counts)?;
    println!("after the traffic stopped:");
    after.print();
    let _ = gateway.kill();
    let _ = gateway.wait();
    Ok(verdict(&samples, restarts))
}

/// Prints the growth after the warm-up; whether RSS, descriptors and sockets are flat.
fn verdict(samples: &[Sample], restarts: usize) -> bool {
    let warm = samples.len() / 5;
    let steady = &samples[warm.min(samples.len().saturating_sub(1))..];
    if steady.len() < 3 {
        println!("too short for a verdict");
        return true;
    }
    // The second half of the steady samples against the first: growth that goes on shows
    // as a higher peak in the second half.
    let half = steady.len() / 2;
    let peak = |s: &[Sample], f: fn(&Sample) -> u64| s.iter().map(f).max().unwrap_or(0);
    let mut flat = true;
    for (name, f, slack) in [
        (
            "RSS KiB",
            (|s: &Sample| s.rss_kib) as fn(&Sample) -> u64,
            0.10,
        ),
        ("descriptors", |s: &Sample| s.fds, 0.25),
        ("sockets", |s: &Sample| s.sockets, 0.25),
    ] {
        let (first, second) = (peak(&steady[..half], f), peak(&steady[half..], f));
        let min = steady.iter().map(f).min().unwrap_or(0);
        let grew = second > first + 16 && second as f64 > first as f64 * (1.0 + slack);
        flat &= !grew;
        println!(
            "{name}: after warm-up min {min}, peak first half {first}, peak second half {second}: {}",
            if grew { "GROWING" } else { "flat" }
        );
    }
    let total: u64 = steady.iter().map(|s| s.ok).sum();
    println!(
        "{restarts} upstream restarts; {total} requests answered after warm-up; {}",
        if flat { "flat" } else { "NOT flat" }
    );
    flat
}

// === sampling ===

struct Sample {
    secs: u64,
    rss_kib: u64,
    fds: u64,
    sockets: u64,
    ok: u64,
    refused: u64,
    failed: u64,
    aborted: u64,
}

impl Sample {
    fn take(pid: u32, started: Instant, counts: &Counts) -> io::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let (mut fds, mut sockets) = (0, 0);
        for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            fds += 1;
            if let Ok(target) = std::fs::read_link(entry?.path())
                && target.to_string_lossy().starts_with("socket:")
            {
                sockets += 1;
            }
        }
        Ok(Self {
            secs: started.elapsed().as_secs(),
            rss_kib,
            fds,
            sockets,
            ok: counts.ok.swap(0, Ordering::Relaxed),
            refused: counts.refused.swap(0, Ordering::Relaxed),
            failed: counts.failed.swap(0, Ordering::Relaxed),
            aborted: counts.aborted.swap(0, Ordering::Relaxed),
        })
    }

    fn print(&self) {
        println!(
            "{:>6} {:>9} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
            self.secs,
            self.rss_kib,
            self.fds,
            self.sockets,
            self.ok,
            self.refused,
            self.failed,
            self.aborted
        );
    }
}

// === the gateway ===

fn free_port() -> io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn spawn_gateway(opts: &Opts, listen: SocketAddr, origins: &[Origin]) -> io::Result<Child> {
    let mut cmd = Command::new(&opts.gateway);
    cmd.arg("--listen").arg(listen.to_string());
    for origin in origins {
        cmd.arg("--upstream").arg(format!("http://{}", origin.addr));
    }
    cmd.args(["--threads", "1"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd.spawn().map_err(|err| {
        io::Error::other(format!(
            "cannot run {} ({err}): build it with `cargo build --release -p example-gateway`",
            opts.gateway.display()
        ))
    })
}

async fn wait_for(addr: SocketAddr) -> io::Result<()> {
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(io::Error::other("the gateway did not start listening"))
}

// === the origins ===

/// An origin that can be stopped and started again on the same port.
struct Origin {
    addr: SocketAddr,
    /// Bumped to stop the origin: its serving loop watches it.
    generation: Arc<AtomicU64>,
}

impl Origin {
    async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let origin = Self {
            addr,
            generation: Arc::new(AtomicU64::new(0)),
        };
        tokio::spawn(serve(listener, Arc::clone(&origin.generation), 0));
        Ok(origin)
    }

    /// Stops serving (the listener closes, open connections are dropped), and starts again
    /// on the same port after `down`.
    fn restart(&self, down: Duration) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (addr, current) = (self.addr, Arc::clone(&self.generation));
        tokio::spawn(async move {
            tokio::time::sleep(down).await;
            match TcpListener::bind(addr).await {
                Ok(listener) => serve(listener, current, generation).await,
                Err(err) => eprintln!("soak: the origin on {addr} could not come back: {err}"),
            }
        });
    }
}

/// Serves until the origin's generation moves past `generation`.
async fn serve(listener: TcpListener, current: Arc<AtomicU64>, generation: u64) {
    let body = Bytes::from(vec![b'x'; DOWNLOAD]);
    let alive = || current.load(Ordering::SeqCst) == generation;
    let mut conns = JoinSet::new();
    while alive() {
        let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
        let Ok(Ok((stream, _))) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let body = body.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    // Uploads are read to the end and their size echoed.
                    let collected = http_body_util::BodyExt::collect(req.into_body()).await;
                    let len = collected.map_or(0, |c| c.to_bytes().len());
                    let res = if path == "/download" {
                        body
                    } else {
                        Bytes::from(format!("{len}\n"))
                    };
                    Ok::<_, Infallible>(Response::new(Full::new(res)))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
        while conns.try_join_next().is_some() {}
    }
    // Down: the listener and every open connection go.
    drop(listener);
    conns.shutdown().await;
}

// === the clients ===

#[derive(Clone, Copy, Debug)]
enum Kind {
    KeepAlive,
    NewConnection,
    Upload,
    Download,
    AbortDownload,
    AbortUpload,
    AbortHead,
    Malformed,
}

impl Kind {
    const ALL: [Self; 8] = [
        Self::KeepAlive,
        Self::NewConnection,
        Self::Upload,
        Self::Download,
        Self::AbortDownload,
        Self::AbortUpload,
        Self::AbortHead,
        Self::Malformed,
    ];
}

async fn client(
    kind: Kind,
    addr: SocketAddr,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    i: usize,
) {
    let mut kept: Option<TcpStream> = None;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            once(kind, addr, &mut kept, n + i as u64),
        )
        .await;
        match outcome {
            Ok(Ok(Outcome::Ok)) => counts.ok.fetch_add(1, Ordering::Relaxed),
            Ok(Ok(Outcome::Refused)) => counts.refused.fetch_add(1, Ordering::Relaxed),
            Ok(Ok(Outcome::Aborted)) => counts.aborted.fetch_add(1, Ordering::Relaxed),
            Ok(Ok(Outcome::Failed) | Err(_)) | Err(_) => {
                kept = None;
                // Back off a little while an origin restarts.
                tokio::time::sleep(Duration::from_millis(20)).await;
                counts.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
        if matches!(
            kind,
            Kind::AbortDownload | Kind::AbortUpload | Kind::AbortHead
        ) {
            // Aborts are a minority of the traffic.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

enum Outcome {
    Ok,
    Refused,
    Failed,
    Aborted,
}

async fn once(
    kind: Kind,
    addr: SocketAddr,
    kept: &mut Option<TcpStream>,
    n: u64,
) -> io::Result<Outcome> {
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n");
    match kind {
        Kind::KeepAlive => {
            let stream = match kept {
                Some(stream) => stream,
                None => kept.insert(TcpStream::connect(addr).await?),
            };
            stream
                .write_all(get(&format!("/small/{n}")).as_bytes())
                .await?;
            read_response(stream).await
        }
        Kind::NewConnection => {
            let mut stream = TcpStream::connect(addr).await?;
            stream
                .write_all(b"GET /fresh HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
                .await?;
            read_response(&mut stream).await
        }
        Kind::Upload => {
            let stream = match kept {
                Some(stream) => stream,
                None => kept.insert(TcpStream::connect(addr).await?),
            };
            let head =
                format!("POST /upload HTTP/1.1\r\nHost: soak\r\nContent-Length: {UPLOAD}\r\n\r\n");
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&vec![b'u'; UPLOAD]).await?;
            read_response(stream).await
        }
        Kind::Download => {
            let stream = match kept {
                Some(stream) => stream,
                None => kept.insert(TcpStream::connect(addr).await?),
            };
            stream.write_all(get("/download").as_bytes()).await?;
            read_response(stream).await
        }
        Kind::AbortDownload => {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(get("/download").as_bytes()).await?;
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await?;
            Ok(Outcome::Aborted)
        }
        Kind::AbortUpload => {
            let mut stream = TcpStream::connect(addr).await?;
            let head =
                format!("POST /upload HTTP/1.1\r\nHost: soak\r\nContent-Length: {UPLOAD}\r\n\r\n");
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&vec![b'u'; UPLOAD / 2]).await?;
            Ok(Outcome::Aborted)
        }
        Kind::AbortHead => {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(b"GET /half HTTP/1.1\r\nHost: so").await?;
            Ok(Outcome::Aborted)
        }
        Kind::Malformed => {
            let mut stream = TcpStream::connect(addr).await?;
            let bad: &[u8] = if n.is_multiple_of(2) {
                b"POST /bad HTTP/1.1\r\nHost: soak\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
            } else {
                b"POST /bad HTTP/1.1\r\nHost: soak\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
            };
            stream.write_all(bad).await?;
            read_response(&mut stream).await
        }
    }
}

/// Reads one response with a `content-length` body; its outcome by status.
async fn read_response(stream: &mut TcpStream) -> io::Result<Outcome> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(Outcome::Failed);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(match status {
                200..=299 => Outcome::Ok,
                400..=499 => Outcome::Refused,
                _ => Outcome::Failed,
            });
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Outcome::Failed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
