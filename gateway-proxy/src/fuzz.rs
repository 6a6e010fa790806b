//! Fuzz targets that run on the stable toolchain.
//!
//! `cargo fuzz` needs a nightly compiler; these targets are property tests instead:
//! [`proptest`] generates structured inputs (HTTP messages in every legal spelling, then
//! mutated at the byte level and split at random points), an oracle judges each run, and a
//! failure is shrunk to a minimal input and its seed kept in `fuzz/regressions/<target>`
//! (committed: the kept corpus, replayed first on every run). Each target also replays a
//! hand-written corpus of known attack vectors before it generates anything.
//!
//! The targets and their oracles:
//!
//! | target | where | oracle |
//! |---|---|---|
//! | `server_h1` | `server::h1::fuzz` | differential against a strict RFC 9112 reader written for it: every request the service sees, the reader sees the same way, in order; stopping earlier is allowed only with an error response; what is written back is whole responses, one per request; valid input yields exactly the generated requests |
//! | `client_h1` | `proxy::exchange::fuzz` | differential against hyper's HTTP/1.1 client: an answer we accept is the one hyper reads; a connection with bytes left after it is never reused |
//! | `path` | `router::path::fuzz` | normalization is idempotent, never yields `.`/`..` segments, `//` or an encoded separator; the route chosen is the route of the path the upstream receives |
//! | `headers` | `proxy::headers::fuzz` | no hop-by-hop field, and no field a `Connection` header names, survives; every other field survives unchanged and in order |
//!
//! Each target runs for `GATEWAY_FUZZ_SECS` seconds (default 6: CI runs all of them in
//! well under a minute). For a long run, in an optimised build:
//!
//! ```text
//! GATEWAY_FUZZ_SECS=3600 cargo test --release -p gateway-proxy --lib fuzz_ -- --nocapture
//! ```
//!
//! which prints, per target, how many cases ran. A failure prints the minimal input; turn
//! it into a regression test next to the code it broke.

use std::cell::Cell;
use std::fmt::Debug;
use std::time::Duration;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

/// Runs `check` on inputs from `strategy` for the time budget, after the `corpus`.
///
/// # Panics
///
/// When `check` fails, with the shrunk input.
pub(crate) fn run<S>(
    target: &'static str,
    corpus: impl IntoIterator<Item = S::Value>,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug + Clone,
{
    for (i, input) in corpus.into_iter().enumerate() {
        if let Err(err) = check(input.clone()) {
            panic!("fuzz {target}: corpus entry {i} fails: {err}\ninput: {input:#?}");
        }
    }
    // Leaked once per target per test run: the persistence takes a static path.
    let path: &'static str = Box::leak(
        format!(
            "{}/fuzz/regressions/{target}.txt",
            env!("CARGO_MANIFEST_DIR")
        )
        .into_boxed_str(),
    );
    let config = Config {
        cases: 64,
        max_shrink_iters: 10_000,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(path))),
        ..Config::default()
    };
    let budget = budget();
    #[expect(
        clippy::disallowed_types,
        reason = "the budget is wall-clock time, outside any runtime"
    )]
    let started = std::time::Instant::now();
    let cases = Cell::new(0u64);
    let counted = |input| {
        cases.set(cases.get() + 1);
        check(input)
    };
    while started.elapsed() < budget {
        // A fresh runner per batch: a runner counts the cases it has run, and a new one
        // draws a new random seed (and replays the kept failures first).
        let mut runner = TestRunner::new(config.clone());
        if let Err(err) = runner.run(&strategy, counted) {
            panic!("fuzz {target}: {err}");
        }
    }
    eprintln!(
        "fuzz {target}: {} cases in {:.1} s",
        cases.get(),
        started.elapsed().as_secs_f64()
    );
}

/// How long each target runs: `GATEWAY_FUZZ_SECS`, or 6 s.
fn budget() -> Duration {
    std::env::var("GATEWAY_FUZZ_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map_or(Duration::from_secs(6), Duration::from_secs)
}

/// A `TestCaseError` from a formatted message, for oracles.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(proptest::test_runner::TestCaseError::fail(format!($($msg)+)));
        }
    };
}
pub(crate) use ensure;
