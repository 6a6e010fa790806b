//! The end-to-end comparison: the example gateway, nginx and HAProxy as plain reverse proxies
//! in front of one origin, measured back to back in the same run on the same machine, with
//! a bare hyper proxy (`hyper-proxy`, built next to this driver) as the floor of a proxy
//! built on hyper.
//!
//! Run it with `bash benches/loadbench.sh`, which installs what is missing, builds in
//! release mode and pins this driver (with `wrk` and the origin) to one core and each proxy
//! to the other. Every proxy gets one worker. For each round, in a rotating order, it
//! measures per target:
//! - requests/s at 32 and 64 connections (`wrk`, small body);
//! - proxy CPU µs per request (the CPU time of the proxy's processes from `/proc`, divided
//!   by completed requests), small and 64 KiB bodies, at full load (`wrk`);
//! - the same at the fixed rate of the latency run (`cpu_us_per_req_at_rate`), where every
//!   target faces the same load: at full load a slower proxy also pays more in the kernel
//!   per request, since the client and the origin, less busy, are asleep more often when a
//!   packet reaches them (their wake-up and the packet's delivery run on the sender's core);
//! - p50/p99/p99.9 latency at a fixed rate minus the origin's own (open loop, keep-alive);
//! - the upstream connection reuse ratio (1 − origin connections / origin requests);
//!
//! then, with `--pairs N`, the CPU per request of the first two targets again in N pairs
//! of 1 s runs back to back, in A B B A order (`cpu_us_per_req_paired`, at full load, and
//! `cpu_us_per_req_at_rate_paired`): on a host whose speed drifts (a VM's neighbours), a
//! ratio of runs a second apart is less exposed to the drift than one of runs a round apart;
//!
//! and once per target, on a fresh process, the RSS per idle client connection with
//! thousands held open after one request each, and the RSS after they close. It prints one
//! table of medians with min–max and the gateway's ratios to the others (medians of the
//! per-round ratios), and writes everything as JSON.

#![forbid(unsafe_code)]

mod load;
mod origin;
mod targets;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use gateway_benches::arg_value;
use serde_json::{Value, json};
use targets::{Kind, Setup, Target};

const HELP: &str = "\
loadbench: the gateway, nginx, HAProxy and a bare hyper proxy side by side (see
benches/loadbench.sh)

OPTIONS:
    --gateway PATH     the gateway binary [default: target/release/gateway]
    --baseline PATH    another gateway build, measured in the same rounds (A/B a change)
    --rounds N         interleaved rounds [default: 5]
    --secs N           seconds per throughput and latency run [default: 5]
    --rate N           requests/s of the latency runs (and of `cpu_us_per_req_at_rate`)
                       [default: 2000]
    --idle N           idle connections of the memory run, 0 to skip it [default: 5000]
    --pairs N          after the rounds, N pairs of 1 s CPU runs of the first two
                       targets back to back (A B B A), for a ratio less exposed to a
                       noisy host [default: 0]
    --targets LIST     which proxies, comma-separated [default: gateway,baseline (with
                       --baseline),hyper,nginx,haproxy]; `hand` is the route of
                       benches/ab-config.yaml built in code (hand-gateway);
                       `observed` is the gateway with metrics, a JSON access log,
                       trace context and request spans on (`gateway` has them off);
                       `full` adds JWT (ES256), a rate limit, retries and a circuit
                       breaker on the route, every request with a bearer token;
                       `cached` puts a cache on the route (every request a hit
                       after the first of its path); `cache-miss` is the same
                       route with the answers `no-store` (every request proxied
                       through the cache layer); `nginx-cached` and
                       `haproxy-cached` are nginx and HAProxy with their caches on
    --config FILE      the gateway (and baseline) serve FILE, with LOADBENCH_ORIGIN set
                       to the origin's URL, instead of proxying by flags
    --json PATH        where to write the results [default: target/loadbench.json]
    --proxy-core CPU   the core the proxies are pinned to [default: 0]
    --load-core CPU    the core wrk is pinned to [default: 1]
";

struct Opts {
    gateway: PathBuf,
    config: Option<PathBuf>,
    baseline: Option<PathBuf>,
    rounds: usize,
    secs: u64,
    rate: u32,
    idle: usize,
    pairs: usize,
    json: PathBuf,
    proxy_core: String,
    load_core: String,
    targets: Vec<Kind>,
}

/// One metric's value per round for each target.
type Series = BTreeMap<&'static str, BTreeMap<Kind, Vec<f64>>>;

fn main() -> ExitCode {
    gateway_benches::bin_main("loadbench", HELP, parse, |opts| async move {
        run(&opts).await.map(|()| ExitCode::SUCCESS)
    })
}

fn parse() -> Result<Option<Opts>, String> {
    use lexopt::prelude::*;
    let mut opts = Opts {
        gateway: "target/release/gateway".into(),
        config: None,
        baseline: None,
        rounds: 5,
        secs: 5,
        rate: 2000,
        idle: 5000,
        pairs: 0,
        json: "target/loadbench.json".into(),
        proxy_core: "0".into(),
        load_core: "1".into(),
        targets: Vec::new(),
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let number = |flag: &str, v: String| -> Result<u64, String> {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("--{flag}: `{v}` is not a positive number"))
        };
        match arg {
            Short('h') | Long("help") => return Ok(None),
            Long("gateway") => opts.gateway = arg_value(&mut parser)?.into(),
            Long("baseline") => opts.baseline = Some(arg_value(&mut parser)?.into()),
            Long("config") => opts.config = Some(arg_value(&mut parser)?.into()),
            Long("rounds") => opts.rounds = number("rounds", arg_value(&mut parser)?)? as usize,
            Long("secs") => opts.secs = number("secs", arg_value(&mut parser)?)?,
            Long("rate") => {
                opts.rate = u32::try_from(number("rate", arg_value(&mut parser)?)?)
                    .map_err(|e| e.to_string())?;
            }
            Long("idle") => {
                let v = arg_value(&mut parser)?;
                opts.idle = v
                    .parse()
                    .map_err(|_| format!("--idle: `{v}` is not a number"))?;
            }
            Long("pairs") => {
                let v = arg_value(&mut parser)?;
                opts.pairs = v
                    .parse()
                    .map_err(|_| format!("--pairs: `{v}` is not a number"))?;
            }
            Long("targets") => {
                opts.targets = arg_value(&mut parser)?
                    .split(',')
                    .map(|name| {
                        Kind::KNOWN
                            .into_iter()
                            .find(|k| k.name() == name)
                            .ok_or(format!("--targets: unknown proxy `{name}`"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            Long("json") => opts.json = arg_value(&mut parser)?.into(),
            Long("proxy-core") => opts.proxy_core = arg_value(&mut parser)?,
            Long("load-core") => opts.load_core = arg_value(&mut parser)?,
            other => return Err(other.unexpected().to_string()),
        }
    }
    if opts.targets.is_empty() {
        opts.targets = Kind::ALL
            .into_iter()
            .filter(|k| *k != Kind::Baseline || opts.baseline.is_some())
            .collect();
    }
    if opts.targets.contains(&Kind::Baseline) && opts.baseline.is_none() {
        return Err("--targets: `baseline` needs --baseline PATH".into());
    }
    Ok(Some(opts))
}

async fn run(opts: &Opts) -> io::Result<()> {
    let pinned = std::process::Command::new("taskset")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !pinned {
        eprintln!("loadbench: taskset not found; running unpinned");
    }
    let load_core = pinned.then_some(opts.load_core.as_str());
    let (origin, counts) = origin::start()?;
    let dir = std::env::temp_dir().join(format!("loadbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let setup = Setup {
        gateway: opts.gateway.clone(),
        baseline: opts.baseline.clone(),
        hyper: std::env::current_exe()?.with_file_name("hyper-proxy"),
        hand: std::env::current_exe()?.with_file_name("hand-gateway"),
        config: opts.config.clone(),
        origin,
        core: pinned.then(|| opts.proxy_core.clone()),
        dir: dir.clone(),
    };
    let machine = targets::machine();
    eprintln!(
        "loadbench: {machine}; origin on {origin}; {} rounds",
        opts.rounds
    );

    let mut running = Vec::new();
    for &kind in &opts.targets {
        running.push(setup.start(kind)?);
    }
    let mut series = Series::new();
    let mut record = |metric: &'static str, kind: Kind, value: f64| {
        series
            .entry(metric)
            .or_default()
            .entry(kind)
            .or_default()
            .push(value);
    };
    for round in 0..opts.rounds {
        let direct = load::fixed_rate(origin, "/", opts.rate, opts.secs, 16, None).await?;
        let mut order: Vec<&Target> = running.iter().collect();
        let n = order.len();
        order.rotate_left(round % n);
        for target in order {
            eprintln!(
                "loadbench: round {} of {}: {}",
                round + 1,
                opts.rounds,
                target.kind.name()
            );
            let url = format!("http://{}/", target.addr);
            let url_64k = format!("http://{}/64k", target.addr);
            let mut errors = 0;

            let (cpu0, (conns0, reqs0)) = (target.cpu()?, counts.read());
            let auth = target.auth.as_ref();
            let c32 = load::wrk(load_core, 32, opts.secs, &url, auth)?;
            let c64 = load::wrk(load_core, 64, opts.secs, &url, auth)?;
            let (cpu1, (conns1, reqs1)) = (target.cpu()?, counts.read());
            let large = load::wrk(load_core, 32, opts.secs, &url_64k, auth)?;
            let cpu2 = target.cpu()?;
            errors += c32.errors + c64.errors + large.errors;
            record("rps_c32", target.kind, c32.rps);
            record("rps_c64", target.kind, c64.rps);
            record(
                "cpu_us_per_req",
                target.kind,
                micros(cpu1 - cpu0) / (c32.requests + c64.requests) as f64,
            );
            record(
                "cpu_us_per_req_64k",
                target.kind,
                micros(cpu2 - cpu1) / large.requests as f64,
            );
            record(
                "upstream_reuse",
                target.kind,
                1.0 - (conns1 - conns0) as f64 / (reqs1 - reqs0).max(1) as f64,
            );

            let lat = load::fixed_rate(
                target.addr,
                "/",
                opts.rate,
                opts.secs,
                16,
                target.auth.clone(),
            )
            .await?;
            let cpu3 = target.cpu()?;
            errors += lat.errors;
            record(
                "cpu_us_per_req_at_rate",
                target.kind,
                micros(cpu3 - cpu2) / lat.requests.max(1) as f64,
            );
            record(
                "added_p50_us",
                target.kind,
                micros(lat.p50) - micros(direct.p50),
            );
            record(
                "added_p99_us",
                target.kind,
                micros(lat.p99) - micros(direct.p99),
            );
            record(
                "added_p999_us",
                target.kind,
                micros(lat.p999) - micros(direct.p999),
            );
            record("errors", target.kind, errors as f64);
        }
    }
    if let [first, second, ..] = &running[..]
        && opts.pairs > 0
    {
        eprintln!(
            "loadbench: {} pairs of {} and {}",
            opts.pairs,
            first.kind.name(),
            second.kind.name()
        );
        for pair in 0..opts.pairs {
            let order = if pair % 2 == 0 {
                [first, second]
            } else {
                [second, first]
            };
            for target in order {
                let url = format!("http://{}/", target.addr);
                let cpu0 = target.cpu()?;
                let full = load::wrk(load_core, 32, 1, &url, target.auth.as_ref())?;
                let cpu1 = target.cpu()?;
                let at_rate =
                    load::fixed_rate(target.addr, "/", opts.rate, 1, 16, target.auth.clone())
                        .await?;
                let cpu2 = target.cpu()?;
                record(
                    "cpu_us_per_req_paired",
                    target.kind,
                    micros(cpu1 - cpu0) / full.requests.max(1) as f64,
                );
                record(
                    "cpu_us_per_req_at_rate_paired",
                    target.kind,
                    micros(cpu2 - cpu1) / at_rate.requests.max(1) as f64,
                );
            }
        }
    }
    drop(running);

    // Memory per idle connection, each on a fresh process.
    let memory_targets = if opts.idle == 0 {
        &[][..]
    } else {
        &opts.targets[..]
    };
    for &kind in memory_targets {
        let target = setup.start(kind)?;
        load::sequential(target.addr, 1000, target.auth.as_ref()).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = target.rss_kib()?;
        let idle = load::idle_connections(target.addr, opts.idle, target.auth.clone()).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let held = target.rss_kib()?;
        drop(idle);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = target.rss_kib()?;
        record(
            "rss_kib_per_idle_conn",
            kind,
            held.saturating_sub(base) as f64 / opts.idle as f64,
        );
        record("rss_kib_base", kind, base as f64);
        record("rss_kib_after_close", kind, after as f64);
        drop(target);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let table = report(&series);
    println!("{table}");
    let json = json!({
        "date": today(),
        "machine": machine,
        "settings": {
            "rounds": opts.rounds, "secs": opts.secs, "rate": opts.rate,
            "idle_connections": opts.idle, "pairs": opts.pairs, "pinned": pinned,
        },
        "series": series_json(&series),
        "table": table,
    });
    if let Some(parent) = opts.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&json)?)?;
    eprintln!("loadbench: wrote {}", opts.json.display());
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// The gateway's per-round ratios to `other`.
///
/// Rounds where `other` is 0 (errors, say) have no ratio.
fn ratios(gateway: &[f64], other: &[f64]) -> Vec<f64> {
    gateway
        .iter()
        .zip(other)
        .filter(|(_, o)| **o != 0.0)
        .map(|(g, o)| g / o)
        .collect()
}

fn report(series: &Series) -> String {
    use std::fmt::Write as _;
    let cell = |v: &[f64]| {
        let (lo, hi) = min_max(v);
        if v.is_empty() {
            "–".to_owned()
        } else if v.len() > 1 {
            format!("{:.2} ({:.2}–{:.2})", median(v), lo, hi)
        } else {
            format!("{:.2}", median(v))
        }
    };
    // A column for each proxy measured, then the gateway's ratio to each of the others.
    let kinds: Vec<Kind> = Kind::KNOWN
        .into_iter()
        .filter(|k| series.values().any(|by_kind| by_kind.contains_key(k)))
        .collect();
    let others: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| *k != Kind::Gateway)
        .collect();
    let mut out = String::from("| metric |");
    for k in &kinds {
        let _ = write!(out, " {} |", k.name());
    }
    for k in &others {
        let _ = write!(out, " gateway/{} |", k.name());
    }
    let _ = writeln!(out, "\n|{}", "---|".repeat(1 + kinds.len() + others.len()));
    for (metric, by_kind) in series {
        let get = |k: Kind| by_kind.get(&k).map_or(&[][..], Vec::as_slice);
        let _ = write!(out, "| {metric} |");
        for k in &kinds {
            let _ = write!(out, " {} |", cell(get(*k)));
        }
        for k in &others {
            let _ = write!(out, " {} |", cell(&ratios(get(Kind::Gateway), get(*k))));
        }
        out.push('\n');
    }
    out
}

fn series_json(series: &Series) -> Value {
    let mut out = serde_json::Map::new();
    for (metric, by_kind) in series {
        let mut m = serde_json::Map::new();
        for (kind, values) in by_kind {
            let (lo, hi) = min_max(values);
            m.insert(
                kind.name().into(),
                json!({ "values": values, "median": median(values), "min": lo, "max": hi }),
            );
        }
        out.insert((*metric).into(), Value::Object(m));
    }
    Value::Object(out)
}

/// Today's date (UTC) as `YYYY-MM-DD`, from the system clock.
fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
