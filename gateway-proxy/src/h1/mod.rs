//! HTTP/1.1 on the wire (RFC 9112): message heads to and from the `http` types, and bodies
//! in their framing.
//!
//! This is the codec under both ends of an HTTP/1.1 exchange: the server's connections
//! (see `server::h1`) and the proxy's upstream connections (see `proxy::exchange`), which
//! run in the task of the request they carry. hyper's connections run a task each, with
//! channels for requests, responses and body data between it and the caller, and keep their
//! buffers while the connection sits idle; here an idle connection holds its socket only.
//!
//! Parsing is `httparse` (what hyper uses); what is built on it is strict where a lenient
//! reading could be exploited: ambiguous framing (`Content-Length` with
//! `Transfer-Encoding`, differing lengths, codings other than `chunked`), bare LF in chunk
//! lines, obsolete line folding, oversized heads, chunk lines and trailer sections are all
//! refused rather than guessed at.

pub(crate) mod decode;
pub(crate) mod encode;
pub(crate) mod fields;
pub(crate) mod head;
