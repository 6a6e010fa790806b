//! The breaker's settings ([`Breaker`]) and its state machine ([`State`]): closed, open,
//! half-open, with a lock-free admission.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use gateway_core::classify::Class;
use tokio::time::Instant;

use super::layer::Report;
use super::window::{Outcome, Stats, Window, WindowState};

/// When a circuit opens, how long it stays open, and how it closes again.
///
/// A breaker trips (closed → open) on any of the conditions it is given: `n` failures in a
/// row ([`Breaker::consecutive`]), a failure rate ([`Breaker::failure_rate`]) or a slow-call
/// rate ([`Breaker::slow_calls`]) over a sliding [`Window`] holding at least
/// [`min_calls`](Breaker::min_calls) calls. Failures are what
/// [`gateway_core::classify`] calls one: 5xx responses and upstream-path errors, never 4xx
/// responses nor a client's own broken upload.
///
/// Open, it refuses every call for [`open_for`](Breaker::open_for), a time that doubles with
/// each opening in a row (up to a cap, and up to a fifth shorter at random so that a fleet
/// does not probe in step). Then it is half-open: it admits
/// [`probes`](Breaker::probes) calls, and only those, however many arrive; a failed or slow
/// probe opens it again, and all of them succeeding closes it.
///
/// ```
/// use std::time::Duration;
/// use gateway_middleware::circuit_breaker::{Breaker, Window};
///
/// let breaker = Breaker::failure_rate(0.5)
///     .min_calls(20)
///     .window(Window::time(Duration::from_secs(30)))
///     .slow_calls(Duration::from_secs(2), 0.8)
///     .open_for(Duration::from_secs(5), Duration::from_secs(120))
///     .probes(3);
/// # let _ = breaker;
/// ```
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub struct Breaker {
    pub(super) consecutive: Option<u32>,
    pub(super) failure_rate: Option<f64>,
    pub(super) slow: Option<(Duration, f64)>,
    pub(super) window: Window,
    pub(super) min_calls: u32,
    pub(super) open_for: Duration,
    pub(super) max_open: Duration,
    pub(super) probes: u32,
}

/// The live state of one breaker. Admission reads atomics only; recording an outcome in a
/// rate window takes a short lock.
pub(super) struct State {
    pub(super) breaker: Breaker,
    phase: AtomicU8,
    /// Bumped on every change of phase: an outcome admitted under an older one is stale.
    generation: AtomicU32,
    /// When an open breaker turns half-open, in nanoseconds since `epoch`.
    open_until: AtomicU64,
    /// Openings in a row (reset when the breaker closes): the open time grows with them.
    openings: AtomicU32,
    /// Half-open: probes still to admit, and probes that succeeded.
    probes_left: AtomicU32,
    probes_passed: AtomicU32,
    /// Closed: failures in a row.
    consecutive: AtomicU32,
    window: Mutex<WindowState>,
    epoch: Instant,
    pub(super) report: Report,
}

/// A breaker's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Calls go through; outcomes are counted.
    Closed,
    /// Calls are refused until the open time is over.
    Open,
    /// A bounded number of probes go through; they decide.
    HalfOpen,
}

/// What a call may do.
pub(super) enum Admit {
    /// Go through, reporting the outcome with this permit.
    Call(Permit),
    /// Refused; the breaker may admit calls again after about this long.
    Refused(Duration),
}

/// A call let through: its outcome is reported once, when recorded or dropped.
pub(super) struct Permit {
    pub(super) generation: u32,
    pub(super) probe: bool,
    pub(super) started: Instant,
    pub(super) done: bool,
}

// === impl Breaker ===

impl Breaker {
    /// Opens after `failures` failures in a row.
    ///
    /// # Panics
    ///
    /// When `failures` is 0.
    pub fn consecutive(failures: u32) -> Self {
        assert!(failures > 0, "a breaker trips after at least one failure");
        Self {
            consecutive: Some(failures),
            ..Self::base()
        }
    }

    /// Opens when at least `rate` (0 to 1) of the calls in the window failed, once it holds
    /// [`min_calls`](Self::min_calls).
    ///
    /// # Panics
    ///
    /// When `rate` is not above 0 and at most 1.
    pub fn failure_rate(rate: f64) -> Self {
        Self::base().and_failure_rate(rate)
    }

    /// Opens on latency alone: when at least `rate` of the window's calls took `threshold`
    /// or longer (see [`Breaker::slow_calls`]).
    ///
    /// # Panics
    ///
    /// When `rate` is not above 0 and at most 1.
    pub fn on_slow_calls(threshold: Duration, rate: f64) -> Self {
        Self::base().slow_calls(threshold, rate)
    }

    /// Also opens on a failure rate (see [`Breaker::failure_rate`]).
    ///
    /// # Panics
    ///
    /// When `rate` is not above 0 and at most 1.
    pub fn and_failure_rate(mut self, rate: f64) -> Self {
        assert!(rate > 0.0 && rate <= 1.0, "a rate is above 0 and at most 1");
        self.failure_rate = Some(rate);
        self
    }

    /// Also opens after `failures` failures in a row (see [`Breaker::consecutive`]).
    ///
    /// # Panics
    ///
    /// When `failures` is 0.
    pub fn and_consecutive(mut self, failures: u32) -> Self {
        assert!(failures > 0, "a breaker trips after at least one failure");
        self.consecutive = Some(failures);
        self
    }

    /// Also opens when at least `rate` of the calls in the window took `threshold` or
    /// longer to their response head, failed or not: latency alone can open it.
    ///
    /// # Panics
    ///
    /// When `rate` is not above 0 and at most 1.
    pub fn slow_calls(mut self, threshold: Duration, rate: f64) -> Self {
        assert!(rate > 0.0 && rate <= 1.0, "a rate is above 0 and at most 1");
        self.slow = Some((threshold, rate));
        self
    }

    /// The calls rates are computed over [default: the last 100 calls].
    pub fn window(mut self, window: Window) -> Self {
        self.window = window;
        self
    }

    /// The fewest calls in the window before a rate can open the breaker [default: 20].
    pub fn min_calls(mut self, calls: u32) -> Self {
        self.min_calls = calls.max(1);
        self
    }

    /// How long the breaker stays open the first time, and at most: each opening in a row
    /// doubles it [default: 5 s, 60 s].
    pub fn open_for(mut self, first: Duration, max: Duration) -> Self {
        self.open_for = first;
        self.max_open = max.max(first);
        self
    }

    /// The calls a half-open breaker lets through to decide [default: 3].
    ///
    /// # Panics
    ///
    /// When `probes` is 0.
    pub fn probes(mut self, probes: u32) -> Self {
        assert!(probes > 0, "a half-open breaker needs a probe");
        self.probes = probes;
        self
    }

    fn base() -> Self {
        Self {
            consecutive: None,
            failure_rate: None,
            slow: None,
            window: Window::count(100),
            min_calls: 20,
            open_for: Duration::from_secs(5),
            max_open: Duration::from_secs(60),
            probes: 3,
        }
    }

    /// How long the `n`-th opening in a row (0 first) lasts: doubled each time up to the
    /// cap, then up to a fifth shorter at random.
    pub(super) fn open_time(&self, n: u32) -> Duration {
        let full = self
            .open_for
            .saturating_mul(1 << n.min(16))
            .min(self.max_open);
        let fifth = u64::try_from(full.as_nanos() / 5).unwrap_or(u64::MAX);
        full.saturating_sub(Duration::from_nanos(fastrand::u64(0..=fifth)))
    }

    /// Whether `stats` (the window's, closed) should open the breaker.
    fn trips_on(&self, stats: Stats) -> bool {
        if stats.calls < self.min_calls {
            return false;
        }
        let calls = f64::from(stats.calls);
        self.failure_rate
            .is_some_and(|rate| f64::from(stats.failures) >= rate * calls)
            || self
                .slow
                .is_some_and(|(_, rate)| f64::from(stats.slow) >= rate * calls)
    }
}

// === impl State ===

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

impl State {
    pub(super) fn new(breaker: Breaker, report: Report) -> Self {
        let window = WindowState::new(&breaker.window);
        Self {
            breaker,
            phase: AtomicU8::new(CLOSED),
            generation: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            openings: AtomicU32::new(0),
            probes_left: AtomicU32::new(0),
            probes_passed: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
            window: Mutex::new(window),
            epoch: Instant::now(),
            report,
        }
    }

    /// The breaker's phase now (an open breaker whose time is over shows as half-open).
    pub(super) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            CLOSED => Phase::Closed,
            OPEN if self.nanos(Instant::now()) >= self.open_until.load(Ordering::Acquire) => {
                Phase::HalfOpen
            }
            OPEN => Phase::Open,
            _ => Phase::HalfOpen,
        }
    }

    /// Whether a call may go through now.
    pub(super) fn admit(&self) -> Admit {
        let generation = self.generation.load(Ordering::Acquire);
        let phase = self.phase.load(Ordering::Acquire);
        if phase == CLOSED {
            // The clock is read only for what needs it: here, timing slow calls.
            let started = match self.breaker.slow {
                Some(_) => Instant::now(),
                None => self.epoch,
            };
            return Admit::Call(Permit {
                generation,
                probe: false,
                started,
                done: false,
            });
        }
        let now = Instant::now();
        match phase {
            OPEN => {
                let until = self.open_until.load(Ordering::Acquire);
                let at = self.nanos(now);
                if at < until {
                    return Admit::Refused(Duration::from_nanos(until - at));
                }
                // The open time is over: the first caller turns the breaker half-open and
                // is its first probe.
                if self
                    .phase
                    .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    // NOTE: the generation first: a caller that takes one of the probes
                    // stored next sees it.
                    let generation = self
                        .generation
                        .fetch_add(1, Ordering::AcqRel)
                        .wrapping_add(1);
                    self.probes_passed.store(0, Ordering::Release);
                    self.probes_left
                        .store(self.breaker.probes - 1, Ordering::Release);
                    self.report.changed(Phase::HalfOpen);
                    return Admit::Call(Permit {
                        generation,
                        probe: true,
                        started: now,
                        done: false,
                    });
                }
                self.take_probe(now)
            }
            _ => self.take_probe(now),
        }
    }

    /// A half-open breaker's probe, if one is left.
    fn take_probe(&self, now: Instant) -> Admit {
        let taken = self
            .probes_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(1)
            });
        let generation = self.generation.load(Ordering::Acquire);
        match taken {
            Ok(_) if self.phase.load(Ordering::Acquire) == HALF_OPEN => Admit::Call(Permit {
                generation,
                probe: true,
                started: now,
                done: false,
            }),
            // The probes decide; until then, callers are told to come back in a second.
            _ => Admit::Refused(Duration::from_secs(1)),
        }
    }

    /// Reports the outcome of a call `permit` let through.
    pub(super) fn record(&self, permit: &mut Permit, class: Class) {
        if permit.done {
            return;
        }
        permit.done = true;
        let expected = if permit.probe { HALF_OPEN } else { CLOSED };
        if self.generation.load(Ordering::Acquire) != permit.generation
            || self.phase.load(Ordering::Acquire) != expected
        {
            // Admitted before the breaker changed phase: it says nothing of the new one.
            return;
        }
        // The clock is read only when the windows (slow calls among them) need it.
        let windowed = self.breaker.failure_rate.is_some() || self.breaker.slow.is_some();
        let now = windowed.then(Instant::now);
        let slow = match (self.breaker.slow, now) {
            (Some((threshold, _)), Some(now)) => {
                now.saturating_duration_since(permit.started) >= threshold
            }
            _ => false,
        };
        if permit.probe {
            match class {
                // The client went away: the probe decided nothing; another may.
                Class::Client => {
                    self.probes_left.fetch_add(1, Ordering::AcqRel);
                }
                class if class.is_failure() || slow => self.open(permit.generation),
                _ => {
                    let passed = self.probes_passed.fetch_add(1, Ordering::AcqRel) + 1;
                    if passed >= self.breaker.probes {
                        self.close(permit.generation);
                    }
                }
            }
            return;
        }
        if !class.is_upstream() {
            return;
        }
        let failed = class.is_failure();
        if let Some(limit) = self.breaker.consecutive {
            if failed {
                let run = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
                if run >= limit {
                    self.open(permit.generation);
                    return;
                }
            } else if self.consecutive.load(Ordering::Relaxed) != 0 {
                // NOTE: read first: a store on every success would bounce the cache line
                // between cores for nothing.
                self.consecutive.store(0, Ordering::Release);
            }
        }
        if let Some(now) = now {
            let stats = {
                let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
                window.push(
                    Outcome { failed, slow },
                    now.saturating_duration_since(self.epoch),
                )
            };
            if self.breaker.trips_on(stats) {
                self.open(permit.generation);
            }
        }
    }

    /// Opens the breaker, if it is still in the phase of `generation`.
    fn open(&self, generation: u32) {
        if !self.advance(generation) {
            return;
        }
        let now = Instant::now();
        let openings = self.openings.fetch_add(1, Ordering::AcqRel);
        let open_time = self.breaker.open_time(openings);
        let until = self
            .nanos(now)
            .saturating_add(u64::try_from(open_time.as_nanos()).unwrap_or(u64::MAX));
        self.open_until.store(until, Ordering::Release);
        self.probes_left.store(0, Ordering::Release);
        self.phase.store(OPEN, Ordering::Release);
        self.report.opened(open_time, openings + 1);
    }

    /// Closes the breaker, if it is still in the phase of `generation`.
    fn close(&self, generation: u32) {
        if !self.advance(generation) {
            return;
        }
        self.openings.store(0, Ordering::Release);
        self.consecutive.store(0, Ordering::Release);
        self.window
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.phase.store(CLOSED, Ordering::Release);
        self.report.changed(Phase::Closed);
    }

    /// Moves the breaker past `generation`; `false` when another change got there first.
    fn advance(&self, generation: u32) -> bool {
        self.generation
            .compare_exchange(
                generation,
                generation.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("phase", &self.phase())
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

// === impl Phase ===

impl Phase {
    /// `closed`, `open` or `half_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}
