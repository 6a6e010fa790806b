//! A conformance suite for shared HTTP caches: what RFC 9111 (with RFC 9110 §13 and RFC
//! 5861) asks of a cache in front of an origin, checked over real sockets against any
//! caching proxy, so the gateway can be compared with nginx and HAProxy on the same cases.
//!
//! The cases follow the categories of the public suite at cache-tests.fyi (freshness,
//! storing, request directives, `Vary`, validation, `Age`, stale responses,
//! invalidation), written here from the RFC text: that suite runs on Node and is not
//! packaged, and these cases have to run in CI.
//!
//! How a case works: the [`Origin`] answers each request of the case's path with the
//! case's next scripted answer, numbering its answers (`version N` in the body), and logs
//! what it was asked. The client sends the case's requests through the proxy, one
//! connection each, and checks what came back: which origin answer was served
//! ([`Expect::Version`]), how many requests reached the origin, whether they were
//! conditional, and the status and fields.
//!
//! Every case has the [`Level`] of the RFC's words: a cache that fails a `Must` case is
//! wrong; `Should` cases are what a good cache does; `May` cases are optional behaviour,
//! reported for information.

mod cases;
mod client;
mod origin;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub use cases::cases;
pub use origin::Origin;

/// How strongly the RFC asks for a case's behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// MUST / MUST NOT.
    Must,
    /// SHOULD, or what a shared cache is for (reusing a fresh response).
    Should,
    /// MAY: optional behaviour.
    May,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Must => "must",
            Self::Should => "should",
            Self::May => "may",
        })
    }
}

/// One scripted answer of the origin.
#[derive(Clone, Debug)]
pub struct Answer {
    pub(crate) status: u16,
    /// Fields; a value may hold `{date}`, `{date-N}` or `{date+N}` (an HTTP date now, N
    /// seconds before or after it). A `Date` of now is added unless one is given.
    pub(crate) fields: Vec<(&'static str, &'static str)>,
}

/// One request of a case and what its answer must show.
#[derive(Clone, Debug)]
pub struct Step {
    pub(crate) method: &'static str,
    /// Appended to the case's path (`?a=1`, `/post`).
    pub(crate) suffix: &'static str,
    pub(crate) fields: Vec<(&'static str, &'static str)>,
    /// Waited before the request is sent.
    pub(crate) pause: Duration,
    pub(crate) expect: Vec<Expect>,
}

/// What a step's answer (or the origin's log after it) must show.
#[derive(Clone, Debug)]
pub enum Expect {
    /// The body is the origin's N-th answer (1-based): 1 again means served from the cache.
    Version(usize),
    /// The body is not the origin's N-th answer.
    NotVersion(usize),
    /// This status code.
    Status(u16),
    /// A field with exactly this value.
    Field(&'static str, &'static str),
    /// No such field.
    NoField(&'static str),
    /// `Age` present, at least this.
    AgeAtLeast(u64),
    /// The origin has been asked exactly this many times for the case so far.
    OriginCalls(usize),
    /// The origin's N-th request (1-based) was conditional (`If-None-Match` or
    /// `If-Modified-Since`).
    Conditional(usize),
}

/// A case of the suite.
#[derive(Clone, Debug)]
pub struct Case {
    /// A short name, also the last segment of the case's path.
    pub id: &'static str,
    /// How strongly the RFC asks for it.
    pub level: Level,
    /// What the case checks, in a line.
    pub title: &'static str,
    pub(crate) answers: Vec<Answer>,
    pub(crate) steps: Vec<Step>,
}

/// The gateway config the suite runs against: a memory cache on the one route, as
/// `docs/config.md` shows it.
pub fn gateway_config(origin: SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
upstreams:
  origin: {{ endpoints: ['http://{origin}'] }}
routes:
  - id: all
    match: {{ path: / }}
    upstream: origin
    plugins:
      - cache: {{ max_memory: 64MiB }}
"
    )
}

/// How a case went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every expectation held.
    Pass,
    /// The first expectation that did not hold.
    Fail(String),
    /// The exchange itself failed (no answer, unparsable answer).
    Error(String),
}

impl Outcome {
    /// Whether it passed.
    pub const fn passed(&self) -> bool {
        matches!(self, Self::Pass)
    }
}

/// Runs `cases` against the caching proxy at `proxy`, which forwards to `origin`, all at
/// once (each case on its own path); the outcomes in the order of `cases`.
///
/// `run` names this run's paths, so the same cache can be run against again.
pub async fn run(proxy: SocketAddr, origin: &Origin, run: &str, cases: &[Case]) -> Vec<Outcome> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, case) in cases.iter().enumerate() {
        let path = format!("/{run}/{}", case.id);
        origin.script(&path, case.answers.clone());
        let origin = origin.clone();
        let case = case.clone();
        tasks.spawn(async move { (i, play(proxy, &origin, &path, &case).await) });
    }
    let mut outcomes = vec![Outcome::Error("not run".into()); cases.len()];
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((i, outcome)) => outcomes[i] = outcome,
            Err(e) => tracing::error!(error = %e, "a case's task failed"),
        }
    }
    outcomes
}

/// One case, step by step.
async fn play(proxy: SocketAddr, origin: &Origin, path: &str, case: &Case) -> Outcome {
    for (n, step) in case.steps.iter().enumerate() {
        let n = n + 1;
        tokio::time::sleep(step.pause).await;
        let target = format!("{path}{}", step.suffix);
        let reply = match client::send(proxy, step.method, &target, &step.fields).await {
            Ok(reply) => reply,
            Err(e) => return Outcome::Error(format!("step {n}: {e}")),
        };
        let log = origin.log(path);
        for expect in &step.expect {
            if let Err(why) = check(expect, &reply, &log) {
                return Outcome::Fail(format!("step {n}: {why}"));
            }
        }
    }
    Outcome::Pass
}

fn check(expect: &Expect, reply: &client::Reply, log: &[origin::Asked]) -> Result<(), String> {
    match expect {
        Expect::Version(v) => match reply.version() {
            Some(got) if got == *v => Ok(()),
            Some(got) => Err(format!("served answer {got}, expected answer {v}")),
            None => Err(format!(
                "no origin answer in the body (status {})",
                reply.status
            )),
        },
        Expect::NotVersion(v) => match reply.version() {
            Some(got) if got == *v => Err(format!("served answer {got}")),
            _ => Ok(()),
        },
        Expect::Status(s) if reply.status == *s => Ok(()),
        Expect::Status(s) => Err(format!("status {}, expected {s}", reply.status)),
        Expect::Field(name, value) => match reply.field(name) {
            Some(got) if got == *value => Ok(()),
            Some(got) => Err(format!("{name}: {got:?}, expected {value:?}")),
            None => Err(format!("no {name}, expected {value:?}")),
        },
        Expect::NoField(name) => match reply.field(name) {
            Some(got) => Err(format!("{name}: {got:?}, expected none")),
            None => Ok(()),
        },
        Expect::AgeAtLeast(min) => match reply.field("age").map(str::parse::<u64>) {
            Some(Ok(age)) if age >= *min => Ok(()),
            Some(Ok(age)) => Err(format!("age {age}, expected at least {min}")),
            Some(Err(_)) => Err("age is not a number".into()),
            None => Err("no age".into()),
        },
        Expect::OriginCalls(calls) if log.len() == *calls => Ok(()),
        Expect::OriginCalls(calls) => Err(format!(
            "the origin was asked {} times, expected {calls}",
            log.len()
        )),
        Expect::Conditional(i) => match log.get(i - 1) {
            Some(asked) if asked.conditional => Ok(()),
            Some(_) => Err(format!("origin request {i} was not conditional")),
            None => Err(format!("no origin request {i}")),
        },
    }
}

/// The suite's outcomes for one proxy, counted by level: (passed, cases).
pub fn tally(cases: &[Case], outcomes: &[Outcome]) -> [(usize, usize); 3] {
    let mut tally = [(0, 0); 3];
    for (case, outcome) in cases.iter().zip(outcomes) {
        let slot = &mut tally[case.level as usize];
        slot.1 += 1;
        if outcome.passed() {
            slot.0 += 1;
        }
    }
    tally
}
