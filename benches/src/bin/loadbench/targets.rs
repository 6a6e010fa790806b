//! The proxies under test, each started pinned to the proxy core with one worker, and what
//! `/proc` says about them.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use gateway_benches::process::{self, free_addr, wait_accepting};
use http::HeaderValue;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: u64 = 100;

/// Which proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Gateway,
    /// Another build of the gateway (`--baseline`), for A/B runs of a change.
    Baseline,
    /// A bare hyper + hyper-util proxy (`hyper-proxy`): the floor of a proxy on hyper.
    Hyper,
    Nginx,
    Haproxy,
    /// nginx with `proxy_cache` on (the origin's answers kept for an hour): its hit, to
    /// compare with its proxied request as `cached` is with `gateway`.
    NginxCached,
    /// HAProxy with its cache on, like `NginxCached`.
    HaproxyCached,
    /// `hand-gateway`: the route of `benches/ab-config.yaml` built by hand in code, to
    /// compare with the gateway serving that file (`--config`).
    Hand,
    /// The gateway with everything observing on: metrics (an admin listener), a JSON
    /// access log (to `/dev/null`: formatted, queued and written), trace context, and
    /// request spans under an `info` log filter; against `Gateway`, which has them off.
    Observed,
    /// The gateway with the whole policy stack on the route: JWT (ES256, verified keys
    /// cached), a rate limit (never reached), retries, a circuit breaker, and the observing
    /// of `Observed`; every request carries a bearer token.
    Full,
    /// The gateway with a cache on the route (the origin's responses made cacheable for
    /// an hour): after the first request of each path, every request is a hit.
    Cached,
    /// The `cached` target's stack with the origin's answers made `no-store`: every
    /// request goes through the cache layer to the origin (a proxied request on the same
    /// route, for the hit to be compared with).
    CacheMiss,
}

/// A running proxy.
pub(crate) struct Target {
    pub(crate) kind: Kind,
    pub(crate) addr: SocketAddr,
    /// The `Authorization` every request to it carries, if it wants one.
    pub(crate) auth: Option<HeaderValue>,
    child: Child,
}

/// How to start the targets.
pub(crate) struct Setup {
    pub(crate) gateway: PathBuf,
    pub(crate) baseline: Option<PathBuf>,
    /// The `hyper-proxy` binary.
    pub(crate) hyper: PathBuf,
    /// The `hand-gateway` binary.
    pub(crate) hand: PathBuf,
    /// A config file for the gateway (and the baseline) to serve instead of `--upstream`.
    pub(crate) config: Option<PathBuf>,
    pub(crate) origin: SocketAddr,
    /// `taskset -c <core>` prefix for the proxies, when taskset exists.
    pub(crate) core: Option<String>,
    pub(crate) dir: PathBuf,
}

impl Kind {
    /// The targets run by default.
    pub(crate) const ALL: [Self; 5] = [
        Self::Gateway,
        Self::Baseline,
        Self::Hyper,
        Self::Nginx,
        Self::Haproxy,
    ];

    /// Every target, in the order of the table's columns.
    pub(crate) const KNOWN: [Self; 12] = [
        Self::Gateway,
        Self::Observed,
        Self::Full,
        Self::Cached,
        Self::CacheMiss,
        Self::Baseline,
        Self::Hand,
        Self::Hyper,
        Self::Nginx,
        Self::Haproxy,
        Self::NginxCached,
        Self::HaproxyCached,
    ];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Baseline => "baseline",
            Self::Hyper => "hyper",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
            Self::NginxCached => "nginx-cached",
            Self::HaproxyCached => "haproxy-cached",
            Self::Hand => "hand",
            Self::Observed => "observed",
            Self::Full => "full",
            Self::Cached => "cached",
            Self::CacheMiss => "cache-miss",
        }
    }
}

impl Setup {
    fn command(&self, program: &Path) -> Command {
        match &self.core {
            Some(core) => {
                let mut cmd = Command::new("taskset");
                cmd.arg("-c").arg(core).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Starts `kind` and waits until it accepts connections.
    pub(crate) fn start(&self, kind: Kind) -> io::Result<Target> {
        let target = match kind {
            Kind::Gateway | Kind::Observed => self.start_gateway(&self.gateway, kind)?,
            Kind::Baseline => match &self.baseline {
                Some(path) => self.start_gateway(path, kind)?,
                None => return Err(io::Error::other("the baseline target needs --baseline")),
            },
            Kind::Hyper => self.start_hyper()?,
            Kind::Nginx | Kind::NginxCached => self.start_nginx(kind)?,
            Kind::Haproxy | Kind::HaproxyCached => self.start_haproxy(kind)?,
            Kind::Full => self.start_full()?,
            Kind::Cached => self.start_cached(Kind::Cached, "max-age=3600")?,
            Kind::CacheMiss => self.start_cached(Kind::CacheMiss, "no-store")?,
            Kind::Hand => {
                let mut cmd = self.command(&self.hand);
                cmd.args(["--listen", "127.0.0.1:0", "--upstream"])
                    .arg(format!("http://{}", self.origin));
                spawn_listening(cmd, &self.hand, kind)?
            }
        };
        wait_accepting(target.addr)?;
        Ok(target)
    }

    fn start_gateway(&self, program: &Path, kind: Kind) -> io::Result<Target> {
        let mut cmd = self.command(program);
        cmd.args(["--threads", "1"]).env("RUST_LOG", "error");
        match &self.config {
            Some(file) => {
                cmd.arg("--config")
                    .arg(file)
                    .env("LOADBENCH_ORIGIN", format!("http://{}", self.origin));
            }
            None => {
                cmd.args(["--listen", "127.0.0.1:0", "--eject-after", "0"])
                    .arg("--upstream")
                    .arg(self.origin.to_string());
                if kind == Kind::Observed {
                    cmd.args(["--admin", "127.0.0.1:0", "--access-log", "/dev/null"])
                        .env("RUST_LOG", "info");
                } else {
                    cmd.args(["--tracing", "off"]);
                }
            }
        }
        spawn_listening(cmd, program, kind)
    }

    /// The gateway serving a config whose one route has the whole policy stack, and the
    /// bearer token its requests carry.
    fn start_full(&self) -> io::Result<Target> {
        const KEYS: &str = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../gateway-proxy/tests/support/keys/"
        );
        let config = format!(
            "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
access_log: {{ to: /dev/null }}
upstreams:
  origin: {{ endpoints: ['http://{origin}'], outlier_detection: off }}
routes:
  - id: api
    match: {{ path: / }}
    upstream: origin
    plugins:
      - jwt: {{ public_key_file: {KEYS}ec.pub.pem, algorithm: ES256 }}
      - rate-limit: {{ limits: [{{ requests: 1000000, per: 1s }}] }}
      - retry: {{ tries: 3 }}
      - circuit-breaker: {{ failure_rate: 0.5, min_calls: 20 }}
",
            origin = self.origin,
        );
        let path = self.dir.join("full.yaml");
        std::fs::write(&path, config)?;
        let pem = std::fs::read(format!("{KEYS}ec.pem"))?;
        let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).map_err(io::Error::other)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(io::Error::other)?
            .as_secs();
        let claims = serde_json::json!({ "sub": "loadbench", "iat": now, "exp": now + 86_400 });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &key,
        )
        .map_err(io::Error::other)?;
        let mut cmd = self.command(&self.gateway);
        cmd.args(["--threads", "1", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info");
        let mut target = spawn_listening(cmd, &self.gateway, Kind::Full)?;
        target.auth =
            Some(HeaderValue::try_from(format!("Bearer {token}")).map_err(io::Error::other)?);
        Ok(target)
    }

    /// The gateway with a cache on the route, the origin's answers given `cache_control`.
    fn start_cached(&self, kind: Kind, cache_control: &str) -> io::Result<Target> {
        // The `headers` layer sits inside the cache: it sets the origin's answers'
        // `Cache-Control` before the cache judges them.
        let config = format!(
            "listen: 127.0.0.1:0
upstreams:
  origin: {{ endpoints: ['http://{origin}'], outlier_detection: off }}
routes:
  - id: api
    match: {{ path: / }}
    upstream: origin
    plugins:
      - cache: {{ max_memory: 64MiB }}
      - headers: {{ response: {{ set: {{ cache-control: {cache_control} }} }} }}
",
            origin = self.origin,
        );
        let path = self.dir.join(format!("{}.yaml", kind.name()));
        std::fs::write(&path, config)?;
        let mut cmd = self.command(&self.gateway);
        cmd.args(["--threads", "1", "--config"])
            .arg(&path)
            .env("RUST_LOG", "error");
        spawn_listening(cmd, &self.gateway, kind)
    }

    fn start_hyper(&self) -> io::Result<Target> {
        let mut cmd = self.command(&self.hyper);
        cmd.args(["--listen", "127.0.0.1:0", "--upstream"])
            .arg(format!("http://{}", self.origin));
        spawn_listening(cmd, &self.hyper, Kind::Hyper)
    }

    fn start_nginx(&self, kind: Kind) -> io::Result<Target> {
        let addr = free_addr()?;
        let dir = self.dir.join(kind.name());
        std::fs::create_dir_all(&dir)?;
        // The origin's answers carry no `Cache-Control`: `proxy_cache_valid` keeps them.
        let cache = if kind == Kind::NginxCached {
            format!(
                "proxy_cache_path {}/cache keys_zone=pages:16m max_size=64m;
    proxy_cache pages;
    proxy_cache_valid 200 1h;",
                dir.display()
            )
        } else {
            String::new()
        };
        let conf = format!(
            "worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    {temp_paths}
    keepalive_requests 1000000;
    {cache}
    upstream origin {{
        server {origin};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen {addr} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
",
            dir = dir.display(),
            temp_paths = process::nginx_temp_paths(&dir),
            origin = self.origin,
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let child = process::spawn_nginx(self.command(Path::new("nginx")), &dir, &path)?;
        Ok(Target {
            kind,
            addr,
            auth: None,
            child,
        })
    }

    fn start_haproxy(&self, kind: Kind) -> io::Result<Target> {
        let addr = free_addr()?;
        let dir = self.dir.join(kind.name());
        std::fs::create_dir_all(&dir)?;
        // HAProxy stores only answers that say they may be: the origin's are given an hour.
        let (cache, use_cache) = if kind == Kind::HaproxyCached {
            (
                "cache pages
    total-max-size 64
    max-object-size 1048576
    max-age 3600
",
                "    http-request cache-use pages
    http-response set-header cache-control max-age=3600
    http-response cache-store pages
",
            )
        } else {
            ("", "")
        };
        let conf = format!(
            "global
    nbthread 1
    maxconn 9000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always
frontend fe
    bind {addr}
    default_backend be
backend be
{use_cache}    server origin {origin}
{cache}",
            origin = self.origin,
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, conf)?;
        let child = process::spawn_haproxy(self.command(Path::new("haproxy")), &path)?;
        Ok(Target {
            kind,
            addr,
            auth: None,
            child,
        })
    }
}

/// Spawns `cmd` (`program`, which prints where it listens) as the `kind` target.
fn spawn_listening(mut cmd: Command, program: &Path, kind: Kind) -> io::Result<Target> {
    let (child, addr) = process::spawn_listening(&mut cmd, program)?;
    Ok(Target {
        kind,
        addr,
        auth: None,
        child,
    })
}

impl Target {
    /// CPU time (user + system) of the proxy's process tree so far: the scheduler's
    /// count in nanoseconds of its live threads (`/proc/<pid>/task/*/schedstat`; a thread
    /// that ended takes its time with it), or, on a kernel without it, `/proc/<pid>/stat`'s
    /// ticks (10 ms each: coarse for a run of a few seconds).
    pub(crate) fn cpu(&self) -> io::Result<Duration> {
        static SCHEDSTAT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let pids = tree(self.child.id())?;
        if *SCHEDSTAT.get_or_init(|| Path::new("/proc/self/schedstat").exists()) {
            let nanos = pids
                .iter()
                .map(|pid| run_nanos(*pid))
                .sum::<io::Result<u64>>()?;
            return Ok(Duration::from_nanos(nanos));
        }
        let ticks = pids
            .iter()
            .map(|pid| stat_ticks(*pid))
            .sum::<io::Result<u64>>()?;
        Ok(Duration::from_millis(ticks * 1000 / TICKS_PER_SEC))
    }

    /// Resident memory of the proxy's process tree, in KiB.
    pub(crate) fn rss_kib(&self) -> io::Result<u64> {
        tree(self.child.id())?.iter().map(|pid| vm_rss(*pid)).sum()
    }
}

impl Drop for Target {
    /// Stops the proxy and its children (SIGKILL: nothing here is worth a graceful stop),
    /// also when the run fails half-way.
    fn drop(&mut self) {
        let pids = tree(self.child.id()).unwrap_or_default();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed nginx master leaves its worker behind.
        for pid in pids.into_iter().skip(1) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
    }
}

/// `pid` and its descendants.
fn tree(pid: u32) -> io::Result<Vec<u32>> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let task_dir = format!("/proc/{}/task", all[i]);
        if let Ok(tasks) = std::fs::read_dir(&task_dir) {
            for task in tasks.flatten() {
                if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                    all.extend(
                        children
                            .split_whitespace()
                            .filter_map(|c| c.parse::<u32>().ok()),
                    );
                }
            }
        }
        i += 1;
    }
    Ok(all)
}

/// utime + stime of one process, in clock ticks.
/// Nanoseconds on a CPU of every thread of `pid` (the first field of `schedstat`).
fn run_nanos(pid: u32) -> io::Result<u64> {
    let mut nanos = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = match std::fs::read_to_string(task?.path().join("schedstat")) {
            Ok(stat) => stat,
            // The thread ended since the listing.
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        nanos += stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| io::Error::other("odd /proc schedstat"))?;
    }
    Ok(nanos)
}

fn stat_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields count from after its closing paren.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("odd /proc stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) are the 12th and 13th after the name.
    let field = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("odd /proc stat"))
    };
    Ok(field(11)? + field(12)?)
}

fn vm_rss(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS"))
}

/// A loopback address nobody listens on right now.
/// One line about the machine: cores, CPU model, kernel.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    // Not `available_parallelism`: this process is pinned to one core.
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = String::new();
    let _ = write!(out, "{cores} cores, {model}, Linux {}", kernel.trim());
    out
}
