//! The origin behind the proxy under test: it answers each case's path with the case's
//! scripted answers in turn and logs what it was asked.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{DATE, IF_MODIFIED_SINCE, IF_NONE_MATCH};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::Answer;

/// What the origin was asked.
#[derive(Clone, Debug)]
pub(crate) struct Asked {
    /// With `If-None-Match` or `If-Modified-Since`.
    pub(crate) conditional: bool,
}

#[derive(Default)]
struct Script {
    answers: Vec<Answer>,
    log: Vec<Asked>,
}

/// The scripted origin; clones share it.
#[derive(Clone)]
pub struct Origin {
    addr: SocketAddr,
    scripts: Arc<Mutex<HashMap<String, Script>>>,
}

impl Origin {
    /// Starts the origin on `127.0.0.1:0` in the current runtime.
    ///
    /// # Errors
    ///
    /// If it cannot listen.
    pub async fn start() -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let origin = Self {
            addr: listener.local_addr()?,
            scripts: Arc::default(),
        };
        let serving = origin.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let origin = serving.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        std::future::ready(Ok::<_, Infallible>(origin.answer(&req)))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(origin)
    }

    /// Where it listens.
    pub const fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers requests for `path` (and the paths under it) with `answers` in turn, the
    /// last one over again.
    pub(crate) fn script(&self, path: &str, answers: Vec<Answer>) {
        self.scripts().insert(
            path.to_owned(),
            Script {
                answers,
                log: Vec::new(),
            },
        );
    }

    /// What the origin was asked for `path` so far.
    pub(crate) fn log(&self, path: &str) -> Vec<Asked> {
        self.scripts()
            .get(path)
            .map(|script| script.log.clone())
            .unwrap_or_default()
    }

    fn scripts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Script>> {
        self.scripts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let mut scripts = self.scripts();
        // The case's path is the first two segments: `/<run>/<case>`.
        let case = path
            .match_indices('/')
            .nth(2)
            .map_or(path, |(end, _)| &path[..end]);
        let Some(script) = scripts.get_mut(case) else {
            let mut res = Response::new(Full::new(Bytes::from_static(b"no such case\n")));
            *res.status_mut() = StatusCode::NOT_FOUND;
            return res;
        };
        script.log.push(Asked {
            conditional: req.headers().contains_key(IF_NONE_MATCH)
                || req.headers().contains_key(IF_MODIFIED_SINCE),
        });
        let number = script.log.len();
        let Some(answer) = script
            .answers
            .get(number - 1)
            .or_else(|| script.answers.last())
        else {
            return Response::new(Full::new(Bytes::new()));
        };
        let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
        // A 304 has no body; every other answer says which one it is.
        let body = if status == StatusCode::NOT_MODIFIED {
            Bytes::new()
        } else {
            Bytes::from(format!("{case} version {number}\n"))
        };
        let mut res = Response::new(Full::new(body));
        *res.status_mut() = status;
        let headers = res.headers_mut();
        let now = SystemTime::now();
        headers.insert(DATE, date(now, "{date}"));
        for (name, value) in &answer.fields {
            let Ok(name) = HeaderName::try_from(*name) else {
                continue;
            };
            let value = if value.starts_with('{') {
                date(now, value)
            } else {
                HeaderValue::from_static(value)
            };
            if name == DATE {
                headers.insert(name, value);
            } else {
                headers.append(name, value);
            }
        }
        res
    }
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// `{date}`, `{date-N}` or `{date+N}` as an HTTP date relative to `now`; `{rfc850...}`
/// and `{asctime...}` the same in the two obsolete formats a recipient must accept too
/// (RFC 9110 §5.6.7).
fn date(now: SystemTime, spec: &str) -> HeaderValue {
    let spec = spec.trim_start_matches('{').trim_end_matches('}');
    let (format, offset) = spec
        .find(['-', '+'])
        .map_or((spec, ""), |at| spec.split_at(at));
    let when = match offset.split_at_checked(1) {
        Some(("-", secs)) => secs
            .parse()
            .ok()
            .and_then(|s| now.checked_sub(Duration::from_secs(s))),
        Some(("+", secs)) => secs
            .parse()
            .ok()
            .and_then(|s| now.checked_add(Duration::from_secs(s))),
        _ => Some(now),
    }
    .unwrap_or(now);
    let imf = httpdate::fmt_http_date(when);
    let text = match format {
        "rfc850" => obsolete(&imf, false),
        "asctime" => obsolete(&imf, true),
        _ => Some(imf),
    };
    text.and_then(|text| HeaderValue::try_from(text).ok())
        .unwrap_or_else(|| HeaderValue::from_static("invalid"))
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) in RFC 850 form
/// (`Sunday, 06-Nov-94 08:49:37 GMT`) or asctime form (`Sun Nov  6 08:49:37 1994`).
fn obsolete(imf: &str, asctime: bool) -> Option<String> {
    let mut parts = imf.split(' ');
    let day = parts.next()?.trim_end_matches(',');
    let (dd, mon, year, time) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if asctime {
        let dd = dd.trim_start_matches('0');
        return Some(format!("{day} {mon} {dd:>2} {time} {year}"));
    }
    let day = match day {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    };
    Some(format!("{day}, {dd}-{mon}-{} {time} GMT", year.get(2..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_the_three_formats() {
        let imf = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(
            obsolete(imf, false).as_deref(),
            Some("Sunday, 06-Nov-94 08:49:37 GMT")
        );
        assert_eq!(
            obsolete(imf, true).as_deref(),
            Some("Sun Nov  6 08:49:37 1994")
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(date(now, "{date}"), imf);
        assert_eq!(date(now, "{date+60}"), "Sun, 06 Nov 1994 08:50:37 GMT");
        assert_eq!(date(now, "{asctime-3600}"), "Sun Nov  6 07:49:37 1994");
    }
}
