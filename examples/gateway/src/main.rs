//! The gateway you run.
//!
//! With no arguments it starts a complete demo: a small built-in upstream and the gateway
//! on `127.0.0.1:8080` in front of it.
//!
//! ```text
//! cargo run --release -p example-gateway
//! curl -i http://127.0.0.1:8080/api/hello
//! curl -i http://127.0.0.1:8080/api/headers -H 'X-Forwarded-For: 6.6.6.6'
//! curl -i http://127.0.0.1:8080/api/../admin        # normalized, then 404 (no route)
//! curl -i http://127.0.0.1:8080/api/%2e%2e%2fadmin  # refused: 400
//! ```
//!
//! With `--upstream URL` (repeatable) it proxies every path to the given upstreams, like
//! a quick-start reverse proxy, with a balancer, health checks and DNS discovery to taste:
//!
//! ```text
//! cargo run --release -p example-gateway -- --listen 0.0.0.0:8080 \
//!     --upstream http://10.0.0.1:8080 --upstream http://10.0.0.2:8080 \
//!     --lb least-request --health-path /healthz --slow-start 30
//! ```

mod demo;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use gateway_core::RescueLayer;
use gateway_core::client_ip::{SetClientIpLayer, TrustedProxies};
use gateway_proxy::server::TlsConfig;
use gateway_proxy::upstream::{
    ConsistentHash, DnsDiscovery, Endpoint, HashKey, HealthCheck, LeastRequest, OutlierDetection,
    PeakEwma, Random, RoundRobin,
};
use gateway_proxy::{ReverseProxy, Route, Router, Server, Upstream};
use tower::ServiceBuilder;

const HELP: &str = "\
gateway: an API gateway built from gateway-core and gateway-proxy

USAGE:
    gateway [OPTIONS]

With no --upstream, starts a demo upstream and routes /api/* to it.

OPTIONS:
    --listen ADDR          address to listen on [default: 127.0.0.1:8080]
    --upstream URL         proxy every path to URL (http://host:port, https://host,
                           or host:port); repeat for round robin
    --lb BALANCER          how --upstream endpoints share the load: round-robin,
                           random, least-request, ewma (peak-EWMA response time),
                           or hash:client-ip, hash:path,
                           hash:header:NAME, hash:cookie:NAME [default: round-robin]
    --health-path PATH     probe every endpoint with GET PATH; endpoints failing
                           their probes get no traffic until they pass again
    --health-interval SECS time between probes [default: 10]
    --health-timeout SECS  how long a probe may take [default: 2]
    --healthy-threshold N  passing probes in a row to be healthy again [default: 2]
    --unhealthy-threshold N
                           failed probes in a row to be unhealthy [default: 3]
    --eject-after N        eject an endpoint after N failed requests in a row
                           (502/503/504, resets, refused connections), for 30 s,
                           longer each time; 0 turns it off [default: 5]
    --slow-start SECS      ramp a new or recovered endpoint's share up over SECS
                           [default: 0, off]
    --dns-refresh SECS     resolve http upstreams given by host name every SECS and
                           balance over every address they resolve to [default: off]
    --threads N            worker threads of the runtime [default: one per core]
    --tls-cert FILE        serve HTTPS with this PEM certificate chain (needs --tls-key)
    --tls-key FILE         PEM private key for --tls-cert
    --trusted-proxy CIDR   believe X-Forwarded-For from peers in CIDR; repeatable
    --drain-timeout SECS   how long a graceful shutdown waits [default: 30]
    -h, --help             print this help

Stops gracefully on Ctrl-C or SIGTERM. Logs go to stderr; set RUST_LOG to tune them.
";

#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    upstreams: Vec<String>,
    lb: Lb,
    threads: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    trusted: Vec<String>,
    drain: Duration,
    health_path: Option<String>,
    health_interval: Duration,
    health_timeout: Duration,
    healthy_threshold: NonZeroU32,
    unhealthy_threshold: NonZeroU32,
    eject_after: usize,
    slow_start: Duration,
    dns_refresh: Option<Duration>,
}

/// The `--lb` choice.
#[derive(Debug)]
enum Lb {
    RoundRobin,
    Random,
    LeastRequest,
    Ewma,
    Hash(HashKey),
}

impl Lb {
    fn parse(v: &str) -> Result<Self, String> {
        let bad = || format!("--lb: `{v}` is not a balancer (see --help)");
        Ok(match v {
            "round-robin" => Self::RoundRobin,
            "random" => Self::Random,
            "least-request" => Self::LeastRequest,
            "ewma" => Self::Ewma,
            "hash:client-ip" => Self::Hash(HashKey::ClientIp),
            "hash:path" => Self::Hash(HashKey::Path),
            _ => match v.strip_prefix("hash:").and_then(|k| k.split_once(':')) {
                Some(("header", name)) => Self::Hash(HashKey::Header(
                    http::header::HeaderName::try_from(name).map_err(|_| bad())?,
                )),
                Some(("cookie", name)) if !name.is_empty() => {
                    Self::Hash(HashKey::Cookie(name.to_owned()))
                }
                _ => return Err(bad()),
            },
        })
    }
}

/// What the command line asked for.
enum Command {
    Run(Box<Args>),
    Help,
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        upstreams: Vec::new(),
        lb: Lb::RoundRobin,
        threads: None,
        tls_cert: None,
        tls_key: None,
        trusted: Vec::new(),
        drain: Duration::from_secs(30),
        health_path: None,
        health_interval: Duration::from_secs(10),
        health_timeout: Duration::from_secs(2),
        healthy_threshold: NonZeroU32::new(2).expect("2 is not 0"),
        unhealthy_threshold: NonZeroU32::new(3).expect("3 is not 0"),
        eject_after: 5,
        slow_start: Duration::ZERO,
        dns_refresh: None,
    };
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let value = |p: &mut lexopt::Parser| -> Result<String, String> {
            p.value()
                .map_err(|e| e.to_string())?
                .into_string()
                .map_err(|_| "arguments must be UTF-8".to_owned())
        };
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Long("listen") => {
                let v = value(&mut parser)?;
                args.listen = v.parse().map_err(|_| {
                    format!("--listen: `{v}` is not an address like 127.0.0.1:8080")
                })?;
            }
            Long("upstream") => args.upstreams.push(value(&mut parser)?),
            Long("lb") => args.lb = Lb::parse(&value(&mut parser)?)?,
            Long("threads") => {
                let v = value(&mut parser)?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("--threads: `{v}` is not a number"))?;
                if n == 0 {
                    return Err("--threads must be at least 1".into());
                }
                args.threads = Some(n);
            }
            Long("tls-cert") => args.tls_cert = Some(value(&mut parser)?.into()),
            Long("tls-key") => args.tls_key = Some(value(&mut parser)?.into()),
            Long("trusted-proxy") => args.trusted.push(value(&mut parser)?),
            Long("drain-timeout") => args.drain = secs("drain-timeout", &value(&mut parser)?)?,
            Long("health-path") => args.health_path = Some(value(&mut parser)?),
            Long("health-interval") => {
                args.health_interval = secs("health-interval", &value(&mut parser)?)?;
            }
            Long("health-timeout") => {
                args.health_timeout = secs("health-timeout", &value(&mut parser)?)?;
            }
            Long("healthy-threshold") => {
                args.healthy_threshold = count("healthy-threshold", &value(&mut parser)?)?;
            }
            Long("unhealthy-threshold") => {
                args.unhealthy_threshold = count("unhealthy-threshold", &value(&mut parser)?)?;
            }
            Long("eject-after") => {
                let v = value(&mut parser)?;
                args.eject_after = v
                    .parse()
                    .map_err(|_| format!("--eject-after: `{v}` is not a number"))?;
            }
            Long("slow-start") => args.slow_start = secs("slow-start", &value(&mut parser)?)?,
            Long("dns-refresh") => {
                let every = secs("dns-refresh", &value(&mut parser)?)?;
                if every.is_zero() {
                    return Err("--dns-refresh must be more than 0".into());
                }
                args.dns_refresh = Some(every);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if args.tls_cert.is_some() != args.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    Ok(Command::Run(Box::new(args)))
}

/// A number of seconds (fractions allowed) for `--flag`.
fn secs(flag: &str, v: &str) -> Result<Duration, String> {
    v.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("--{flag}: `{v}` is not a number of seconds"))
}

/// A count of at least 1 for `--flag`.
fn count(flag: &str, v: &str) -> Result<NonZeroU32, String> {
    v.parse::<NonZeroU32>()
        .map_err(|_| format!("--{flag}: `{v}` is not a number of at least 1"))
}

fn main() -> ExitCode {
    tune_malloc();
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(Command::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(args)) => *args,
        Err(err) => {
            eprintln!("gateway: error: {err} (see --help)");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    // One thread: tokio's current-thread scheduler, which runs every task on the thread
    // that polls the listener (no work-stealing queues, no cross-thread wake-ups).
    let mut runtime = if args.threads == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    runtime.enable_all();
    if let Some(n) = args.threads.filter(|n| *n > 1) {
        runtime.worker_threads(n);
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("gateway: error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(err)) => {
            eprintln!("gateway: error: {err}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(err)) => {
            eprintln!("gateway: error: {err}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    /// Bad flags or files: exit code 2.
    Config(String),
    /// The server failed while running.
    Runtime(String),
}

async fn run(args: Args) -> Result<(), Failure> {
    // A configuration error and its causes, one line.
    let config = |e: &dyn std::error::Error| {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        Failure::Config(text)
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(TlsConfig::from_pem_files(cert, key).map_err(|e| config(&e))?)
        }
        _ => None,
    };
    let mut trusted = TrustedProxies::builder();
    for cidr in &args.trusted {
        trusted = trusted.cidr(cidr.as_str());
    }
    let trusted = trusted.build().map_err(|e| config(&e))?;

    let (app, demo) = if args.upstreams.is_empty() {
        let demo = demo::start()
            .await
            .map_err(|e| Failure::Runtime(format!("cannot start the demo upstream: {e}")))?;
        let api =
            ReverseProxy::builder(Upstream::single(&demo.to_string()).map_err(|e| config(&e))?)
                .strip_prefix("/api")
                .build()
                .map_err(|e| config(&e))?;
        (
            Router::new().route(Route::prefix("/api").id("api"), api),
            true,
        )
    } else {
        let upstream = upstream(&args).map_err(|e| config(&*e))?;
        let proxy = ReverseProxy::builder(upstream)
            .build()
            .map_err(|e| config(&e))?;
        (
            Router::new().route(Route::prefix("/").id("default"), proxy),
            false,
        )
    };

    let server = Server::bind(args.listen)
        .await
        .map_err(|e| Failure::Config(format!("cannot listen on {}: {e}", args.listen)))?;
    let local = server
        .local_addr()
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut server = server
        .drain_timeout(args.drain)
        .shrink_after_close(SHRINK_CROWD, give_back_heap);
    if let Some(tls) = tls {
        server = server.tls(tls);
    }

    println!("gateway listening on {scheme}://{local}");
    if demo {
        println!("try:");
        println!("  curl -i {scheme}://{local}/api/hello");
        println!("  curl -i {scheme}://{local}/api/headers -H 'X-Forwarded-For: 6.6.6.6'");
        println!("  curl -i {scheme}://{local}/api/%2e%2e%2fadmin");
    } else {
        println!("proxying every path to {}", args.upstreams.join(", "));
    }

    let stack = ServiceBuilder::new()
        .layer(RescueLayer::new())
        .layer(SetClientIpLayer::new(trusted))
        .service(app);
    server
        .serve(stack)
        .await
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    tracing::info!("stopped");
    Ok(())
}

/// After this many connections were open and most of them closed, the heap they freed goes
/// back to the system.
const SHRINK_CROWD: usize = 1024;

/// Raises glibc malloc's heap-trim threshold from 128 KiB to 4 MiB (and the size from which
/// it maps an allocation on its own from 128 KiB to 2 MiB). Call it once, first thing in
/// `main`, before the runtime starts; on other C libraries it only allocates and frees
/// 2 MiB.
///
/// A proxy that streams large bodies allocates a read buffer per response (sized to the
/// body, up to 64 KiB at a time) and frees it once the client has the bytes. With
/// glibc's default threshold, such frees keep shrinking the heap with `brk` and the next
/// responses grow it again, so `recv` faults in fresh zeroed pages: measured, about 1.7
/// page faults per proxied 64 KiB response, none with this call, and about 6% less CPU
/// per such response (the median of 12 alternating runs). Small responses are unaffected.
/// The cost is up to 4 MiB of freed heap kept for reuse instead of returned.
fn tune_malloc() {
    // NOTE: this uses glibc's own adaptation instead of `mallopt`, which would need FFI:
    // freeing a chunk that malloc served with `mmap` sets the mmap threshold to that
    // chunk's size and the trim threshold to twice that (mallopt(3), M_MMAP_THRESHOLD),
    // unless the thresholds were set explicitly (`mallopt` or the `MALLOC_*_` variables),
    // which this then leaves alone. `black_box` keeps the compiler from eliding the pair.
    const PRIME: usize = 2 << 20;
    drop(std::hint::black_box(Vec::<u8>::with_capacity(PRIME)));
}

/// Gives the heap that closed connections freed back to the system: glibc returns freed
/// memory only from the top of its heap, and keeps the rest at the process's peak size.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn give_back_heap() {
    // SAFETY: `malloc_trim` takes no pointer and has no preconditions; glibc serializes it
    // with every other allocator call.
    #[expect(
        unsafe_code,
        reason = "the gateway's one FFI call: glibc has no safe way to return free heap pages"
    )]
    let released = unsafe { libc::malloc_trim(0) } != 0;
    tracing::debug!(released, "gave freed heap back to the system");
}

/// Other C libraries return freed memory themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back_heap() {}

/// The upstream the `--upstream`, `--lb`, health and discovery flags describe.
fn upstream(args: &Args) -> Result<Upstream, Box<dyn std::error::Error>> {
    let mut fixed = Vec::new();
    let mut discovered = Vec::new();
    for target in &args.upstreams {
        let endpoint: Endpoint = target.parse()?;
        let by_name = endpoint
            .authority()
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_err();
        match args.dns_refresh {
            Some(every) if by_name && endpoint.scheme() == &http::uri::Scheme::HTTP => {
                discovered.push(DnsDiscovery::new(target)?.interval(every));
            }
            _ => fixed.push(endpoint),
        }
    }
    let mut builder = match &args.lb {
        Lb::RoundRobin => Upstream::builder(fixed, RoundRobin::default()),
        Lb::Random => Upstream::builder(fixed, Random::default()),
        Lb::LeastRequest => Upstream::builder(fixed, LeastRequest::default()),
        Lb::Ewma => Upstream::builder(fixed, PeakEwma::default()),
        Lb::Hash(key) => Upstream::builder(fixed, ConsistentHash::new(key.clone())),
    };
    for dns in discovered {
        builder = builder.discover(dns);
    }
    if let Some(path) = &args.health_path {
        let check = HealthCheck::http(path)?
            .interval(args.health_interval)
            .jitter(args.health_interval / 10)
            .timeout(args.health_timeout)
            .healthy_threshold(args.healthy_threshold)
            .unhealthy_threshold(args.unhealthy_threshold);
        builder = builder.health_check(check);
    }
    if args.eject_after > 0 {
        builder = builder.outlier_detection(OutlierDetection::new(args.eject_after));
    }
    Ok(builder.slow_start(args.slow_start).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Command, String> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn flags_parse() {
        let Ok(Command::Run(a)) = parse_strs(&[
            "--listen",
            "0.0.0.0:9000",
            "--upstream",
            "a:1",
            "--upstream",
            "http://b:2",
            "--threads",
            "3",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--lb",
            "hash:cookie:sid",
        ]) else {
            panic!("valid flags");
        };
        assert_eq!(a.listen.port(), 9000);
        assert_eq!(a.upstreams, ["a:1", "http://b:2"]);
        assert_eq!(a.threads, Some(3));
        assert_eq!(a.trusted, ["10.0.0.0/8"]);
        assert!(matches!(a.lb, Lb::Hash(HashKey::Cookie(ref c)) if c == "sid"));
        for lb in [
            "round-robin",
            "random",
            "least-request",
            "ewma",
            "hash:client-ip",
            "hash:path",
            "hash:header:x-user",
        ] {
            assert!(Lb::parse(lb).is_ok(), "{lb}");
        }
    }

    #[test]
    fn health_flags_parse() {
        let Ok(Command::Run(a)) = parse_strs(&[
            "--health-path",
            "/healthz",
            "--health-interval",
            "2.5",
            "--health-timeout",
            "0.5",
            "--healthy-threshold",
            "4",
            "--unhealthy-threshold",
            "6",
            "--eject-after",
            "0",
            "--slow-start",
            "30",
            "--dns-refresh",
            "1",
        ]) else {
            panic!("valid flags");
        };
        assert_eq!(a.health_path.as_deref(), Some("/healthz"));
        assert_eq!(a.health_interval, Duration::from_millis(2500));
        assert_eq!(a.health_timeout, Duration::from_millis(500));
        assert_eq!(
            (a.healthy_threshold.get(), a.unhealthy_threshold.get()),
            (4, 6)
        );
        assert_eq!(a.eject_after, 0);
        assert_eq!(a.slow_start, Duration::from_secs(30));
        assert_eq!(a.dns_refresh, Some(Duration::from_secs(1)));
        // Host names become DNS discovery, addresses stay fixed; both build.
        let Ok(Command::Run(mut a)) = parse_strs(&["--dns-refresh", "1"]) else {
            panic!("valid flags");
        };
        a.upstreams = vec!["127.0.0.1:1".into(), "localhost:2".into()];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let up = rt.block_on(async { upstream(&a).unwrap() });
        assert_eq!(up.endpoints().len(), 1, "only the address is there at once");
    }

    #[test]
    fn bad_flags_are_errors() {
        for bad in [
            &["--nope"][..],
            &["--listen", "localhost"],
            &["--threads", "0"],
            &["--threads"],
            &["--tls-cert", "c.pem"],
            &["--lb", "fastest"],
            &["--lb", "hash:header:bad header"],
            &["--lb", "hash:cookie:"],
            &["--health-timeout", "-1"],
            &["--healthy-threshold", "0"],
            &["--eject-after", "x"],
            &["--slow-start", "NaN"],
        ] {
            assert!(parse_strs(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(parse_strs(&["--help"]), Ok(Command::Help)));
    }
}
