//! HTTP Basic authentication (RFC 7617) against bcrypt and Argon2 hashes.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use gateway_core::Identity;
use http::header::{self, HeaderValue};
use http::request;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::credential::Source;
use super::{Authenticate, Check, Grant, Rejection, Verdict, challenge};

const NAME: &str = "basic-auth";

/// Users and their password hashes: bcrypt (`$2y$`, `$2b$`, `$2a$`, what `htpasswd -B`
/// writes) or Argon2 (`$argon2id$...`, a PHC string). Weaker schemes an htpasswd file may
/// hold (`{SHA}`, `$apr1$` MD5, `crypt`, plain text) are refused when the users are read:
/// they would make a leaked file a list of passwords.
#[derive(Clone, Default)]
pub struct Users {
    by_name: HashMap<String, (Identity, Arc<str>)>,
}

/// Why users could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersError(String);

impl fmt::Display for UsersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsersError {}

/// Whether `hash` is a scheme [`Users`] takes.
fn check_hash(hash: &str) -> Result<(), String> {
    if ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
        return hash
            .parse::<bcrypt::HashParts>()
            .map(drop)
            .map_err(|e| format!("not a bcrypt hash: {e}"));
    }
    if hash.starts_with("$argon2") {
        return argon2::PasswordHash::new(hash)
            .map(drop)
            .map_err(|e| format!("not an Argon2 PHC string: {e}"));
    }
    let scheme = if hash.starts_with("{SHA}") {
        "SHA-1 (`{SHA}`)"
    } else if hash.starts_with("$apr1$") {
        "MD5 (`$apr1$`)"
    } else {
        "crypt or plain text"
    };
    Err(format!(
        "{scheme} is not accepted: hash with bcrypt (`htpasswd -B`) or Argon2"
    ))
}

impl Users {
    /// No users.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `identity` (its name is the user name) with the password hash `hash`.
    ///
    /// # Errors
    ///
    /// When `hash` is not a bcrypt or Argon2 hash.
    pub fn user(mut self, identity: Identity, hash: &str) -> Result<Self, UsersError> {
        check_hash(hash).map_err(|e| UsersError(format!("user `{}`: {e}", identity.name())))?;
        self.by_name
            .insert(identity.name().to_owned(), (identity, hash.into()));
        Ok(self)
    }

    /// The users of an htpasswd file's text (`user:hash` per line; `#` comments), each in
    /// the groups `groups` gives it.
    ///
    /// # Errors
    ///
    /// The first line that is not `user:hash` with an accepted hash, by number.
    pub fn from_htpasswd(
        text: &str,
        groups: impl Fn(&str) -> Vec<String>,
    ) -> Result<Self, UsersError> {
        let mut users = Self::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(UsersError(format!("line {}: not `user:hash`", i + 1)));
            };
            let identity = Identity::consumer(user).with_groups(groups(user));
            users = users
                .user(identity, hash)
                .map_err(|e| UsersError(format!("line {}: {e}", i + 1)))?;
        }
        Ok(users)
    }

    /// [`from_htpasswd`](Self::from_htpasswd) of the file at `path`.
    ///
    /// # Errors
    ///
    /// When the file cannot be read, or as `from_htpasswd`.
    pub fn from_htpasswd_file(
        path: impl AsRef<Path>,
        groups: impl Fn(&str) -> Vec<String>,
    ) -> Result<Self, UsersError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| UsersError(format!("cannot read {}: {e}", path.display())))?;
        Self::from_htpasswd(&text, groups)
            .map_err(|e| UsersError(format!("{}: {e}", path.display())))
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Users")
            .field("users", &self.by_name.len())
            .finish_non_exhaustive()
    }
}

/// Authenticates by `Authorization: Basic` (Kong's `basic-auth`).
///
/// Password hashes are slow on purpose, so they are checked on Tokio's blocking threads,
/// a few at once ([`concurrency`](Self::concurrency)); requests beyond wait, up to 5 s,
/// then get a 503. Recent successes are kept (a salted SHA-256 of the user and password,
/// never the password) for [`cache_for`](Self::cache_for), so a client sending the same
/// credentials on every request costs one hash check per period. An unknown user costs
/// the same check as a known one, so timing does not tell which users exist.
#[derive(Clone)]
pub struct BasicAuth {
    hide: bool,
    challenge: HeaderValue,
    ttl: Duration,
    permits: Arc<Semaphore>,
    shared: Arc<Shared>,
}

/// The users, and the successes remembered.
struct Shared {
    users: Users,
    /// Successes by the salted digest of `user:password`.
    cache: quick_cache::sync::Cache<[u8; 32], (Identity, Instant)>,
    salt: [u8; 32],
}

/// A bcrypt hash (cost 10) of a random password, checked for unknown users; made once.
fn decoy() -> Arc<str> {
    static DECOY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    Arc::clone(DECOY.get_or_init(|| {
        let password = random_bytes();
        // NOTE: hashing 32 bytes at a valid cost cannot fail; an empty decoy matches nothing.
        bcrypt::hash(password, 10).map_or_else(|_| Arc::from(""), Arc::from)
    }))
}

/// 32 bytes from the process's random hash keys (std seeds them from the OS).
fn random_bytes() -> [u8; 32] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::hash::RandomState::new().build_hasher();
        h.write_usize(i);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

impl BasicAuth {
    /// Checks credentials against `users`, 2 hashes at once, caching successes for 5 min.
    pub fn new(users: Users) -> Self {
        Self {
            hide: false,
            challenge: HeaderValue::from_static("Basic realm=\"gateway\""),
            ttl: Duration::from_secs(300),
            permits: Arc::new(Semaphore::new(2)),
            shared: Arc::new(Shared {
                users,
                cache: quick_cache::sync::Cache::new(10_000),
                salt: random_bytes(),
            }),
        }
    }

    /// Takes `Authorization` out of the request before it goes on (`hide_credentials`).
    #[must_use]
    pub const fn hide_credentials(mut self, hide: bool) -> Self {
        self.hide = hide;
        self
    }

    /// The realm of the 401's challenge (`Basic realm="..."`) [default: `gateway`].
    ///
    /// # Panics
    ///
    /// When `realm` cannot be in a header (a control character).
    #[must_use]
    pub fn realm(mut self, realm: &str) -> Self {
        #[expect(
            clippy::expect_used,
            reason = "documented: a realm is the caller's text"
        )]
        let challenge = challenge("Basic", realm, "").expect("a realm without control characters");
        self.challenge = challenge;
        self
    }

    /// How many hashes are checked at once [default: 2].
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.permits = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    /// How long a success is remembered; zero remembers none [default: 5 min].
    #[must_use]
    pub const fn cache_for(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The salted digest a success is remembered by.
    fn key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(self.shared.salt);
        hash.update((user.len() as u64).to_be_bytes());
        hash.update(user);
        hash.update(password);
        hash.finalize().into()
    }

    fn grant(&self, identity: Identity) -> Grant {
        let grant = Grant::new(NAME, identity);
        // `Source::Bearer` strips the `Authorization` header, whatever its scheme.
        if self.hide {
            grant.strip(Source::Bearer)
        } else {
            grant
        }
    }

    fn refused(&self, reason: &'static str) -> Rejection {
        Rejection::unauthenticated(NAME, reason).challenge(self.challenge.clone())
    }
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("users", &self.shared.users)
            .field("hide", &self.hide)
            .finish_non_exhaustive()
    }
}

/// `user` and `password` of `Authorization: Basic`, `Ok(None)` for another scheme.
fn credentials(req: &request::Parts) -> Result<Option<(String, String)>, &'static str> {
    let mut values = req.headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("ambiguous");
    }
    let value = value.as_bytes();
    let scheme_end = value.iter().position(|&b| b == b' ').unwrap_or(value.len());
    if !value[..scheme_end].eq_ignore_ascii_case(b"basic") {
        return Ok(None);
    }
    let encoded = value.get(scheme_end + 1..).unwrap_or_default();
    if encoded.len() > super::credential::MAX_CREDENTIAL {
        return Err("malformed");
    }
    let decoded = STANDARD.decode(encoded).map_err(|_| "malformed")?;
    let decoded = String::from_utf8(decoded).map_err(|_| "malformed")?;
    let (user, password) = decoded.split_once(':').ok_or("malformed")?;
    if user.is_empty() {
        return Err("malformed");
    }
    Ok(Some((user.to_owned(), password.to_owned())))
}

/// Whether `password` matches `hash` (bcrypt or Argon2; a hash that cannot be read does not).
fn matches(password: &str, hash: &str) -> bool {
    if hash.starts_with("$argon2") {
        use argon2::PasswordVerifier as _;
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), hash)
            .is_ok()
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

impl Authenticate for BasicAuth {
    fn name(&self) -> &'static str {
        NAME
    }

    fn authenticate(&self, req: &request::Parts) -> Check {
        let (user, password) = match credentials(req) {
            Ok(Some(found)) => found,
            Ok(None) => return Verdict::Absent.into(),
            Err(reason) => return Verdict::Rejected(self.refused(reason)).into(),
        };
        let cache = &self.shared.cache;
        let key = self.key(&user, &password);
        if let Some((identity, at)) = cache.get(&key) {
            if at.elapsed() < self.ttl {
                return Verdict::Accepted(self.grant(identity)).into();
            }
            cache.remove(&key);
        }
        let this = self.clone();
        Check::Pending(Box::pin(async move {
            let waited = tokio::time::timeout(
                Duration::from_secs(5),
                Arc::clone(&this.permits).acquire_owned(),
            )
            .await;
            let Ok(Ok(permit)) = waited else {
                return Verdict::Rejected(
                    Rejection::unavailable(NAME, "overloaded")
                        .detail("too many password checks waiting"),
                );
            };
            let found = this.shared.users.by_name.get(&user).cloned();
            let hash: Option<Arc<str>> = found.as_ref().map(|(_, h)| Arc::clone(h));
            let checked = tokio::task::spawn_blocking(move || {
                let hash = hash.unwrap_or_else(decoy);
                let ok = matches(&password, &hash);
                drop(permit);
                ok
            })
            .await
            .unwrap_or(false);
            match found {
                Some((identity, _)) if checked => {
                    if !this.ttl.is_zero() {
                        let at = Instant::now();
                        this.shared.cache.insert(key, (identity.clone(), at));
                    }
                    Verdict::Accepted(this.grant(identity))
                }
                Some(_) => Verdict::Rejected(this.refused("bad_password")),
                None => Verdict::Rejected(
                    this.refused("unknown_user")
                        .detail(format!("no user `{}`", user.escape_debug())),
                ),
            }
        }))
    }

    fn challenge(&self) -> Option<HeaderValue> {
        Some(self.challenge.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_hashes_are_refused_when_read() {
        let ok = Users::from_htpasswd(
            &format!("# users\nalice:{}\n\nbob:$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$MR1SkD5y1wV2eRXvC0gX6dIHBTIkdL8GZ6hGr2DGkBo\n", bcrypt::hash("pw", 4).unwrap()),
            |_| vec!["staff".into()],
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        for (line, why) in [
            ("carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "SHA-1"),
            ("carol:$apr1$abc$def", "MD5"),
            ("carol:password", "plain"),
            ("carol", "not `user:hash`"),
            ("carol:$2y$10$short", "bcrypt"),
        ] {
            let err = Users::from_htpasswd(line, |_| Vec::new()).unwrap_err();
            assert!(
                err.0.contains(why) && err.0.contains("line 1"),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn basic_credentials_are_read_strictly() {
        let parts = |v: &str| {
            http::Request::get("/")
                .header("authorization", v)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let b64 = |s: &str| STANDARD.encode(s);
        assert_eq!(
            credentials(&parts(&format!("Basic {}", b64("al:ice:pw")))),
            Ok(Some(("al".into(), "ice:pw".into())))
        );
        assert_eq!(credentials(&parts("Bearer x")), Ok(None));
        assert_eq!(credentials(&parts("Basic !!!")), Err("malformed"));
        assert_eq!(
            credentials(&parts(&format!("Basic {}", b64("nopass")))),
            Err("malformed")
        );
        assert_eq!(
            credentials(&parts(&format!("Basic {}", b64(":pw")))),
            Err("malformed")
        );
        assert!(matches("hunter2", &bcrypt::hash("hunter2", 4).unwrap()));
        assert!(!matches("hunter3", &bcrypt::hash("hunter2", 4).unwrap()));
        assert!(!matches("x", &decoy()));
    }

    #[tokio::test]
    async fn a_success_is_remembered_and_a_failure_is_not() {
        let users = Users::new()
            .user(Identity::consumer("alice"), &bcrypt::hash("pw", 4).unwrap())
            .unwrap();
        let basic = BasicAuth::new(users);
        let req = |pw: &str| {
            let value = format!("Basic {}", STANDARD.encode(format!("alice:{pw}")));
            http::Request::get("/")
                .header("authorization", value)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let verdict = |check: Check| async move {
            match check {
                Check::Done(v) => (false, v),
                Check::Pending(f) => (true, f.await),
            }
        };
        let (waited, v) = verdict(basic.authenticate(&req("pw"))).await;
        assert!(waited && matches!(v, Verdict::Accepted(_)));
        let (waited, v) = verdict(basic.authenticate(&req("pw"))).await;
        assert!(!waited && matches!(v, Verdict::Accepted(_)), "remembered");
        for _ in 0..2 {
            let (waited, v) = verdict(basic.authenticate(&req("nope"))).await;
            assert!(
                waited && matches!(v, Verdict::Rejected(_)),
                "checked every time"
            );
        }
        let basic = basic.cache_for(Duration::ZERO);
        verdict(basic.authenticate(&req("pw"))).await;
        let (waited, _) = verdict(basic.authenticate(&req("pw"))).await;
        assert!(waited, "no cache");
    }
}
