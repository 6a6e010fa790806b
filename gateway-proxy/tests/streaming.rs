//! 1 GiB through the proxy in each direction with bounded memory.
//!
//! Both transfers run in this one test so that nothing else in the process allocates while
//! the peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`) is measured.

mod support;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use gateway_core::Body;
use gateway_core::test_util::TestUpstream;
use gateway_proxy::{Route, Router};
use http::Request;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{Gateway, proxy_to};

const GIB: u64 = 1 << 30;
const LIMIT: u64 = 64 << 20;

/// `key` of `/proc/self/status`, in bytes.
fn status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .expect("status field")
}

/// Resets the peak RSS to the current RSS and returns it.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    status_kib("VmRSS:")
}

/// 64 KiB frames of `b'u'` with an unknown length, so hyper sends them chunked.
struct ChunkedUpload {
    chunk: Bytes,
    left: u64,
}

impl http_body::Body for ChunkedUpload {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_bounded_memory() {
    let download = TestUpstream::streaming(GIB).await;
    let upload = TestUpstream::echo().await;
    let app = Router::new()
        .route(Route::prefix("/download"), proxy_to(&download))
        .route(Route::prefix("/upload"), proxy_to(&upload));
    let gw = Gateway::start(app).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();

    // Warm-up: pools, buffers and lazy statics exist before the baseline.
    let warm = Request::post(format!("http://{}/upload", gw.addr))
        .body(Body::from("warm"))
        .unwrap();
    client
        .request(warm)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();

    let base = reset_peak();
    let res = client
        .request(
            Request::get(format!("http://{}/download", gw.addr))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, GIB);
    let download_growth = status_kib("VmHWM:").saturating_sub(base);

    let base = reset_peak();
    static CHUNK: [u8; 64 * 1024] = [b'u'; 64 * 1024];
    let upload_body = ChunkedUpload {
        chunk: Bytes::from_static(&CHUNK),
        left: GIB,
    };
    let res = client
        .request(
            Request::post(format!("http://{}/upload", gw.addr))
                .body(Body::new(upload_body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-received-bytes"], GIB.to_string().as_str());
    res.into_body().collect().await.unwrap();
    let upload_growth = status_kib("VmHWM:").saturating_sub(base);
    let seen = upload.last_request();
    assert_eq!(seen.body_len, GIB);
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));

    eprintln!(
        "peak RSS growth: download {:.1} MiB, upload {:.1} MiB",
        download_growth as f64 / 1048576.0,
        upload_growth as f64 / 1048576.0
    );
    assert!(
        download_growth < LIMIT,
        "download grew RSS by {download_growth} bytes"
    );
    assert!(
        upload_growth < LIMIT,
        "upload grew RSS by {upload_growth} bytes"
    );
}
