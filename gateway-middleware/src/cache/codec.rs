//! Stored responses as bytes, for stores outside the process ([`RedisStore`], or one of
//! your own): a versioned, length-prefixed layout, read back strictly. Bytes that are not
//! exactly such a layout (another version, truncated, a field that is not a field) decode
//! to nothing, which a store treats as a miss.
//!
//! [`RedisStore`]: super::RedisStore

use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::Stored;

/// The layout's first bytes: its name and version.
const MAGIC: &[u8; 4] = b"GWC\x01";

/// Writes the pieces of a stored response.
#[derive(Debug, Default)]
pub(super) struct Writer(Vec<u8>);

/// Reads them back; every read fails (`None`) past the end.
#[derive(Debug)]
pub(super) struct Reader(Bytes);

impl Writer {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    pub(super) fn duration(&mut self, d: Duration) {
        self.u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub(super) fn time(&mut self, t: SystemTime) {
        self.duration(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
    }

    /// Bytes with their length before them.
    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    /// Optional bytes: a flag, then the bytes.
    pub(super) fn optional(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                self.u8(1);
                self.bytes(b);
            }
            None => self.u8(0),
        }
    }

    pub(super) fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl Reader {
    pub(super) fn u8(&mut self) -> Option<u8> {
        (self.0.remaining() >= 1).then(|| self.0.get_u8())
    }

    pub(super) fn u16(&mut self) -> Option<u16> {
        (self.0.remaining() >= 2).then(|| self.0.get_u16())
    }

    pub(super) fn u64(&mut self) -> Option<u64> {
        (self.0.remaining() >= 8).then(|| self.0.get_u64())
    }

    pub(super) fn duration(&mut self) -> Option<Duration> {
        self.u64().map(Duration::from_nanos)
    }

    pub(super) fn time(&mut self) -> Option<SystemTime> {
        SystemTime::UNIX_EPOCH.checked_add(self.duration()?)
    }

    /// Bytes with their length before them, shared with what is read (no copy).
    pub(super) fn bytes(&mut self) -> Option<Bytes> {
        let len = usize::try_from(self.u64()?).ok()?;
        (self.0.remaining() >= len).then(|| self.0.split_to(len))
    }

    pub(super) fn optional(&mut self) -> Option<Option<Bytes>> {
        match self.u8()? {
            0 => Some(None),
            1 => self.bytes().map(Some),
            _ => None,
        }
    }

    pub(super) fn name(&mut self) -> Option<HeaderName> {
        HeaderName::from_bytes(&self.bytes()?).ok()
    }

    pub(super) fn value(&mut self) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(self.bytes()?).ok()
    }

    /// How many items follow, each at least `min` bytes long: never more than the bytes
    /// left could hold (a count is not trusted to size an allocation).
    pub(super) fn count(&mut self, min: usize) -> Option<usize> {
        let n = usize::try_from(self.u64()?).ok()?;
        (n <= self.0.remaining() / min.max(1)).then_some(n)
    }
}

impl Stored {
    /// The response as bytes, for a store outside the process; [`from_bytes`]
    /// reads them back.
    ///
    /// [`from_bytes`]: Self::from_bytes
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.0.reserve(self.body.len() + 64 * self.headers.len() + 128);
        w.0.extend_from_slice(MAGIC);
        w.u16(self.status.as_u16());
        self.freshness.write(&mut w);
        self.selection.write(&mut w);
        w.u64(self.headers.len() as u64);
        for (name, value) in &self.headers {
            w.bytes(name.as_str().as_bytes());
            w.bytes(value.as_bytes());
        }
        w.bytes(&self.body);
        w.into_vec()
    }

    /// A response from what [`to_bytes`](Self::to_bytes) gave; `None` when `bytes` are
    /// anything else. The body and field values share `bytes` (no copy).
    pub fn from_bytes(bytes: Bytes) -> Option<Self> {
        let mut r = Reader(bytes);
        if r.0.remaining() < MAGIC.len() || r.0.split_to(MAGIC.len()) != MAGIC[..] {
            return None;
        }
        let status = StatusCode::from_u16(r.u16()?).ok()?;
        let freshness = super::Freshness::read(&mut r)?;
        let selection = super::Selection::read(&mut r)?;
        // A field is at least its two lengths and a one-byte name.
        let fields = r.count(17)?;
        let mut headers = HeaderMap::with_capacity(fields);
        for _ in 0..fields {
            let name = r.name()?;
            headers.append(name, r.value()?);
        }
        let body = r.bytes()?;
        if r.0.has_remaining() {
            return None;
        }
        Some(Self::assemble(status, headers, body, selection, freshness))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(vary: bool) -> Stored {
        let mut req = HeaderMap::new();
        req.insert("accept-language", "en-GB, fr;q=0.5".parse().unwrap());
        let mut headers = HeaderMap::new();
        headers.insert(
            "cache-control",
            "max-age=60, stale-if-error=30".parse().unwrap(),
        );
        headers.insert("etag", "\"v1\"".parse().unwrap());
        headers.append("x-many", "one".parse().unwrap());
        headers.append("x-many", "two".parse().unwrap());
        if vary {
            headers.insert("vary", "Accept-Language, Accept-Encoding".parse().unwrap());
        }
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Stored::new(
            &req,
            StatusCode::OK,
            headers,
            Bytes::from_static(b"hello"),
            (now, now + Duration::from_millis(20)),
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_stored_response_reads_back_as_it_was() {
        for vary in [false, true] {
            let before = stored(vary);
            let after = Stored::from_bytes(Bytes::from(before.to_bytes())).unwrap();
            assert_eq!(after.status, before.status);
            assert_eq!(after.headers, before.headers);
            assert_eq!(after.body, before.body);
            assert_eq!(after.selection, before.selection);
            assert_eq!(after.freshness, before.freshness);
        }
        let mut req = HeaderMap::new();
        req.insert("accept-language", "en-GB, fr;q=0.5".parse().unwrap());
        let after = Stored::from_bytes(Bytes::from(stored(true).to_bytes())).unwrap();
        assert!(after.selection.matches(&req));
        req.insert("accept-language", "de".parse().unwrap());
        assert!(!after.selection.matches(&req));
    }

    #[test]
    fn anything_else_reads_as_nothing() {
        let bytes = stored(true).to_bytes();
        // Every truncation, and every single-byte change of the framing, is refused or
        // reads as a response (never a panic).
        for len in 0..bytes.len() {
            assert!(Stored::from_bytes(Bytes::copy_from_slice(&bytes[..len])).is_none());
        }
        for at in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 0xff;
            let _ = Stored::from_bytes(Bytes::from(changed));
        }
        let mut longer = bytes;
        longer.push(0);
        assert!(Stored::from_bytes(Bytes::from(longer)).is_none());
        assert!(Stored::from_bytes(Bytes::from_static(b"GWC\x02")).is_none());
        // A count that would size a huge allocation is refused before allocating.
        let mut huge = b"GWC\x01".to_vec();
        huge.extend_from_slice(&200u16.to_be_bytes());
        huge.extend_from_slice(&[0xff; 64]);
        assert!(Stored::from_bytes(Bytes::from(huge)).is_none());
    }
}
