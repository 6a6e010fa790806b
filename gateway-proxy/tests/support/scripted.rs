//! An upstream on a raw socket that answers with scripted bytes, for tests of what the
//! gateway does with answers no real server library would send.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the upstream does with one request.
pub struct Reply {
    /// Written in pieces of this many bytes (0: in one write), each flushed on its own.
    pub piece: usize,
    pub bytes: Vec<u8>,
    /// Written this long after the rest, as a write of its own.
    pub later: Option<(Duration, Vec<u8>)>,
    pub then: Then,
}

/// What the upstream does once it has answered.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Reads the next request on the connection.
    KeepOpen,
    /// Closes the connection.
    Close,
    /// Answers without reading the request body, then reads (and drops) what comes until
    /// the gateway closes the connection, and closes it too.
    AnswerEarly,
}

pub struct Scripted {
    pub url: String,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Reply {
    pub fn keep(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            piece: 0,
            bytes: bytes.into(),
            later: None,
            then: Then::KeepOpen,
        }
    }

    pub fn close(bytes: impl Into<Vec<u8>>) -> Self {
        Self {
            then: Then::Close,
            ..Self::keep(bytes)
        }
    }

    /// A `200` with `body` and its length, on a connection kept open.
    pub fn ok(body: &str) -> Self {
        Self::keep(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ))
    }
}

impl Scripted {
    /// Answers the `n`-th request it reads (counting from 0, over all connections) with
    /// `script(n)`.
    pub async fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let (conns, reqs) = (Arc::clone(&connections), Arc::clone(&requests));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (script, reqs) = (Arc::clone(&script), Arc::clone(&reqs));
                tokio::spawn(serve(stream, script, reqs));
            }
        });
        Self {
            url,
            connections,
            requests,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every request read so far (head and body), in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    script: Arc<dyn Fn(usize) -> Reply + Send + Sync>,
    requests: Arc<Mutex<Vec<String>>>,
) {
    stream.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    loop {
        let Some(head_len) = read_until(&mut stream, &mut buf, b"\r\n\r\n").await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        let n = {
            let mut requests = requests.lock().unwrap();
            requests.push(head.clone());
            requests.len() - 1
        };
        let reply = script(n);
        let mut body_len = 0;
        if reply.then != Then::AnswerEarly {
            body_len = read_body(&mut stream, &mut buf, head_len, &head).await;
            let body = String::from_utf8_lossy(&buf[head_len..head_len + body_len]).into_owned();
            requests.lock().unwrap()[n].push_str(&body);
        }
        buf.drain(..head_len + body_len);
        if write(&mut stream, &reply).await.is_err() {
            return;
        }
        match reply.then {
            Then::KeepOpen => {}
            Then::Close => return,
            Then::AnswerEarly => {
                let mut sink = [0u8; 8192];
                while let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await
                {
                    if n == 0 {
                        break;
                    }
                }
                return;
            }
        }
    }
}

async fn write(stream: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    let piece = if reply.piece == 0 {
        reply.bytes.len().max(1)
    } else {
        reply.piece
    };
    for part in reply.bytes.chunks(piece) {
        stream.write_all(part).await?;
        stream.flush().await?;
        if reply.piece != 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    if let Some((delay, bytes)) = &reply.later {
        tokio::time::sleep(*delay).await;
        stream.write_all(bytes).await?;
    }
    Ok(())
}

/// Reads until `buf` holds `end`; the length up to and including it.
async fn read_until(stream: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> Option<usize> {
    loop {
        if let Some(at) = buf.windows(end.len()).position(|w| w == end) {
            return Some(at + end.len());
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads the body the head announces (a length, or chunks up to the last one); its length.
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_len: usize,
    head: &str,
) -> usize {
    let head = head.to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        let mut rest = buf.split_off(head_len);
        let len = read_until(stream, &mut rest, b"0\r\n\r\n")
            .await
            .unwrap_or(rest.len());
        buf.extend_from_slice(&rest);
        return len;
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_len + len {
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return buf.len() - head_len,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    len
}
