//! Consistent hashing (Maglev) on a key taken from the request.

use std::fmt;
use std::sync::Arc;

use gateway_core::ClientIp;
use http::header::{COOKIE, HeaderName};

use super::Endpoint;
use super::balance::{Balance, PickContext, fast_random, first_allowed};

/// Where the hash key comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HashKey {
    /// The resolved [`ClientIp`] (needs `SetClientIpLayer`).
    ClientIp,
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The request path.
    Path,
}

/// Maglev consistent hashing: a lookup table of a prime size in which every endpoint owns
/// a share of slots proportional to its weight. The same key always maps to the same
/// endpoint of the same set, and removing one of N endpoints remaps about 1/N of the keys.
/// Requests without the key are spread at random. Slow start does not apply: a key's
/// endpoint is fixed by the table.
#[derive(Clone)]
pub struct ConsistentHash {
    key: HashKey,
    table: Vec<u32>,
}

/// Table size: a prime well above the endpoint count times 100, as the Maglev paper advises.
const TABLE_SIZE: usize = 65_537;

// === impl ConsistentHash ===

impl ConsistentHash {
    /// Hashes on `key`.
    pub const fn new(key: HashKey) -> Self {
        Self {
            key,
            table: Vec::new(),
        }
    }

    fn key_hash(&self, ctx: &PickContext<'_>) -> Option<u64> {
        let req = ctx.request();
        match &self.key {
            HashKey::ClientIp => {
                let ip = req.extensions.get::<ClientIp>()?.ip();
                Some(match ip {
                    std::net::IpAddr::V4(v4) => hash(&v4.octets(), 0),
                    std::net::IpAddr::V6(v6) => hash(&v6.octets(), 0),
                })
            }
            HashKey::Header(name) => req.headers.get(name).map(|v| hash(v.as_bytes(), 0)),
            HashKey::Path => Some(hash(req.uri.path().as_bytes(), 0)),
            HashKey::Cookie(name) => req
                .headers
                .get_all(COOKIE)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
                .find_map(|pair| {
                    let pair = pair.trim_ascii();
                    let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
                    Some(hash(value, 0))
                }),
        }
    }
}

impl Balance for ConsistentHash {
    fn prepare(&mut self, endpoints: &[Arc<Endpoint>]) {
        self.table = maglev(endpoints);
    }

    fn pick(&self, endpoints: &[Arc<Endpoint>], ctx: &PickContext<'_>) -> Option<usize> {
        let Some(h) = self.key_hash(ctx) else {
            return first_allowed(
                endpoints,
                ctx,
                (fast_random() % endpoints.len() as u64) as usize,
            );
        };
        if self.table.is_empty() {
            return first_allowed(endpoints, ctx, (h % endpoints.len() as u64) as usize);
        }
        let slot = (h % TABLE_SIZE as u64) as usize;
        // NOTE: on an excluded endpoint, walk the table: the next owners are a stable,
        // key-dependent fallback order, so retries of one key agree too.
        (0..TABLE_SIZE)
            .map(|i| self.table[(slot + i) % TABLE_SIZE] as usize)
            .take(endpoints.len() * 64)
            .find(|&i| i < endpoints.len() && ctx.allows(&endpoints[i]))
            .or_else(|| first_allowed(endpoints, ctx, slot % endpoints.len()))
    }
}

impl fmt::Debug for ConsistentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsistentHash")
            .field("key", &self.key)
            .field("table", &self.table.len())
            .finish()
    }
}

/// Builds the Maglev lookup table. Endpoints are identified by their `scheme://authority`,
/// so every gateway instance builds the same table for the same set.
fn maglev(endpoints: &[Arc<Endpoint>]) -> Vec<u32> {
    if endpoints.is_empty() {
        return Vec::new();
    }
    let m = TABLE_SIZE as u64;
    let prefs: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|e| {
            let name = e.to_string();
            let offset = hash(name.as_bytes(), 0xA5A5) % m;
            let skip = hash(name.as_bytes(), 0x5A5A) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = endpoints.iter().map(|e| e.weight()).max().unwrap_or(1);
    let mut next = vec![0u64; endpoints.len()];
    let mut credit = vec![0u64; endpoints.len()];
    let mut table = vec![u32::MAX; TABLE_SIZE];
    let mut filled = 0;
    while filled < TABLE_SIZE {
        for (i, &(offset, skip)) in prefs.iter().enumerate() {
            // Weighted Maglev: an endpoint takes a turn each time its credit reaches the
            // largest weight.
            credit[i] += u64::from(endpoints[i].weight());
            if credit[i] < u64::from(max_weight) {
                continue;
            }
            credit[i] -= u64::from(max_weight);
            loop {
                let c = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table[c] == u32::MAX {
                    table[c] = u32::try_from(i).unwrap_or(u32::MAX - 1);
                    filled += 1;
                    break;
                }
            }
            if filled == TABLE_SIZE {
                break;
            }
        }
    }
    table
}

/// FNV-1a with a seed, finished with splitmix64 for avalanche: stable across processes and
/// versions (unlike `DefaultHasher`), which consistent hashing across instances needs.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| Arc::new(format!("10.0.0.{i}:8080").parse::<Endpoint>().unwrap()))
            .collect()
    }

    fn pick_for(b: &ConsistentHash, eps: &[Arc<Endpoint>], key: usize) -> String {
        let (parts, ()) = Request::get("/")
            .header("x-user", key.to_string())
            .body(())
            .unwrap()
            .into_parts();
        let i = b.pick(eps, &PickContext::new(&parts, &[])).unwrap();
        eps[i].to_string()
    }

    fn balancer(eps: &[Arc<Endpoint>]) -> ConsistentHash {
        let mut b = ConsistentHash::new(HashKey::Header(HeaderName::from_static("x-user")));
        b.prepare(eps);
        b
    }

    #[test]
    fn removing_one_of_ten_remaps_at_most_15_percent() {
        let all = endpoints(10);
        let before = balancer(&all);
        let fewer: Vec<_> = all
            .iter()
            .filter(|e| !e.to_string().ends_with(".3:8080"))
            .cloned()
            .collect();
        let after = balancer(&fewer);
        let moved = (0..10_000)
            .filter(|&k| pick_for(&before, &all, k) != pick_for(&after, &fewer, k))
            .count();
        assert!(moved <= 1_500, "{moved} of 10000 keys moved");
        // The keys that moved are (nearly) exactly those of the removed endpoint.
        assert!(
            moved >= 700,
            "{moved}: keys of the removed endpoint must move"
        );
    }

    #[test]
    fn the_same_key_maps_to_the_same_endpoint_in_every_instance() {
        let a = endpoints(10);
        let b = endpoints(10); // a second "instance": new Endpoint objects, same addresses
        let (ba, bb) = (balancer(&a), balancer(&b));
        for k in 0..1_000 {
            let first = pick_for(&ba, &a, k);
            assert_eq!(first, pick_for(&ba, &a, k));
            assert_eq!(first, pick_for(&bb, &b, k));
        }
    }

    #[test]
    fn slots_follow_weights() {
        let eps: Vec<Arc<Endpoint>> = [1u32, 3]
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(
                    format!("h{i}:80")
                        .parse::<Endpoint>()
                        .unwrap()
                        .with_weight(std::num::NonZeroU32::new(*w).unwrap()),
                )
            })
            .collect();
        let table = maglev(&eps);
        let share = table.iter().filter(|&&i| i == 1).count() as f64 / TABLE_SIZE as f64;
        assert!((share - 0.75).abs() < 0.01, "{share}");
    }

    #[test]
    fn keys_come_from_cookies_paths_and_client_ips() {
        let eps = endpoints(5);
        let mut by_cookie = ConsistentHash::new(HashKey::Cookie("session".into()));
        by_cookie.prepare(&eps);
        let pick = |b: &ConsistentHash, req: Request<()>| {
            let (parts, ()) = req.into_parts();
            b.pick(&eps, &PickContext::new(&parts, &[])).unwrap()
        };
        let with_cookie = |v: &str| {
            Request::get("/")
                .header("cookie", format!("a=1; session={v}; b=2"))
                .body(())
                .unwrap()
        };
        assert_eq!(
            pick(&by_cookie, with_cookie("abc")),
            pick(&by_cookie, with_cookie("abc"))
        );
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|i| pick(&by_cookie, with_cookie(&i.to_string())))
            .collect();
        assert!(spread.len() > 1);

        let mut by_ip = ConsistentHash::new(HashKey::ClientIp);
        by_ip.prepare(&eps);
        let from = |ip: &str| {
            let mut req = Request::get("/").body(()).unwrap();
            req.extensions_mut()
                .insert(ClientIp::new(ip.parse().unwrap(), false));
            req
        };
        assert_eq!(
            pick(&by_ip, from("192.0.2.1")),
            pick(&by_ip, from("192.0.2.1"))
        );

        let mut by_path = ConsistentHash::new(HashKey::Path);
        by_path.prepare(&eps);
        let path = |p: &str| Request::get(p).body(()).unwrap();
        assert_eq!(pick(&by_path, path("/a/b")), pick(&by_path, path("/a/b")));
    }

    #[test]
    fn an_excluded_owner_falls_back_to_a_stable_next_owner() {
        let eps = endpoints(4);
        let b = balancer(&eps);
        let (parts, ()) = Request::get("/")
            .header("x-user", "7")
            .body(())
            .unwrap()
            .into_parts();
        let owner = b.pick(&eps, &PickContext::new(&parts, &[])).unwrap();
        let excluded = [eps[owner].id()];
        let next = b.pick(&eps, &PickContext::new(&parts, &excluded)).unwrap();
        assert_ne!(next, owner);
        assert_eq!(
            next,
            b.pick(&eps, &PickContext::new(&parts, &excluded)).unwrap()
        );
    }
}
