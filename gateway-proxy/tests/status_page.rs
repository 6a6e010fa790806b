//! The admin status page in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver with fantoccini): it loads without console
//! errors and shows a route, a healthy endpoint and an ejected one as such.
//!
//! Without a chromedriver on the machine the test says so and passes, except under CI
//! (`CI` set), where `.ci/run` installs one and its absence fails the test.
//! `GATEWAY_SCREENSHOT=docs/status-page.png` saves what the browser showed.
#![expect(clippy::unwrap_used, reason = "tests")]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use support::{fetch, request};

/// `chromedriver`, where Debian puts it, or on the `PATH`.
fn chromedriver() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromedriver"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
        .into_iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
}

/// A chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    async fn start(path: &PathBuf) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let driver = Self { child, port };
        support::within("chromedriver listening", async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Chromium's console, through chromedriver's log endpoint (`goog:loggingPrefs`).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut caps = serde_json::Map::new();
    let mut args = vec![
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--force-device-scale-factor=1",
    ];
    // NOTE: root (CI containers) cannot use Chromium's sandbox.
    if std::env::var("USER").as_deref() == Ok("root") || is_root() {
        args.push("--no-sandbox");
    }
    let mut options = json!({ "args": args });
    if std::path::Path::new("/usr/bin/chromium").is_file() {
        options["binary"] = json!("/usr/bin/chromium");
    }
    caps.insert("goog:chromeOptions".into(), options);
    caps.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .unwrap()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

async fn state_of(client: &Client, endpoint: &str) -> (Option<String>, String) {
    let row = client
        .find(Locator::Css(&format!("tr[data-endpoint=\"{endpoint}\"]")))
        .await
        .unwrap();
    let state = row.attr("data-state").await.unwrap();
    let badge = row
        .find(Locator::Css(".badge"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (state, badge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_routes_and_endpoint_states_without_console_errors() {
    let Some(path) = chromedriver() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have chromedriver: .ci/run installs chromium and chromium-driver"
        );
        eprintln!("skipped: no chromedriver (apt-get install chromium chromium-driver)");
        return;
    };
    let (observed, backend) = support::gateway_with_an_ejected_endpoint().await;
    let driver = Driver::start(&path).await;
    let client = browser(&driver).await;
    // The checks run in a task of their own, so that the session (and its Chromium) is
    // closed whether they pass or panic.
    let checks = tokio::spawn(check_page(
        client.clone(),
        observed.admin,
        observed.gateway.addr,
        backend.live_url.clone(),
        backend.dead_url.clone(),
    ))
    .await;
    let _ = client.close().await;
    if let Err(failed) = checks {
        std::panic::resume_unwind(failed.into_panic());
    }
    drop(observed);
}

async fn check_page(
    client: Client,
    admin: SocketAddr,
    gateway: SocketAddr,
    live: String,
    dead: String,
) {
    client.goto(&format!("http://{admin}/")).await.unwrap();
    client
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("body[data-loaded=\"true\"]"))
        .await
        .unwrap();
    assert_eq!(client.title().await.unwrap(), "gateway · status");

    let route = client
        .find(Locator::Css("tr[data-route=\"all\"]"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        route.contains("all") && route.contains("backend"),
        "{route}"
    );
    assert_eq!(
        state_of(&client, &live).await,
        (Some("healthy".to_owned()), "healthy".to_owned())
    );
    assert_eq!(
        state_of(&client, &dead).await,
        (Some("ejected".to_owned()), "ejected".to_owned())
    );
    // The open circuit breaker of route `orders`.
    let breaker = client
        .find(Locator::Css("tr[data-breaker=\"orders\"]"))
        .await
        .unwrap();
    assert_eq!(
        breaker.attr("data-state").await.unwrap().as_deref(),
        Some("open")
    );
    assert!(breaker.text().await.unwrap().contains("open"));
    let readiness = client
        .find(Locator::Id("readiness"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(readiness, "ready");

    if let Some(shot) = std::env::var_os("GATEWAY_SCREENSHOT") {
        // Traffic for the rates, over two refreshes.
        let addr = gateway;
        let traffic = tokio::spawn(async move {
            for n in 0.. {
                // Mostly to `all`; now and then to `orders`, whose breaker refuses.
                let path = if n % 4 == 0 { "/orders" } else { "/shop/items" };
                fetch(addr, request("GET", path, &[])).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(4500)).await;
        traffic.abort();
        std::fs::write(shot, client.screenshot().await.unwrap()).unwrap();
    }

    let log = client.issue_cmd(BrowserLog).await.unwrap();
    let problems: Vec<&Value> = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|entry| entry["level"] != "INFO" && entry["level"] != "DEBUG")
        .collect();
    assert!(problems.is_empty(), "console: {problems:#?}");
}
