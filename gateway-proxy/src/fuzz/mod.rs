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
//! | `client_h1` | `upstream::exchange::fuzz` | differential against a strict RFC 9112 response reader: an answer we read whole is the one the reader reads; a connection is pooled only when the reader says it can carry another exchange (persistent, delimited, nothing after the answer); valid answers are read as generated |
//! | `path` | `router::fuzz` | normalization is idempotent, never yields `.`/`..` segments, `//` or an encoded separator; the route chosen is the route of the path the upstream receives |
//! | `headers` | `proxy::headers::fuzz` | no hop-by-hop field, and no field a `Connection` header names, survives; every other field survives, its values in order |
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

pub(crate) mod rfc9112;
pub(crate) mod spell;

use std::cell::Cell;
use std::fmt::Debug;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;
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

#[derive(Debug, Clone)]
/// A byte-level change to a generated input.
pub(crate) enum Mutation {
    None,
    Flip(Index, u8),
    Delete(Index, usize),
    Repeat(Index, usize),
    Insert(Index, &'static [u8]),
}

/// A mutation, inserting one of `tokens` when it inserts.
pub(crate) fn mutation(tokens: &'static [&'static [u8]]) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => Just(Mutation::None),
        1 => (any::<Index>(), 0..8u8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        1 => (any::<Index>(), 1..8usize).prop_map(|(at, n)| Mutation::Delete(at, n)),
        1 => (any::<Index>(), 1..16usize).prop_map(|(at, n)| Mutation::Repeat(at, n)),
        2 => (any::<Index>(), proptest::sample::select(tokens))
            .prop_map(|(at, token)| Mutation::Insert(at, token)),
    ]
}

/// Applies `mutation` to `input`.
pub(crate) fn mutate(input: &mut Vec<u8>, mutation: &Mutation) {
    let len = input.len();
    match *mutation {
        Mutation::None => {}
        Mutation::Flip(at, bit) => {
            if len > 0 {
                input[at.index(len)] ^= 1 << bit;
            }
        }
        Mutation::Delete(at, n) => {
            if len > 0 {
                let at = at.index(len);
                input.drain(at..(at + n).min(len));
            }
        }
        Mutation::Repeat(at, n) => {
            if len > 0 {
                let at = at.index(len);
                let run = input[at..(at + n).min(len)].to_vec();
                input.splice(at..at, run);
            }
        }
        Mutation::Insert(at, token) => {
            let at = at.index(len + 1);
            input.splice(at..at, token.iter().copied());
        }
    }
}

/// `input` cut at `cuts` (positions, in any order) into the writes that send it.
pub(crate) fn split(input: &Bytes, cuts: &[usize]) -> Vec<Bytes> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut writes = Vec::new();
    let mut at = 0;
    for cut in cuts.into_iter().chain([input.len()]) {
        if cut > at {
            writes.push(input.slice(at..cut));
            at = cut;
        }
    }
    writes
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
