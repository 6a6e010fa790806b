//! HTTP/1.1 on the wire (RFC 9112): message heads to and from the `http` types, and bodies
//! in their framing.
//!
//! This is the codec under both ends of an HTTP/1.1 exchange: the server's connections
//! (see `server::h1`) and the proxy's upstream connections (see `upstream::exchange`), which
//! run in the task of the request they carry. hyper's connections run a task each, with
//! channels for requests, responses and body data between it and the caller, and keep their
//! buffers while the connection sits idle; here an idle connection holds its socket only.
//!
//! Parsing is `httparse` (what hyper uses); what is built on it is strict where a lenient
//! reading could be exploited: ambiguous framing (`Content-Length` with
//! `Transfer-Encoding`, differing lengths, codings other than `chunked`), bare LF in chunk
//! lines, obsolete line folding, oversized heads, chunk lines and trailer sections are all
//! refused rather than guessed at.
//!
//! Both ends take their HTTP/1.1 semantics from here: which fields are hop-by-hop and what
//! `Connection`, `TE` and `Upgrade` say (`fields`), what a head allows of persistence
//! (`head::Meta::persistent`), how a body is announced and framed (`head::BodyLength`,
//! `encode::Encoder::for_body`), when a body came whole with its head
//! (`decode::Decoder::take_buffered`), how much to read next (`decode::Decoder::read_size`,
//! with `buffers::make_room`), and how writes are coalesced (`encode::WriteBuf`).

pub(crate) mod decode;
pub(crate) mod encode;
pub(crate) mod fields;
pub(crate) mod head;
