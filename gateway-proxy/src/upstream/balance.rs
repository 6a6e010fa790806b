//! Balancers: how an upstream picks an endpoint for each request.

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::request;
use tokio::time::Instant;

use super::Endpoint;

/// Picks an endpoint for a request.
///
/// Implementations must be cheap and must not block: `pick` runs on every request.
/// `prepare` runs once per endpoint set, before any `pick` on it, for precomputation. When
/// the set changes (discovery), the upstream clones the balancer, prepares the clone for
/// the new set and swaps it in, so balancers must be `Clone`.
pub trait Balance: BalanceClone + Send + Sync + fmt::Debug + 'static {
    /// Precomputes whatever `pick` needs for this endpoint set.
    fn prepare(&mut self, endpoints: &[Arc<Endpoint>]) {
        let _ = endpoints;
    }

    /// The index into `endpoints` of the endpoint that should serve the request, or `None`
    /// when none can. `endpoints` is never empty; only endpoints that [`PickContext::allows`]
    /// should be returned. Weighted balancers should use [`PickContext::weight`] (or
    /// [`PickContext::admits`]) so that slow start applies.
    fn pick(&self, endpoints: &[Arc<Endpoint>], ctx: &PickContext<'_>) -> Option<usize>;
}

/// Clones a boxed [`Balance`]; implemented for every `Balance + Clone`.
pub trait BalanceClone {
    /// A boxed copy of this balancer.
    fn clone_box(&self) -> Box<dyn Balance>;
}

impl<T: Balance + Clone> BalanceClone for T {
    fn clone_box(&self) -> Box<dyn Balance> {
        Box::new(self.clone())
    }
}

/// What a balancer knows about the request it picks for.
#[derive(Debug)]
pub struct PickContext<'a> {
    req: &'a request::Parts,
    excluded: &'a [u64],
    now: Instant,
    ignore_health: bool,
    slow_start: Option<Duration>,
}

/// Smooth weighted round robin (nginx's algorithm, precomputed into a schedule): over any
/// window of `sum(weights)` picks each endpoint gets exactly its weight, interleaved rather
/// than in bursts. With equal weights this is plain round robin.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
    schedule: Vec<u32>,
}

/// Weighted random choice.
#[derive(Clone, Debug, Default)]
pub struct Random {
    cumulative: Vec<u64>,
}

/// Power of two choices by requests in flight, relative to weight ("least request"): two
/// endpoints drawn at random, the less loaded one wins. Slow endpoints hold their requests
/// longer, so they get fewer new ones.
#[derive(Clone, Debug, Default)]
pub struct LeastRequest {
    _priv: (),
}

/// Power of two choices by peak-EWMA cost, `rtt × (in_flight + 1) / weight` (Finagle's and
/// linkerd's "peak EWMA"). Endpoints without a sample yet are costed at `default_rtt`, so
/// new endpoints are tried without being flooded.
#[derive(Clone, Debug)]
pub struct PeakEwma {
    default_rtt: Duration,
}

// === impl PickContext ===

impl<'a> PickContext<'a> {
    /// A context for `req`, excluding the endpoints whose ids are in `excluded` and those
    /// that are not available now.
    pub fn new(req: &'a request::Parts, excluded: &'a [u64]) -> Self {
        Self::at(req, excluded, Instant::now(), false, None)
    }

    pub(super) const fn at(
        req: &'a request::Parts,
        excluded: &'a [u64],
        now: Instant,
        ignore_health: bool,
        slow_start: Option<Duration>,
    ) -> Self {
        Self {
            req,
            excluded,
            now,
            ignore_health,
            slow_start,
        }
    }

    /// `endpoint`'s effective weight now: its configured weight, scaled down while it warms
    /// up after joining or recovering when the upstream has slow start.
    pub fn weight(&self, endpoint: &Endpoint) -> f64 {
        let weight = f64::from(endpoint.weight());
        match self.slow_start {
            Some(window) => weight * endpoint.warmup(self.now, window),
            None => weight,
        }
    }

    /// For balancers that follow a precomputed weighted order: whether to take `endpoint`
    /// when it comes up, which is always, except while it warms up (slow start), when it
    /// is taken with the probability of its current share of its weight.
    pub fn admits(&self, endpoint: &Endpoint) -> bool {
        match self.slow_start {
            None => true,
            Some(window) => {
                let share = endpoint.warmup(self.now, window);
                share >= 1.0 || unit_random() < share
            }
        }
    }

    /// The time the pick is made at.
    pub const fn now(&self) -> Instant {
        self.now
    }

    /// The request head.
    pub const fn request(&self) -> &request::Parts {
        self.req
    }

    /// Whether `endpoint` may serve this request: it is available (not ejected; ignored in
    /// panic mode) and was not tried already.
    pub fn allows(&self, endpoint: &Endpoint) -> bool {
        (self.ignore_health || endpoint.is_available(self.now))
            && !self.excluded.contains(&endpoint.id())
    }
}

/// The first allowed endpoint, scanning from `start`.
pub(super) fn first_allowed(
    endpoints: &[Arc<Endpoint>],
    ctx: &PickContext<'_>,
    start: usize,
) -> Option<usize> {
    let n = endpoints.len();
    (0..n)
        .map(|i| (start + i) % n)
        .find(|&i| ctx.allows(&endpoints[i]))
}

// === impl RoundRobin ===

/// Longest schedule kept; larger weight sums are scaled down to fit.
const MAX_SCHEDULE: u64 = 1 << 16;

impl Balance for RoundRobin {
    fn prepare(&mut self, endpoints: &[Arc<Endpoint>]) {
        let mut weights: Vec<u64> = endpoints.iter().map(|e| u64::from(e.weight())).collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        weights.iter_mut().for_each(|w| *w /= g);
        let total: u64 = weights.iter().sum();
        if total > MAX_SCHEDULE {
            weights
                .iter_mut()
                .for_each(|w| *w = (*w * MAX_SCHEDULE / total).max(1));
        }
        let total: i64 = weights.iter().map(|&w| w as i64).sum();
        let mut current = vec![0i64; weights.len()];
        self.schedule = (0..total)
            .map(|_| {
                let mut best = 0;
                for (i, w) in weights.iter().enumerate() {
                    current[i] += *w as i64;
                    if current[i] > current[best] {
                        best = i;
                    }
                }
                current[best] -= total;
                // NOTE: endpoint counts fit in u32; the schedule stores indices compactly.
                u32::try_from(best).unwrap_or(0)
            })
            .collect();
    }

    fn pick(&self, endpoints: &[Arc<Endpoint>], ctx: &PickContext<'_>) -> Option<usize> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if self.schedule.is_empty() {
            // Not prepared (a hand-built balancer): plain round robin.
            return first_allowed(endpoints, ctx, n % endpoints.len());
        }
        let len = self.schedule.len();
        for step in 0..len.min(endpoints.len() * 4) {
            let i = self.schedule[(n + step) % len] as usize;
            if i < endpoints.len() && ctx.allows(&endpoints[i]) && ctx.admits(&endpoints[i]) {
                return Some(i);
            }
        }
        first_allowed(endpoints, ctx, n % endpoints.len())
    }
}

impl Clone for RoundRobin {
    fn clone(&self) -> Self {
        Self {
            next: AtomicUsize::new(self.next.load(Ordering::Relaxed)),
            schedule: self.schedule.clone(),
        }
    }
}

const fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

// === impl Random ===

impl Balance for Random {
    fn prepare(&mut self, endpoints: &[Arc<Endpoint>]) {
        let mut sum = 0;
        self.cumulative = endpoints
            .iter()
            .map(|e| {
                sum += u64::from(e.weight());
                sum
            })
            .collect();
    }

    fn pick(&self, endpoints: &[Arc<Endpoint>], ctx: &PickContext<'_>) -> Option<usize> {
        let Some(&total) = self.cumulative.last() else {
            return first_allowed(endpoints, ctx, index(fast_random(), endpoints.len()));
        };
        for _ in 0..4 {
            let r = fast_random() % total;
            let i = self.cumulative.partition_point(|&c| c <= r);
            if i < endpoints.len() && ctx.allows(&endpoints[i]) && ctx.admits(&endpoints[i]) {
                return Some(i);
            }
        }
        first_allowed(endpoints, ctx, index(fast_random(), endpoints.len()))
    }
}

// === impl LeastRequest ===

impl Balance for LeastRequest {
    fn pick(&self, endpoints: &[Arc<Endpoint>], ctx: &PickContext<'_>) -> Option<usize> {
        // Compare (in_flight + 1) / weight without division.
        let load = |i: usize, other: usize| {
            (endpoints[i].in_flight() as f64 + 1.0) * ctx.weight(&endpoints[other])
        };
        two_choices(endpoints, ctx, |a, b| load(a, b) <= load(b, a))
    }
}

/// Power of two choices: two distinct allowed endpoints drawn at random, `prefer_first`
/// decides between them. Falls back to the one allowed endpoint when there is only one.
fn two_choices(
    endpoints: &[Arc<Endpoint>],
    ctx: &PickContext<'_>,
    prefer_first: impl Fn(usize, usize) -> bool,
) -> Option<usize> {
    let n = endpoints.len();
    let draw = |not: Option<usize>| {
        (0..8)
            .map(|_| index(fast_random(), n))
            .find(|&i| Some(i) != not && ctx.allows(&endpoints[i]))
    };
    let Some(a) = draw(None) else {
        return first_allowed(endpoints, ctx, index(fast_random(), n));
    };
    let Some(b) = draw(Some(a)) else {
        // Rarely reached by chance with many endpoints; then scan for a second one.
        return match first_allowed_except(endpoints, ctx, a) {
            Some(b) => Some(if prefer_first(a, b) { a } else { b }),
            None => Some(a),
        };
    };
    Some(if prefer_first(a, b) { a } else { b })
}

fn first_allowed_except(
    endpoints: &[Arc<Endpoint>],
    ctx: &PickContext<'_>,
    not: usize,
) -> Option<usize> {
    (0..endpoints.len()).find(|&i| i != not && ctx.allows(&endpoints[i]))
}

// === impl PeakEwma ===

impl PeakEwma {
    /// Costs endpoints without samples at `default_rtt`.
    pub const fn new(default_rtt: Duration) -> Self {
        Self { default_rtt }
    }
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new(Duration::from_millis(10))
    }
}

impl Balance for PeakEwma {
    fn pick(&self, endpoints: &[Arc<Endpoint>], ctx: &PickContext<'_>) -> Option<usize> {
        let now = ctx.now();
        let cost = |i: usize| {
            let e = &endpoints[i];
            let rtt = e.rtt_estimate(now).unwrap_or(self.default_rtt).as_nanos() as f64;
            // NOTE: +1 ns keeps a decayed-to-zero estimate from hiding the load factor.
            (rtt + 1.0) * (e.in_flight() as f64 + 1.0) / ctx.weight(e)
        };
        two_choices(endpoints, ctx, |a, b| cost(a) <= cost(b))
    }
}

/// A uniform random number in `[0, 1)`.
fn unit_random() -> f64 {
    // The top 53 bits, the precision of an f64 mantissa.
    (fast_random() >> 11) as f64 / (1u64 << 53) as f64
}

/// `r` reduced to `0..n` (n > 0).
fn index(r: u64, n: usize) -> usize {
    // NOTE: the result is < n, so it fits in usize.
    usize::try_from(r % n as u64).unwrap_or(0)
}

/// A fast per-thread pseudo-random number (xorshift64*), seeded from the OS-seeded
/// `RandomState`. Good for balancing; not for anything secret.
pub(super) fn fast_random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(std::ptr::from_ref(&h).addr());
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(
                    format!("e{i}:80")
                        .parse::<Endpoint>()
                        .unwrap()
                        .with_weight(std::num::NonZeroU32::new(*w).unwrap()),
                )
            })
            .collect()
    }

    fn parts() -> request::Parts {
        http::Request::new(()).into_parts().0
    }

    fn shares(b: &dyn Balance, eps: &[Arc<Endpoint>], picks: usize) -> Vec<f64> {
        let parts = parts();
        let ctx = PickContext::new(&parts, &[]);
        let mut counts = vec![0usize; eps.len()];
        for _ in 0..picks {
            counts[b.pick(eps, &ctx).unwrap()] += 1;
        }
        counts.iter().map(|c| *c as f64 / picks as f64).collect()
    }

    fn assert_weighted(shares: &[f64], weights: &[u32], tolerance: f64) {
        let total: u32 = weights.iter().sum();
        for (share, w) in shares.iter().zip(weights) {
            let want = f64::from(*w) / f64::from(total);
            assert!(
                (share - want).abs() <= tolerance,
                "share {share} vs weight {want}"
            );
        }
    }

    #[test]
    fn weighted_round_robin_shares_are_within_2_percent() {
        let weights = [1, 2, 3, 4, 10];
        let eps = endpoints(&weights);
        let mut rr = RoundRobin::default();
        rr.prepare(&eps);
        assert_weighted(&shares(&rr, &eps, 10_000), &weights, 0.02);
    }

    #[test]
    fn weighted_round_robin_is_smooth() {
        let eps = endpoints(&[5, 1, 1]);
        let mut rr = RoundRobin::default();
        rr.prepare(&eps);
        let parts = parts();
        let ctx = PickContext::new(&parts, &[]);
        let seq: Vec<usize> = (0..7).map(|_| rr.pick(&eps, &ctx).unwrap()).collect();
        // nginx's smooth sequence for 5:1:1 is a a b a c a a: never five a's in a row.
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn huge_weights_are_scaled_not_exploded() {
        let eps = endpoints(&[1_000_000, 3_000_000, 7]);
        let mut rr = RoundRobin::default();
        rr.prepare(&eps);
        assert!(rr.schedule.len() as u64 <= MAX_SCHEDULE + 3);
        let s = shares(&rr, &eps, 40_000);
        assert!((s[1] - 0.75).abs() < 0.02, "{s:?}");
        assert!(s[2] > 0.0, "a tiny weight still gets some traffic");
    }

    #[test]
    fn random_follows_weights() {
        let weights = [1, 3];
        let eps = endpoints(&weights);
        let mut r = Random::default();
        r.prepare(&eps);
        assert_weighted(&shares(&r, &eps, 40_000), &weights, 0.02);
    }

    #[test]
    fn least_request_avoids_loaded_endpoints() {
        let eps = endpoints(&[1, 1, 1]);
        eps[0].in_flight.store(50, Ordering::Relaxed);
        let s = shares(&LeastRequest::default(), &eps, 10_000);
        // The two choices are distinct, so the most loaded endpoint never wins.
        assert_eq!(s[0], 0.0, "{s:?}");
        // Weight counts: twice the weight takes twice the load for the same score.
        let eps = endpoints(&[2, 1]);
        eps[0].in_flight.store(1, Ordering::Relaxed);
        let s = shares(&LeastRequest::default(), &eps, 10_000);
        assert!(s[0] > 0.3, "{s:?}");
    }

    #[test]
    fn peak_ewma_avoids_slow_endpoints_and_retries_unsampled_ones() {
        let eps = endpoints(&[1, 1, 1]);
        let now = Instant::now();
        eps[0].observe_rtt(Duration::from_millis(100), now);
        eps[1].observe_rtt(Duration::from_millis(5), now);
        eps[2].observe_rtt(Duration::from_millis(5), now);
        let s = shares(&PeakEwma::default(), &eps, 10_000);
        assert_eq!(s[0], 0.0, "{s:?}");
        // An endpoint with no sample is costed at the default, between the two.
        let eps = endpoints(&[1, 1]);
        eps[0].observe_rtt(Duration::from_millis(50), now);
        let s = shares(&PeakEwma::default(), &eps, 1_000);
        assert_eq!(s[1], 1.0, "{s:?}");
    }

    #[test]
    fn exclusions_are_honoured_by_every_balancer() {
        let eps = endpoints(&[1, 5, 1]);
        let parts = parts();
        let excluded = [eps[1].id(), eps[2].id()];
        let ctx = PickContext::new(&parts, &excluded);
        let mut rr = RoundRobin::default();
        rr.prepare(&eps);
        let mut random = Random::default();
        random.prepare(&eps);
        let balancers: [&dyn Balance; 4] =
            [&rr, &random, &LeastRequest::default(), &PeakEwma::default()];
        for b in balancers {
            for _ in 0..100 {
                assert_eq!(b.pick(&eps, &ctx), Some(0), "{b:?}");
            }
        }
        let all = [eps[0].id(), eps[1].id(), eps[2].id()];
        let ctx = PickContext::new(&parts, &all);
        assert_eq!(LeastRequest::default().pick(&eps, &ctx), None);
    }
}
