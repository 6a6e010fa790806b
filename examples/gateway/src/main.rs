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
//! With `--config FILE` it serves what a YAML file describes (listener, upstreams, routes;
//! see `docs/config.md` and `gateway.example.yaml`); `--check FILE` only validates
//! one, like `nginx -t`. A mistake in either is reported with its file, line, column and
//! key path, and the process exits with 2 before binding anything.
//!
//! ```text
//! cargo run --release -p example-gateway -- --config examples/gateway/gateway.example.yaml
//! ```
//!
//! With `--upstream URL` (repeatable) it proxies every path to the given upstreams, like
//! a quick-start reverse proxy, with a balancer, health checks and DNS discovery to taste
//! (the flags are a one-route config):
//!
//! ```text
//! cargo run --release -p example-gateway -- --listen 0.0.0.0:8080 \
//!     --upstream http://10.0.0.1:8080 --upstream http://10.0.0.2:8080 \
//!     --lb least-request --health-path /healthz --slow-start 30
//! ```

mod demo;
mod fields;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use gateway_core::RescueLayer;
use gateway_core::client_ip::SetClientIpLayer;
use gateway_core::metrics::Metrics;
use gateway_core::purge::Purgers;
use gateway_core::registry::Registry;
use gateway_middleware::access_log::{AccessLog, LogFormat, QueryLog};
use gateway_middleware::observe::ObserveLayer;
use gateway_middleware::otlp::OtlpExporter;
use gateway_middleware::request_span::RequestSpanLayer;
use gateway_middleware::trace_context::TraceContextLayer;
use gateway_proxy::admin::Admin;
use gateway_proxy::config::{
    self, AccessLogConfig, AccessLogFormat, AdminConfig, Balancer, Cidr, Config, ConfigError,
    EndpointConfig, HashOn, HealthCheckConfig, Located, MatchConfig, OtlpConfig, Outlier, Period,
    QueryLogging, RouteConfig, ServerConfig, SpanLevel, SpanMode, TlsFiles, TracingConfig,
    UpstreamConfig, Url,
};
use gateway_proxy::server::Readiness;
use gateway_proxy::{HttpClient, Server};
use tower::ServiceBuilder;
use tower::util::Either;

const HELP: &str = "\
gateway: an API gateway built from gateway-core and gateway-proxy

USAGE:
    gateway [OPTIONS]
    gateway --config FILE
    gateway --check FILE

With neither --config nor --upstream, starts a demo upstream and routes /api/* to it.

OPTIONS:
    --config FILE          serve what the YAML file FILE describes (listener,
                           upstreams, routes); the flags below are then not used
    --check FILE           validate FILE and exit: 0 when it is valid, 2 when not
    --watch SECS           with --config, look for changes to FILE every SECS; 0
                           reloads on SIGHUP only [default: 0.5]
    --listen ADDR          address to listen on [default: 127.0.0.1:8080]
    --upstream URL         proxy every path to URL (http://host:port, https://host,
                           or host:port); repeat for more endpoints, balanced by --lb
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
    --admin ADDR           serve /metrics, /healthz, /readyz and /status on ADDR
                           (without --config; the file has an `admin:` section);
                           `off` for none [default: 127.0.0.1:9901 for the demo,
                           off with --upstream]
    --admin-token TOKEN    require `Authorization: Bearer TOKEN` on the admin listener
    --access-log TARGET    one JSON line per request to `stdout`, `stderr` or a file
                           (reopened on SIGUSR1), or `off` (without --config; the
                           file has an `access_log:` section) [default: stdout for
                           the demo, off with --upstream]
    --tracing on|off       W3C trace context continued or started (10% of new
                           traces sampled) and sent upstream, and a `request` span
                           (method, path, route, upstream, trace id on every log
                           line it causes) for sampled requests (without --config:
                           the file has a `tracing:` section) [default: on]
    --otlp URL             export a span per sampled request to an OpenTelemetry
                           collector over OTLP/HTTP, e.g.
                           http://127.0.0.1:4318/v1/traces (needs --tracing on;
                           without --config) [default: off]
    -h, --help             print this help

Stops gracefully on Ctrl-C or SIGTERM. Logs go to stderr; set RUST_LOG to tune them.
";

#[derive(Debug)]
struct Args {
    config: Option<PathBuf>,
    /// How often the config file is looked at; `None`: on SIGHUP only.
    watch: Option<Duration>,
    listen: String,
    upstreams: Vec<String>,
    lb: Balancer,
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
    /// `--admin`: `None` = not given (the mode's default), `Some(None)` = off.
    admin: Option<Option<String>>,
    admin_token: Option<String>,
    /// `--access-log`: `None` = not given (the mode's default), `Some(None)` = off.
    access_log: Option<Option<String>>,
    tracing: bool,
    /// `--otlp`: the collector's traces endpoint.
    otlp: Option<http::Uri>,
}

/// The `--lb` choice, as the config file spells it.
fn balancer(v: &str) -> Result<Balancer, String> {
    let bad = || format!("--lb: `{v}` is not a balancer");
    Ok(match v {
        "round-robin" => Balancer::RoundRobin,
        "random" => Balancer::Random,
        "least-request" => Balancer::LeastRequest,
        "ewma" => Balancer::Ewma,
        "hash:client-ip" => Balancer::Hash(HashOn::ClientIp),
        "hash:path" => Balancer::Hash(HashOn::Path),
        _ => match v.strip_prefix("hash:").and_then(|k| k.split_once(':')) {
            Some(("header", name)) if http::header::HeaderName::try_from(name).is_ok() => {
                Balancer::Hash(HashOn::Header(name.to_owned()))
            }
            Some(("cookie", name)) if !name.is_empty() => {
                Balancer::Hash(HashOn::Cookie(name.to_owned()))
            }
            _ => return Err(bad()),
        },
    })
}

/// What the command line asked for.
enum Command {
    Run(Box<Args>),
    Check(PathBuf),
    Help,
}

fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut args = Args {
        config: None,
        watch: Some(RELOAD_POLL),
        listen: "127.0.0.1:8080".to_owned(),
        upstreams: Vec::new(),
        lb: Balancer::RoundRobin,
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
        admin: None,
        admin_token: None,
        access_log: None,
        tracing: true,
        otlp: None,
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
            Long("config") => args.config = Some(value(&mut parser)?.into()),
            Long("check") => return Ok(Command::Check(value(&mut parser)?.into())),
            Long("watch") => {
                let every = secs("watch", &value(&mut parser)?)?;
                args.watch = (!every.is_zero()).then_some(every);
            }
            Long("listen") => {
                let v = value(&mut parser)?;
                if !config::is_address(&v) {
                    return Err(format!(
                        "--listen: `{v}` is not an address like 127.0.0.1:8080 or localhost:8080"
                    ));
                }
                args.listen = v;
            }
            Long("upstream") => args.upstreams.push(value(&mut parser)?),
            Long("lb") => args.lb = balancer(&value(&mut parser)?)?,
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
            Long("admin") => {
                let v = value(&mut parser)?;
                args.admin = Some(if v == "off" {
                    None
                } else if config::is_address(&v) {
                    Some(v)
                } else {
                    return Err(format!(
                        "--admin: `{v}` is not an address like 127.0.0.1:9901, nor `off`"
                    ));
                });
            }
            Long("admin-token") => {
                let v = value(&mut parser)?;
                if v.is_empty() {
                    return Err("--admin-token: the token is empty".into());
                }
                args.admin_token = Some(v);
            }
            Long("access-log") => {
                let v = value(&mut parser)?;
                if v.trim().is_empty() {
                    return Err("--access-log: say `stdout`, `stderr`, a file, or `off`".into());
                }
                args.access_log = Some((v != "off").then_some(v));
            }
            Long("tracing") => {
                args.tracing = match value(&mut parser)?.as_str() {
                    "on" => true,
                    "off" => false,
                    v => return Err(format!("--tracing: `{v}` is neither `on` nor `off`")),
                };
            }
            Long("otlp") => {
                let v = value(&mut parser)?;
                args.otlp = Some(config::http_url(&v).map_err(|e| format!("--otlp: {e}"))?);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if args.tls_cert.is_some() != args.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    if args.config.is_some() && (args.admin.is_some() || args.admin_token.is_some()) {
        return Err("--admin goes without --config: the file has an `admin:` section".into());
    }
    if args.config.is_some() && (args.access_log.is_some() || !args.tracing || args.otlp.is_some())
    {
        return Err(
            "--access-log, --tracing and --otlp go without --config: the file has `access_log:` and `tracing:` sections"
                .into(),
        );
    }
    if args.otlp.is_some() && !args.tracing {
        return Err("--otlp needs --tracing on: a span's ids are its trace context".into());
    }
    if args.config.is_some() && !args.upstreams.is_empty() {
        return Err(
            "--config and --upstream do not go together: the file has the upstreams".into(),
        );
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
        Ok(Command::Check(file)) => return check(&file),
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
        .fmt_fields(fields::Fields)
        // Colour codes only for a person at a terminal, never into a file or a collector.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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

/// `--check FILE`: whether the file would load, as the exit code says.
fn check(file: &std::path::Path) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let checked = runtime.map_err(|e| e.to_string()).and_then(|rt| {
        // Built (not served) inside a runtime: upstreams start their checks as they are built.
        rt.block_on(async {
            let name = file.display().to_string();
            let registry =
                plugins(None, None).map_err(|(Failure::Config(e) | Failure::Runtime(e))| e)?;
            config::read(file, &registry)
                .and_then(|c| config::build(&name, &c))
                .map_err(|e| e.to_string())
        })
    });
    match checked {
        Ok(_) => {
            println!("{}: valid", file.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("gateway: error: {err}");
            ExitCode::from(2)
        }
    }
}

/// A line on stdout that a closed stdout (`gateway | head -1`, a parent that read the
/// address and went) does not turn into a panic: the gateway serves on.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

async fn run(args: Args) -> Result<(), Failure> {
    let invalid = |e: ConfigError| Failure::Config(e.to_string());
    let mut demo = false;
    let metrics = Metrics::new();
    // The config's caches list themselves here; the admin listener purges them.
    let purgers = Purgers::new();
    let (gateway, live) = if let Some(file) = &args.config {
        // A config file is served live: reloaded when it changes and on SIGHUP.
        let (live, gateway) =
            config::Live::load(file, plugins(Some(&metrics), Some(&purgers))?).map_err(invalid)?;
        (gateway, Some(live))
    } else {
        let (name, config) = if args.upstreams.is_empty() {
            let addr = demo::start()
                .await
                .map_err(|e| Failure::Runtime(format!("cannot start the demo upstream: {e}")))?;
            demo = true;
            ("the demo", demo_config(&args, &addr.to_string()))
        } else {
            ("the command line", flags_config(&args))
        };
        (config::build(name, &config).map_err(invalid)?, None)
    };

    gateway.inventory.register(&metrics);
    let access_log = gateway
        .access_log
        .as_ref()
        .map(|config| start_access_log(config, &metrics))
        .transpose()?;
    let readiness = Readiness::new();
    let admin = match &gateway.admin {
        Some(admin) => bind_admin(admin, demo && args.admin.is_none()).await?,
        None => None,
    };

    let server = Server::bind(gateway.listen.as_str())
        .await
        .map_err(|e| Failure::Config(format!("cannot listen on {}: {e}", gateway.listen)))?;
    let local = server
        .local_addr()
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    let scheme = if gateway.is_tls() { "https" } else { "http" };
    let server = gateway
        .configure(server)
        .metrics(&metrics)
        .readiness(&readiness)
        .shrink_after_close(SHRINK_CROWD, give_back_heap);

    say!("gateway listening on {scheme}://{local}");
    if let Some((server, _)) = &admin
        && let Ok(addr) = server.local_addr()
    {
        say!("admin on http://{addr}/ (/metrics, /status, /readyz, /healthz)");
    }
    if demo {
        say!("try:");
        say!("  curl -i {scheme}://{local}/api/hello");
        say!("  curl -i {scheme}://{local}/api/headers -H 'X-Forwarded-For: 6.6.6.6'");
        say!("  curl -i {scheme}://{local}/api/%2e%2e%2fadmin");
    } else if let Some(file) = &args.config {
        let when = if args.watch.is_some() {
            "when it changes, and on SIGHUP"
        } else {
            "on SIGHUP"
        };
        say!("serving {} (reloaded {when})", file.display());
    } else {
        say!("proxying every path to {}", args.upstreams.join(", "));
    }

    let app = match live {
        Some(live) => {
            tokio::spawn(live.clone().watch(args.watch));
            Either::Left(live.router())
        }
        None => Either::Right(gateway.router),
    };
    // The admin listener serves on while the gateway drains (its `/readyz` says so), and
    // stops after it.
    let (stop_admin, admin_stops) = tokio::sync::oneshot::channel::<()>();
    let admin_task = admin.map(|(admin_server, token)| {
        let mut service =
            Admin::builder(&metrics, &gateway.inventory, &readiness).purgers(&purgers);
        if let Some(token) = token {
            service = service.token(token);
        }
        tokio::spawn(admin_server.serve_with_shutdown(service.build(), async {
            let _ = admin_stops.await;
        }))
    });
    if let Some(log) = &access_log {
        tokio::spawn(reopen_on_sigusr1(log.clone()));
    }
    let tracing_config = gateway.tracing.clone().unwrap_or(TracingConfig {
        spans: SpanMode::Off,
        trace_context: false,
        ..TracingConfig::default()
    });
    let otlp = tracing_config
        .otlp
        .as_ref()
        .map(|config| start_otlp(config, &metrics))
        .transpose()?;
    // What observes requests, once for all of its parts: metrics when there is an admin
    // listener to serve them, the access log, OTLP export, the request spans (with none of
    // them, requests pass through it).
    let mut observe = ObserveLayer::new();
    if admin_task.is_some() {
        observe = observe.metrics(&metrics);
    }
    if let Some(log) = &access_log {
        observe = observe.access_log(log);
    }
    if let Some(otlp) = &otlp {
        observe = observe.otlp(otlp);
    }
    // Outermost first; a layer the config leaves out is `off`, and passes requests
    // through: the stack's type is the same whatever the config says.
    let stack = ServiceBuilder::new()
        .layer(RescueLayer::new())
        .layer(SetClientIpLayer::new(gateway.trusted.clone()))
        // Trace context outside the observing layer, which reads the trace from it.
        .layer(if tracing_config.trace_context {
            TraceContextLayer::new().sample_ratio(tracing_config.sample_ratio)
        } else {
            TraceContextLayer::off()
        })
        .layer(observe.request_span(request_spans(&tracing_config)))
        .service(app);
    let served = server.serve(stack).await;
    drop(stop_admin);
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    if let Some(log) = access_log {
        // The last lines, before the process ends.
        let _ = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(2))).await;
    }
    if let Some(otlp) = otlp {
        otlp.flush(Duration::from_secs(2)).await;
    }
    served.map_err(|e| Failure::Runtime(e.to_string()))?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds the admin listener `admin` describes, with its token. In the demo (`optional`),
/// an address in use is a warning, not a failure: the demo runs on without it.
async fn bind_admin(
    admin: &AdminConfig,
    optional: bool,
) -> Result<Option<(Server, Option<String>)>, Failure> {
    let server = match Server::bind(admin.listen.as_str()).await {
        Ok(server) => server,
        Err(err) if optional => {
            tracing::warn!(addr = %admin.listen, error = %err, "no admin listener");
            return Ok(None);
        }
        Err(err) => {
            return Err(Failure::Config(format!(
                "cannot listen on {} (admin): {err}",
                admin.listen
            )));
        }
    };
    if admin.token.is_none()
        && server
            .local_addr()
            .is_ok_and(|addr| !addr.ip().is_loopback())
    {
        tracing::warn!(
            addr = %admin.listen,
            "the admin listener is reachable beyond this host and has no token"
        );
    }
    Ok(Some((server, admin.token.clone())))
}

/// The admin section the flags give.
fn admin_config(args: &Args, default: Option<&str>) -> Option<AdminConfig> {
    let listen = match &args.admin {
        Some(listen) => listen.clone()?,
        None => default?.to_owned(),
    };
    Some(AdminConfig {
        listen,
        token: args.admin_token.clone(),
    })
}

/// The access-log section the flags give.
fn access_log_config(args: &Args, default: Option<&str>) -> Option<AccessLogConfig> {
    let to = match &args.access_log {
        Some(to) => to.clone()?,
        None => default?.to_owned(),
    };
    Some(AccessLogConfig {
        to,
        ..AccessLogConfig::default()
    })
}

/// Starts the access log `config` describes, counting its losses in `metrics`.
fn start_access_log(config: &AccessLogConfig, metrics: &Metrics) -> Result<AccessLog, Failure> {
    let builder = AccessLog::builder()
        .format(match config.format {
            AccessLogFormat::Json => LogFormat::Json,
            AccessLogFormat::Combined => LogFormat::Combined,
        })
        .query(match config.query {
            QueryLogging::Omit => QueryLog::Omit,
            QueryLogging::Redact => QueryLog::Redact,
            QueryLogging::Keep => QueryLog::Keep,
        })
        .capacity(config.queue)
        .metrics(metrics);
    let builder = match config.to.as_str() {
        "stdout" => builder.stdout(),
        "stderr" => builder.stderr(),
        path => builder.file(path),
    };
    builder
        .start()
        .map_err(|e| Failure::Config(format!("cannot open the access log {}: {e}", config.to)))
}

/// Reopens `log`'s file on every SIGUSR1 (what logrotate's `postrotate` sends).
async fn reopen_on_sigusr1(log: AccessLog) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut signals) = signal(SignalKind::user_defined1()) else {
            tracing::warn!("cannot listen for SIGUSR1: the access log is not reopened on it");
            return;
        };
        while signals.recv().await.is_some() {
            log.reopen();
        }
    }
    #[cfg(not(unix))]
    drop(log);
}

/// The request spans the `tracing` section asks for (`off` for none).
fn request_spans(config: &TracingConfig) -> RequestSpanLayer {
    let layer = RequestSpanLayer::new().level(match config.span_level {
        SpanLevel::Error => tracing::Level::ERROR,
        SpanLevel::Warn => tracing::Level::WARN,
        SpanLevel::Info => tracing::Level::INFO,
        SpanLevel::Debug => tracing::Level::DEBUG,
        SpanLevel::Trace => tracing::Level::TRACE,
    });
    match config.spans {
        SpanMode::Off => RequestSpanLayer::off(),
        // NOTE: without trace context there is no sampling decision: every request.
        SpanMode::Sampled if config.trace_context => layer.sampled_only(),
        SpanMode::Sampled | SpanMode::All => layer,
    }
}

/// The plugins a config file may name: the built-in layers (a gateway of your own adds its
/// plugins here, each with one `Registry::plugin` call), lent the gateway's metrics, an
/// HTTP client of their own (for a JWKS URL or an authorization service) and the list the
/// caches go in for the admin listener's purge.
fn plugins(metrics: Option<&Metrics>, purgers: Option<&Purgers>) -> Result<Registry, Failure> {
    let mut registry = Registry::new();
    gateway_middleware::config::register(&mut registry);
    let client = HttpClient::builder()
        .build()
        .map_err(|e| Failure::Runtime(format!("cannot make the plugins' HTTP client: {e}")))?;
    registry.client(client);
    if let Some(metrics) = metrics {
        registry.metrics(metrics);
    }
    if let Some(purgers) = purgers {
        registry.purgers(purgers);
    }
    Ok(registry)
}

/// The server settings the flags give.
fn server_config(args: &Args) -> ServerConfig {
    ServerConfig {
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            }),
            _ => None,
        },
        trusted_proxies: args.trusted.iter().cloned().map(Cidr).collect(),
        drain_timeout: Some(Period(args.drain)),
        ..ServerConfig::default()
    }
}

/// One route, every path, to `upstream`.
fn route(id: &str, prefix: &str, upstream: &str) -> RouteConfig {
    RouteConfig {
        id: Some(id.to_owned()),
        matches: MatchConfig {
            path: Some(prefix.to_owned()),
            ..MatchConfig::default()
        },
        upstream: Some(Located::new(upstream.to_owned())),
        redirect: None,
        respond: None,
        strip_prefix: None,
        replace_prefix: None,
        host: None,
        timeouts: config::RouteTimeouts::default(),
        connect_retries: None,
        plugins: Vec::new(),
    }
}

/// The demo: `/api/...` to the demo upstream at `addr`, with the prefix stripped.
fn demo_config(args: &Args, addr: &str) -> Config {
    let upstream = UpstreamConfig {
        endpoints: vec![EndpointConfig::Url(Url(addr.to_owned()))],
        balancer: Balancer::RoundRobin,
        health_check: None,
        outlier_detection: Outlier::default(),
        slow_start: None,
        dns_refresh: None,
        tls: None,
    };
    let mut api = route("api", "/api", "demo");
    api.strip_prefix = Some("/api".to_owned());
    Config {
        listen: args.listen.clone(),
        server: server_config(args),
        upstreams: BTreeMap::from([("demo".to_owned(), upstream)]),
        routes: vec![Located::new(api)],
        admin: admin_config(args, Some(AdminConfig::DEFAULT_LISTEN)),
        access_log: access_log_config(args, Some("stdout")),
        tracing: tracing_config(args),
    }
}

/// The one-route config the `--upstream`, `--lb`, health and discovery flags describe.
fn flags_config(args: &Args) -> Config {
    let health_check = args.health_path.as_ref().map(|path| HealthCheckConfig {
        path: path.clone(),
        interval: Some(Period(args.health_interval)),
        timeout: Some(Period(args.health_timeout)),
        healthy_threshold: Some(args.healthy_threshold),
        unhealthy_threshold: Some(args.unhealthy_threshold),
    });
    let upstream = UpstreamConfig {
        endpoints: args
            .upstreams
            .iter()
            .map(|u| EndpointConfig::Url(Url(u.clone())))
            .collect(),
        balancer: args.lb.clone(),
        health_check,
        outlier_detection: match args.eject_after {
            0 => Outlier::Off,
            n => Outlier::On {
                consecutive_failures: n,
            },
        },
        slow_start: (!args.slow_start.is_zero()).then_some(Period(args.slow_start)),
        dns_refresh: args.dns_refresh.map(Period),
        tls: None,
    };
    Config {
        listen: args.listen.clone(),
        server: server_config(args),
        upstreams: BTreeMap::from([("default".to_owned(), upstream)]),
        routes: vec![Located::new(route("default", "/", "default"))],
        admin: admin_config(args, None),
        access_log: access_log_config(args, None),
        tracing: tracing_config(args),
    }
}

/// The tracing section the flags give.
fn tracing_config(args: &Args) -> Option<TracingConfig> {
    args.tracing.then(|| TracingConfig {
        otlp: args.otlp.clone().map(OtlpConfig::new),
        ..TracingConfig::default()
    })
}

/// Starts the OTLP exporter `config` describes, with a client of its own, counting what
/// it exports and loses in `metrics`.
fn start_otlp(config: &OtlpConfig, metrics: &Metrics) -> Result<OtlpExporter, Failure> {
    let invalid = |e: String| Failure::Config(format!("tracing.otlp: {e}"));
    let client = HttpClient::builder()
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let mut builder = OtlpExporter::builder(config.endpoint.clone())
        .service_name(&config.service_name)
        .capacity(config.queue)
        .batch_size(config.batch)
        .batch_delay(config.batch_delay.into())
        .timeout(config.timeout.into())
        .metrics(metrics);
    for (name, value) in &config.headers {
        builder = builder.header(name.clone(), value.clone());
    }
    builder.start(client).map_err(|e| invalid(e.to_string()))
}

/// How often a served config file is looked at for changes.
const RELOAD_POLL: Duration = Duration::from_millis(500);

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
        assert_eq!(a.listen, "0.0.0.0:9000");
        assert_eq!(a.upstreams, ["a:1", "http://b:2"]);
        assert_eq!(a.threads, Some(3));
        assert_eq!(a.trusted, ["10.0.0.0/8"]);
        assert!(matches!(a.lb, Balancer::Hash(HashOn::Cookie(ref c)) if c == "sid"));
        for lb in [
            "round-robin",
            "random",
            "least-request",
            "ewma",
            "hash:client-ip",
            "hash:path",
            "hash:header:x-user",
        ] {
            assert!(balancer(lb).is_ok(), "{lb}");
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
        // The flags are a one-route config, which builds (host names become DNS discovery).
        let Ok(Command::Run(mut a)) =
            parse_strs(&["--dns-refresh", "1", "--listen", "localhost:0"])
        else {
            panic!("valid flags");
        };
        a.upstreams = vec!["127.0.0.1:1".into(), "localhost:2".into()];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let built = rt.block_on(async { config::build("flags", &flags_config(&a)) });
        assert_eq!(built.map(|g| g.listen).ok().as_deref(), Some("localhost:0"));
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
            &["--listen", ":80"],
            &["--config", "gateway.yaml", "--upstream", "a:1"],
        ] {
            assert!(parse_strs(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(parse_strs(&["--help"]), Ok(Command::Help)));
        assert!(matches!(
            parse_strs(&["--check", "g.yaml"]),
            Ok(Command::Check(_))
        ));
        let err = parse_strs(&["--lb", "fastest"]).err().unwrap_or_default();
        assert!(!err.contains("--help"), "said once, by main: {err}");
    }
}
