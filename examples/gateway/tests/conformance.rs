//! The HTTP cache conformance suite (`gateway_benches::conformance`, RFC 9111) against
//! the gateway binary serving a config with a cache: every case the RFC says a cache
//! MUST or SHOULD pass holds. `bash benches/conformance.sh` runs the same cases against
//! nginx and HAProxy too.

use std::fmt::Write as _;
use std::process::Stdio;
use std::time::Duration;

use gateway_benches::conformance::{self, Level, Origin, Outcome};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_passes_every_must_and_should_case() {
    let origin = Origin::start().await.unwrap();
    let dir = std::env::temp_dir().join(format!("gateway-conformance-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(&config, conformance::gateway_config(origin.addr())).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the gateway must print where it listens")
        .unwrap()
        .unwrap();
    let addr = line
        .strip_prefix("gateway listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let cases = conformance::cases();
    let outcomes = conformance::run(addr, &origin, "ci", &cases).await;
    let mut failed = String::new();
    for (case, outcome) in cases.iter().zip(&outcomes) {
        match outcome {
            Outcome::Pass => {}
            // Optional behaviour: reported, not required.
            Outcome::Fail(why) if case.level == Level::May => {
                eprintln!("may case {} not taken: {why}", case.id);
            }
            Outcome::Fail(why) | Outcome::Error(why) => {
                let _ = writeln!(failed, "{} ({}): {why}", case.id, case.level);
            }
        }
    }
    let [must, should, _] = conformance::tally(&cases, &outcomes);
    // The suite has cases at each level (a run that checks nothing cannot pass).
    assert!(must.1 >= 30 && should.1 >= 20, "{must:?} {should:?}");
    assert!(failed.is_empty(), "failed:\n{failed}");
    let _ = std::fs::remove_dir_all(&dir);
}
