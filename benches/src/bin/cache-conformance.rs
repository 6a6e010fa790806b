//! The HTTP cache conformance suite (`gateway_benches::conformance`) run against the
//! gateway's cache, nginx's `proxy_cache` and HAProxy's cache, side by side.
//!
//! `bash benches/conformance.sh` (installs nginx and HAProxy when missing), or
//! `cargo run --release -p gateway-benches --bin cache-conformance -- --help`.

#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};

use gateway_benches::arg_value;
use gateway_benches::conformance::{self, Case, Level, Origin, Outcome};
use gateway_benches::process::{
    free_addr, nginx_temp_paths, spawn_haproxy, spawn_listening, spawn_nginx, wait_accepting,
};

const HELP: &str = "\
cache-conformance: RFC 9111 cases against caching proxies (see benches/conformance.sh)

OPTIONS:
    --gateway PATH     the gateway binary [default: target/release/gateway]
    --targets LIST     comma-separated, of gateway, nginx, haproxy [default: all three]
    --out PATH         where to write the Markdown table too [default: none]
";

/// A proxy under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gateway,
    Nginx,
    Haproxy,
}

impl Kind {
    const fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }
}

struct Opts {
    gateway: PathBuf,
    targets: Vec<Kind>,
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    gateway_benches::bin_main("cache-conformance", HELP, parse, |opts| async move {
        run(&opts).await.map(|()| ExitCode::SUCCESS)
    })
}

fn parse() -> Result<Option<Opts>, String> {
    use lexopt::prelude::*;
    let mut opts = Opts {
        gateway: "target/release/gateway".into(),
        targets: vec![Kind::Gateway, Kind::Nginx, Kind::Haproxy],
        out: None,
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("help") | Short('h') => return Ok(None),
            Long("gateway") => opts.gateway = arg_value(&mut parser)?.into(),
            Long("out") => opts.out = Some(arg_value(&mut parser)?.into()),
            Long("targets") => {
                opts.targets = arg_value(&mut parser)?
                    .split(',')
                    .map(|name| match name {
                        "gateway" => Ok(Kind::Gateway),
                        "nginx" => Ok(Kind::Nginx),
                        "haproxy" => Ok(Kind::Haproxy),
                        other => Err(format!("--targets: no target `{other}`")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(Some(opts))
}

async fn run(opts: &Opts) -> io::Result<()> {
    let origin = Origin::start().await?;
    let dir = std::env::temp_dir().join(format!("cache-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cases = conformance::cases();
    let mut columns = Vec::new();
    for &kind in &opts.targets {
        eprintln!("cache-conformance: {}", kind.name());
        let target = start(kind, opts, origin.addr(), &dir)?;
        wait_accepting(target.addr)?;
        let outcomes = conformance::run(target.addr, &origin, kind.name(), &cases).await;
        drop(target);
        columns.push((kind, outcomes));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let table = table(&cases, &columns);
    print!("{table}");
    if let Some(out) = &opts.out {
        std::fs::write(out, &table)?;
    }
    Ok(())
}

/// The results as Markdown: the totals by level, each case, and why the failed ones failed.
fn table(cases: &[Case], columns: &[(Kind, Vec<Outcome>)]) -> String {
    let mut out = String::from("| passed |");
    for (kind, _) in columns {
        let _ = write!(out, " {} |", kind.name());
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    for level in [Level::Must, Level::Should, Level::May] {
        let _ = write!(out, "| {level} |");
        for (_, outcomes) in columns {
            let (passed, of) = conformance::tally(cases, outcomes)[level as usize];
            let _ = write!(out, " {passed} / {of} |");
        }
        out.push('\n');
    }
    out.push_str("\n| case | level |");
    for (kind, _) in columns {
        let _ = write!(out, " {} |", kind.name());
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(columns.len()));
    out.push('\n');
    for (i, case) in cases.iter().enumerate() {
        let _ = write!(out, "| `{}` | {} |", case.id, case.level);
        for (_, outcomes) in columns {
            out.push_str(match &outcomes[i] {
                Outcome::Pass => " pass |",
                Outcome::Fail(_) => " **fail** |",
                Outcome::Error(_) => " **error** |",
            });
        }
        out.push('\n');
    }
    out.push('\n');
    for (kind, outcomes) in columns {
        for (case, outcome) in cases.iter().zip(outcomes) {
            if let Outcome::Fail(why) | Outcome::Error(why) = outcome {
                let _ = writeln!(
                    out,
                    "- {} `{}` ({}): {why}",
                    kind.name(),
                    case.id,
                    case.title
                );
            }
        }
    }
    out
}

/// A running proxy, killed when dropped.
struct Target {
    addr: SocketAddr,
    child: Child,
}

impl Drop for Target {
    /// SIGTERM, which nginx's master passes on to its workers (SIGKILL would leave them).
    fn drop(&mut self) {
        let stopped = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|status| status.success());
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn start(kind: Kind, opts: &Opts, origin: SocketAddr, dir: &Path) -> io::Result<Target> {
    let dir = dir.join(kind.name());
    std::fs::create_dir_all(&dir)?;
    match kind {
        Kind::Gateway => start_gateway(&opts.gateway, origin, &dir),
        Kind::Nginx => start_nginx(origin, &dir),
        Kind::Haproxy => start_haproxy(origin, &dir),
    }
}

/// The gateway with a memory cache on its one route.
fn start_gateway(program: &Path, origin: SocketAddr, dir: &Path) -> io::Result<Target> {
    let config = dir.join("gateway.yaml");
    std::fs::write(&config, conformance::gateway_config(origin))?;
    let (child, addr) = spawn_listening(
        Command::new(program)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "error"),
        program,
    )?;
    Ok(Target { addr, child })
}

/// nginx's `proxy_cache` as its documentation tunes it for a shared cache: the host in
/// the key, revalidation with conditional requests, stale answers while updating and on
/// errors (which also turns on its `stale-while-revalidate` and `stale-if-error`), one
/// request filling an entry at a time.
fn start_nginx(origin: SocketAddr, dir: &Path) -> io::Result<Target> {
    let addr = free_addr()?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    {temp_paths}
    proxy_cache_path {dir}/cache keys_zone=pages:16m max_size=64m;
    server {{
        listen {addr};
        location / {{
            proxy_pass http://{origin};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_cache pages;
            proxy_cache_key $scheme$host$request_uri;
            proxy_cache_revalidate on;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            proxy_cache_background_update on;
            proxy_cache_lock on;
        }}
    }}
}}
",
            dir = dir.display(),
            temp_paths = nginx_temp_paths(dir),
        ),
    )?;
    let child = spawn_nginx(Command::new("nginx"), dir, &conf)?;
    Ok(Target { addr, child })
}

/// HAProxy's cache with `Vary` processing on.
fn start_haproxy(origin: SocketAddr, dir: &Path) -> io::Result<Target> {
    let addr = free_addr()?;
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind {addr}
    default_backend be
backend be
    http-request cache-use pages
    http-response cache-store pages
    server origin {origin}
cache pages
    total-max-size 64
    max-object-size 1048576
    max-age 3600
    process-vary on
"
        ),
    )?;
    let child = spawn_haproxy(Command::new("haproxy"), &conf)?;
    Ok(Target { addr, child })
}
