//! The client side: one request per connection, written and read as bytes, so that no
//! client library's handling of caching fields gets in the way.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a proxy has to answer a step.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The most of an answer read.
const MAX_ANSWER: usize = 1 << 20;

/// An answer, as read.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    /// The first value of `name`.
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Which of the origin's answers the body is (`... version N`).
    pub(crate) fn version(&self) -> Option<usize> {
        let body = std::str::from_utf8(&self.body).ok()?;
        body.trim_end().rsplit_once(" version ")?.1.parse().ok()
    }
}

/// Sends `method target` to `proxy` with `fields` (and `Host: conformance.test` unless
/// `fields` has a `Host`), and reads the answer to the end of the connection.
pub(crate) async fn send(
    proxy: SocketAddr,
    method: &str,
    target: &str,
    fields: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    if !fields.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str("Host: conformance.test\r\n");
    }
    for (name, value) in fields {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if matches!(method, "POST" | "PUT") {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    let exchange = async {
        let mut stream = TcpStream::connect(proxy)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut bytes = Vec::new();
        (&mut stream)
            .take(MAX_ANSWER as u64)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(bytes)
    };
    let bytes = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer in {TIMEOUT:?}"))??;
    parse(&bytes, method == "HEAD")
}

fn parse(bytes: &[u8], head: bool) -> Result<Reply, String> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut res = httparse::Response::new(&mut fields);
    let end = match res.parse(bytes) {
        Ok(httparse::Status::Complete(end)) => end,
        Ok(httparse::Status::Partial) => return Err("the answer ended in its head".into()),
        Err(e) => return Err(format!("unparsable answer: {e}")),
    };
    let status = res.code.unwrap_or(0);
    let fields: Vec<(String, String)> = res
        .headers
        .iter()
        .map(|f| {
            (
                f.name.to_ascii_lowercase(),
                String::from_utf8_lossy(f.value).into_owned(),
            )
        })
        .collect();
    let rest = &bytes[end..];
    let chunked = fields
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if head || status == 304 || status == 204 {
        Vec::new()
    } else if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(Reply {
        status,
        fields,
        body,
    })
}

/// A chunked body's data (trailers ignored).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk size line did not end")?;
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|line| usize::from_str_radix(line.split(';').next()?.trim(), 16).ok())
            .ok_or("a chunk size is not hex")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or("a chunk is cut short")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("a chunk is cut short")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lengths_and_chunks() {
        let plain = parse(
            b"HTTP/1.1 200 OK\r\nAge: 3\r\nContent-Length: 14\r\n\r\n/a/b version 2\n",
            false,
        )
        .expect("parsed");
        assert_eq!((plain.status, plain.version()), (200, Some(2)));
        assert_eq!(plain.field("AGE"), Some("3"));
        let chunked = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n/a/b \r\n9\r\nversion 7\r\n0\r\n\r\n",
            false,
        )
        .expect("parsed");
        assert_eq!(chunked.version(), Some(7));
        assert!(
            parse(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n/a",
                false
            )
            .is_err()
        );
    }
}
