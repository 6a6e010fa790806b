//! HTTP/1.1 on the wire (RFC 9112): message heads to and from the `http` types, and bodies
//! in their framing.
//!
//! This is the codec under the proxy's upstream connections (see `proxy::exchange`), which
//! run in the task of the request they carry: hyper's client connection runs a task of its
//! own per connection, with channels for requests, responses and body data between the two,
//! and keeps its buffers while the connection sits idle in the pool.
//!
//! Parsing is `httparse` (what hyper uses); what is built on it is strict where a lenient
//! reading could be exploited: ambiguous framing (`Content-Length` with
//! `Transfer-Encoding`, differing lengths, codings other than `chunked`), bare LF in chunk
//! lines, obsolete line folding, oversized heads, chunk lines and trailer sections are all
//! refused rather than guessed at.

pub(crate) mod decode;
pub(crate) mod encode;
pub(crate) mod head;
