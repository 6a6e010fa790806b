//! The gateway binary as users run it: flags, errors, a real request, and SIGTERM.
#![expect(
    clippy::unwrap_used,
    reason = "set-up helpers panic on failure, like the tests that call them"
)]

use std::process::Stdio;
use std::time::Duration;

use gateway_core::test_util::{TestUpstream, raw};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

async fn run_to_end(args: &[&str]) -> std::process::Output {
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the binary must exit")
        .unwrap()
}

#[tokio::test]
async fn help_documents_every_flag() {
    let out = run_to_end(&["--help"]).await;
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--upstream",
        "--threads",
        "--tls-cert",
        "--tls-key",
        "--trusted-proxy",
        "--drain-timeout",
        "--lb",
        "--health-path",
        "--health-interval",
        "--health-timeout",
        "--healthy-threshold",
        "--unhealthy-threshold",
        "--eject-after",
        "--slow-start",
        "--dns-refresh",
        "--config",
        "--check",
        "--otlp",
        "--help",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[tokio::test]
async fn bad_flags_and_files_exit_2_with_one_line() {
    for args in [
        &["--bogus"][..],
        &["--threads", "many"],
        &["--listen", "nowhere"],
        &["--upstream", "ftp://x"],
        &[
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ],
        &["--trusted-proxy", "10.0.0.0/99"],
        &["--upstream", "a:1", "--health-path", "healthz"],
        &["--health-interval", "soon"],
        &["--unhealthy-threshold", "0"],
        &["--dns-refresh", "0"],
        &["--otlp", "ftp://collector/v1/traces"],
        &[
            "--otlp",
            "http://127.0.0.1:4318/v1/traces",
            "--tracing",
            "off",
        ],
    ] {
        let out = run_to_end(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("gateway: error:"), "{args:?}: {err}");
    }
}

/// The binary's stdout, line by line.
type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts the binary with its stdout piped.
fn spawn(args: &[&str]) -> (Child, Lines) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The next line the gateway prints, within 20 s.
async fn next_line(lines: &mut Lines) -> String {
    tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the gateway must print where it listens")
        .unwrap()
        .unwrap()
}

/// The address in `gateway listening on http://ADDR`.
fn listening(line: &str) -> std::net::SocketAddr {
    line.strip_prefix("gateway listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap()
}

/// Starts the binary and reads the address it prints.
async fn start(args: &[&str]) -> (Child, std::net::SocketAddr) {
    let (child, mut lines) = spawn(args);
    let addr = listening(&next_line(&mut lines).await);
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// `GET path` over a fresh connection; the whole raw answer.
async fn get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
    raw::exchange(addr, request.as_bytes(), Duration::from_secs(5)).await
}

async fn sigterm_and_wait(mut child: Child) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the gateway must exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn quick_start_proxy_forwards_and_stops_on_sigterm() {
    let up = TestUpstream::echo().await;
    let (child, addr) = start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up.url(),
        "--threads",
        "1",
    ])
    .await;
    let res = get(addr, "/any/path?q=1").await;
    assert_eq!(
        raw::statuses(&res),
        [200],
        "{}",
        String::from_utf8_lossy(&res)
    );
    assert_eq!(up.last_request().uri, "/any/path?q=1");
    sigterm_and_wait(child).await;
}

/// A gateway whose stdout is closed before it prints where it listens (a parent that
/// went away, `gateway | head -0`) serves on: printing failed, and used to panic.
#[tokio::test]
async fn a_closed_stdout_does_not_stop_the_gateway() {
    let up = TestUpstream::echo().await;
    let addr = gateway_core::test_util::listen_addr();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(BIN)
        .args(["--listen", &addr.to_string(), "--upstream", &up.url()])
        .env("RUST_LOG", "warn")
        .stdout(writer)
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the gateway exited: {status:?}");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answered = get(addr, "/after").await;
    assert_eq!(
        raw::statuses(&answered),
        [200],
        "{}",
        String::from_utf8_lossy(&answered)
    );
    sigterm_and_wait(child).await;
}

/// With one of two `--upstream`s refusing connections, no client sees a 502: what could not
/// be sent goes to the other endpoint.
#[tokio::test]
async fn a_refusing_endpoint_costs_no_502_with_the_default_flags() {
    let up = TestUpstream::echo().await;
    let dead = format!("http://{}", gateway_core::test_util::refused_addr().await);
    let (child, addr) = start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &dead,
        "--upstream",
        &up.url(),
        "--threads",
        "1",
    ])
    .await;
    for n in 0..20 {
        let res = get(addr, &format!("/orders/{n}")).await;
        assert_eq!(
            raw::statuses(&res),
            [200],
            "{}",
            String::from_utf8_lossy(&res)
        );
    }
    assert_eq!(up.requests().len(), 20);
    sigterm_and_wait(child).await;
}

#[tokio::test]
async fn demo_mode_serves_its_curl_lines() {
    let (child, addr) = start(&["--listen", "127.0.0.1:0"]).await;
    let res = get(addr, "/api/hello").await;
    let text = String::from_utf8_lossy(&res);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("hello from the demo upstream"), "{text}");
    let res = get(addr, "/api/%2e%2e%2fadmin").await;
    assert_eq!(raw::statuses(&res), [400]);
    sigterm_and_wait(child).await;
}

#[tokio::test]
async fn health_checks_take_a_failing_upstream_out_of_rotation() {
    use gateway_core::Body;
    use http::{Response, StatusCode};
    let answer = |name: &'static str| {
        move |req: http::Request<hyper::body::Incoming>| async move {
            let mut res = Response::new(Body::from(name));
            if name == "sick" && req.uri().path() == "/healthz" {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok(res)
        }
    };
    let well = TestUpstream::serve(answer("well")).await;
    let sick = TestUpstream::serve(answer("sick")).await;
    let (child, addr) = start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &well.url(),
        "--upstream",
        &sick.url(),
        "--health-path",
        "/healthz",
        "--health-interval",
        "0.05",
        "--unhealthy-threshold",
        "1",
    ])
    .await;
    // Two probes of the sick one: the first has surely been judged.
    let probed = || {
        sick.requests()
            .iter()
            .filter(|r| r.uri.path() == "/healthz")
            .count()
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while probed() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the gateway must probe its upstreams");
    for _ in 0..10 {
        let res = get(addr, "/").await;
        let res = String::from_utf8_lossy(&res);
        assert!(res.ends_with("well"), "{res}");
    }
    assert!(
        sick.requests().iter().all(|r| r.uri.path() == "/healthz"),
        "only probes reach the sick upstream"
    );
    sigterm_and_wait(child).await;
}

/// Writes `yaml` to a file of its own and returns its path.
fn config_file(name: &str, yaml: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gateway-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

#[tokio::test]
async fn check_accepts_the_example_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.example.yaml");
    let out = run_to_end(&["--check", example]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

/// `--check` and `--config` refuse a bad file the same way: exit 2, one line, with the
/// file, line, column and key path, and nothing bound.
#[tokio::test]
async fn a_bad_config_exits_2_naming_the_place() {
    let cases = [
        (
            "unknown.yaml",
            "listen: 127.0.0.1:0\nroutes:\n  - match: { paht: /a }\n",
            ":3:14: routes[0].match.paht: unknown field",
        ),
        (
            "missing.yaml",
            "listen: 127.0.0.1:0\nroutes:\n  - match: { path: /a }\n    upstream: nope\n",
            ":4:15: routes[0].upstream: no upstream is named `nope`",
        ),
        (
            "duration.yaml",
            "listen: 127.0.0.1:0\nserver: { drain_timeout: soon }\nroutes: []\n",
            ":2:26: server.drain_timeout:",
        ),
    ];
    for (name, yaml, says) in cases {
        let path = config_file(name, yaml);
        let file = path.to_str().unwrap();
        for flag in ["--check", "--config"] {
            let out = run_to_end(&[flag, file]).await;
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag} {name}: {err}");
            assert_eq!(err.lines().count(), 1, "{flag} {name}: {err}");
            assert!(
                err.starts_with(&format!("gateway: error: {file}{says}")),
                "{flag} {name}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn a_config_file_is_served_as_it_says() {
    let up = TestUpstream::echo().await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
upstreams:
  api:
    endpoints: [{}]
    balancer: least-request
routes:
  - match: {{ path: /api }}
    upstream: api
    plugins:
      - request-id: {{}}
      - body-limit: {{ max: 1MiB }}
  - match: {{ path: /old }}
    redirect: {{ to: /api, status: 308 }}
",
        up.url()
    );
    let path = config_file("served.yaml", &yaml);
    let (child, addr) = start(&["--config", path.to_str().unwrap(), "--threads", "1"]).await;
    let res = get(addr, "/api/users").await;
    assert_eq!(
        raw::statuses(&res),
        [200],
        "{}",
        String::from_utf8_lossy(&res)
    );
    assert_eq!(up.last_request().uri, "/api/users");
    assert!(String::from_utf8_lossy(&res).contains("x-request-id: "));
    assert!(up.last_request().header("x-request-id").is_some());
    assert_eq!(raw::statuses(&get(addr, "/apiadmin").await), [404]);
    let res = get(addr, "/old").await;
    assert_eq!(raw::statuses(&res), [308]);
    assert!(String::from_utf8_lossy(&res).contains("location: /api\r\n"));
    assert_eq!(up.requests().len(), 1);

    // The file changes: the new route serves within 2 s, on the same process and port.
    let changed = yaml.replace("path: /old", "path: /new");
    std::fs::write(&path, changed).unwrap();
    answers_within(
        addr,
        "/new",
        308,
        Duration::from_secs(2),
        "not reloaded within 2 s",
    )
    .await;
    assert_eq!(raw::statuses(&get(addr, "/old").await), [404]);
    // SIGHUP reloads (and does not end the process, as it would without a handler).
    hang_up(&child);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        raw::statuses(&get(addr, "/new").await),
        [308],
        "still serving after SIGHUP"
    );
    sigterm_and_wait(child).await;
}

/// With `--watch 0` the file is not looked at: a change waits for SIGHUP, which applies it.
#[tokio::test]
async fn sighup_alone_reloads_when_watching_is_off() {
    let yaml = "
listen: 127.0.0.1:0
routes:
  - match: { path: /old }
    respond: { status: 200, body: old }
";
    let path = config_file("hup.yaml", yaml);
    let (child, addr) = start(&[
        "--config",
        path.to_str().unwrap(),
        "--watch",
        "0",
        "--threads",
        "1",
    ])
    .await;
    assert_eq!(raw::statuses(&get(addr, "/old").await), [200]);
    std::fs::write(&path, yaml.replace("/old", "/new")).unwrap();
    // Well past the default poll: still the old routes, nothing looked at the file.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(raw::statuses(&get(addr, "/new").await), [404]);
    hang_up(&child);
    answers_within(
        addr,
        "/new",
        200,
        Duration::from_secs(5),
        "SIGHUP did not reload",
    )
    .await;
    assert_eq!(raw::statuses(&get(addr, "/old").await), [404]);
    sigterm_and_wait(child).await;
}

/// Sends SIGHUP to `child`.
fn hang_up(child: &Child) {
    let pid = child.id().unwrap().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success());
}

/// Waits until `path` answers `status` (a reload applied), failing with `what` after `limit`.
async fn answers_within(
    addr: std::net::SocketAddr,
    path: &str,
    status: u16,
    limit: Duration,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while raw::statuses(&get(addr, path).await) != [status] {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs written to a pipe (a file, a collector) carry no colour codes.
#[tokio::test]
async fn logs_to_a_pipe_have_no_colour_codes() {
    let up = TestUpstream::echo().await;
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up.url(),
            "--threads",
            "1",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), stdout.next_line()).await;
    if !matches!(first, Ok(Ok(Some(_)))) {
        // Say why: how the gateway ended, and what it logged.
        let _ = child.start_kill();
        let out = child.wait_with_output().await.unwrap();
        panic!(
            "no first line on stdout ({first:?}); exit {:?}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let pid = child.id().unwrap().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(term.unwrap().success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("the gateway must exit after SIGTERM")
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("stopped"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "colour codes in {logs:?}");
}

/// Reads `path`'s lines until there are at least `n` (for 10 s at most).
async fn lines_of(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} has {} lines, not {n}",
            path.display(),
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_demo_logs_requests_continues_traces_and_reopens_its_log_on_sigusr1() {
    let dir = std::env::temp_dir().join(format!("gateway-cli-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let _ = std::fs::remove_file(&log);
    let (child, addr) = start(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--access-log",
        log.to_str().unwrap(),
    ])
    .await;

    let request = "GET /api/headers?token=secret HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\
                   traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
    let res = raw::exchange(addr, request.as_bytes(), Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&res);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "the upstream continues the trace: {text}"
    );
    assert!(
        !text.contains("00f067aa0ba902b7"),
        "with the gateway's span as parent"
    );
    let line: serde_json::Value = serde_json::from_str(&lines_of(&log, 1).await[0]).unwrap();
    assert_eq!(line["path"], "/api/headers");
    assert_eq!(line["route"], "api");
    assert_eq!(line["status"], 200);
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(line["upstream"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        line.get("query").is_none(),
        "queries are left out by default"
    );

    // logrotate moves the file away, then signals.
    std::fs::rename(&log, &rotated).unwrap();
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    // The reopen is asynchronous: requests go on until one lands in the new file.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&log).unwrap_or_default().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line in the reopened file"
        );
        get(addr, "/api/hello").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moved = lines_of(&rotated, 1).await;
    assert!(moved[0].contains("/api/headers"));
    sigterm_and_wait(child).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sampled_requests_reach_the_otlp_collector_by_the_time_the_gateway_exits() {
    let collector = TestUpstream::echo().await;
    let endpoint = format!("{}/v1/traces", collector.url());
    let (child, addr) = start(&[
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--access-log",
        "off",
        "--otlp",
        &endpoint,
    ])
    .await;
    let request = "GET /api/hello HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\
                   traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
    let res = raw::exchange(addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(res.starts_with(b"HTTP/1.1 200"));
    // The batch waits up to 5 s to fill; the exit sends it.
    sigterm_and_wait(child).await;
    let exports = collector.requests();
    assert_eq!(exports.len(), 1, "{exports:?}");
    assert_eq!(exports[0].uri.path(), "/v1/traces");
    assert_eq!(
        exports[0].header("content-type"),
        Some("application/x-protobuf")
    );
    let body = &exports[0].body;
    let trace_id = [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
        0x36,
    ];
    assert!(
        body.windows(16).any(|w| w == trace_id),
        "the trace id is in the export"
    );
    assert!(
        body.windows(7).any(|w| w == b"GET api"),
        "and the span's name"
    );
}

/// Starts the binary with an admin listener; where the gateway and the admin listen.
async fn start_with_admin(args: &[&str]) -> (Child, std::net::SocketAddr, std::net::SocketAddr) {
    let (child, mut lines) = spawn(args);
    let addr = listening(&next_line(&mut lines).await);
    let second = next_line(&mut lines).await;
    let admin = second
        .strip_prefix("admin on http://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("unexpected second line {second:?}"))
        .parse()
        .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr, admin)
}

/// The example gateway lists its config's caches for its admin listener: a cached page is
/// purged by `POST /cache/purge` (with the admin token) and fetched again.
#[tokio::test]
async fn the_admin_listener_purges_the_configs_caches() {
    let up = TestUpstream::serve(|_| async {
        Ok(http::Response::builder()
            .header("cache-control", "max-age=600")
            .body(gateway_core::Body::from("page"))
            .expect("a response"))
    })
    .await;
    let yaml = format!(
        "
listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0, token: t0ken }}
upstreams:
  site: {{ endpoints: [{}] }}
routes:
  - id: pages
    match: {{ path: /pages }}
    upstream: site
    plugins:
      - cache: {{ max_memory: 8MiB }}
",
        up.url()
    );
    let path = config_file("purge.yaml", &yaml);
    let (child, addr, admin) =
        start_with_admin(&["--config", path.to_str().unwrap(), "--threads", "1"]).await;
    let cache_status = |res: &[u8]| {
        String::from_utf8_lossy(res)
            .lines()
            .find_map(|l| l.strip_prefix("cache-status: ").map(str::to_owned))
            .unwrap_or_default()
    };
    assert!(cache_status(&get(addr, "/pages/a").await).contains("fwd=uri-miss"));
    let mut hit = false;
    for _ in 0..100 {
        if cache_status(&get(addr, "/pages/a").await).contains("hit") {
            hit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hit, "never a hit");
    assert_eq!(up.requests().len(), 1);

    let purge = "POST /cache/purge?prefix=http%3A%2F%2Fgw%2Fpages%2F HTTP/1.1\r\nHost: admin\r\n\
        Authorization: Bearer t0ken\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let res = raw::exchange(admin, purge.as_bytes(), Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&res);
    assert_eq!(raw::statuses(&res), [200], "{text}");
    assert!(text.contains(r#""purged":{"pages":1}"#), "{text}");
    assert!(cache_status(&get(addr, "/pages/a").await).contains("fwd=uri-miss"));
    assert_eq!(up.requests().len(), 2);
    sigterm_and_wait(child).await;
}
