//! Read buffers and request extensions, recycled per thread.
//!
//! Every request needs a read buffer on each side of the proxy (its head, and a small body
//! with it). Allocating and freeing 8 KiB for each costs glibc thousands of instructions
//! (chunks that large skip its per-thread cache), and keeping one per idle connection costs
//! 8 KiB per connection. So a connection takes a buffer when it has something to read and
//! gives it back when it goes idle, and buffers wait in a small per-thread stack between
//! uses.
//!
//! A buffer given back may still be shared with pieces cut from it (the field values of a
//! head, a body handed on): it waits among the retired until those are gone and it can be
//! reused whole.
//!
//! A request's extensions are a boxed table that every layer inserts into; the proxy gives
//! them back, emptied, once it has sent the request on, and the server's next request
//! starts with them.

use std::cell::RefCell;
use std::collections::VecDeque;

use bytes::BytesMut;
use http::Extensions;

/// The size of a buffer.
pub(crate) const SIZE: usize = 8 * 1024;
/// A connection's read buffer starts with this much room: a head and a small body.
pub(crate) const READ_START: usize = SIZE;
/// A body is read at most this much at a time, on either side of the proxy.
pub(crate) const READ_MAX: usize = 64 * 1024;
/// A read buffer with less room than this (or than the read wants) grows before a read.
const MIN_ROOM: usize = 4 * 1024;
/// At most this many buffers wait, free or retired, per thread (512 KiB each way).
const KEEP: usize = 64;
/// Buffers that grew beyond this are not kept.
const LARGEST: usize = 4 * SIZE;
/// How many retired buffers a `take` looks at.
const LOOK: usize = 2;

#[derive(Default)]
struct Stock {
    /// Empty and whole, ready for use.
    free: Vec<BytesMut>,
    /// Empty, but possibly still shared with pieces cut from them; oldest first.
    retired: VecDeque<BytesMut>,
    /// Emptied request extensions.
    extensions: Vec<Extensions>,
}

thread_local! {
    static STOCK: RefCell<Stock> = RefCell::new(Stock::default());
}

/// An empty buffer with room for at least [`SIZE`] bytes.
pub(crate) fn take() -> BytesMut {
    STOCK
        .try_with(|stock| {
            let mut stock = stock.borrow_mut();
            if let Some(buf) = stock.free.pop() {
                return Some(buf);
            }
            for _ in 0..stock.retired.len().min(LOOK) {
                let mut buf = stock.retired.pop_front()?;
                if buf.try_reclaim(SIZE) {
                    return Some(buf);
                }
                stock.retired.push_back(buf);
            }
            None
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(SIZE))
}

/// Makes room in `read` before a read of up to `want` bytes (a head: [`READ_START`]; a
/// body: what its decoder says is left). The one read-buffer policy of both sides of the
/// proxy: a buffer with no memory takes one from the stock; one with less room than the
/// read wants (or than [`MIN_ROOM`]) grows by what it wants, between [`MIN_ROOM`] and
/// [`READ_MAX`], so a large body is read in large pieces.
#[inline]
pub(crate) fn make_room(read: &mut BytesMut, want: usize) {
    if read.capacity() - read.len() >= want.min(MIN_ROOM) {
        return;
    }
    if read.capacity() == 0 && want <= SIZE {
        *read = take();
    } else {
        read.reserve(want.clamp(MIN_ROOM, READ_MAX));
    }
}

/// Gives back a buffer whose contents are no longer needed.
pub(crate) fn give(mut buf: BytesMut) {
    if buf.capacity() == 0 || buf.capacity() > LARGEST {
        return;
    }
    buf.clear();
    let _ = STOCK.try_with(|stock| {
        let mut stock = stock.borrow_mut();
        if buf.try_reclaim(SIZE) {
            if stock.free.len() < KEEP {
                stock.free.push(buf);
            }
        } else if stock.retired.len() < KEEP {
            stock.retired.push_back(buf);
        }
    });
}

/// Empty extensions for a request, with room for the entries a gateway inserts.
///
/// A request's extensions start as a table of three entries, and a gateway inserts more
/// than that (the connection's details, its drain, the client IP, the route, an
/// identity...): the fourth insert would grow the table, allocating a new one and moving
/// the others, on every request. So fresh ones are clones of an empty table of seven (one
/// allocation, as the first insert would be), and used ones come back emptied.
pub(crate) fn extensions() -> Extensions {
    #[derive(Clone)]
    struct Slot<const N: usize>;

    thread_local! {
        static ROOMY: Extensions = {
            let mut ext = Extensions::new();
            ext.insert(Slot::<0>);
            ext.insert(Slot::<1>);
            ext.insert(Slot::<2>);
            ext.insert(Slot::<3>);
            // NOTE: `clear` keeps the table's allocation, and a clone copies its size.
            ext.clear();
            ext
        };
    }
    STOCK
        .try_with(|stock| stock.borrow_mut().extensions.pop())
        .ok()
        .flatten()
        .or_else(|| ROOMY.try_with(Extensions::clone).ok())
        .unwrap_or_default()
}

/// Gives back a request's extensions once the request is gone: emptied here (what they
/// hold is dropped), their table is reused.
pub(crate) fn give_extensions(mut ext: Extensions) {
    if ext.is_empty() {
        // Never used: there may be no table to keep.
        return;
    }
    ext.clear();
    let _ = STOCK.try_with(|stock| {
        let mut stock = stock.borrow_mut();
        if stock.extensions.len() < KEEP {
            stock.extensions.push(ext);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_come_back_empty() {
        let mut ext = extensions();
        ext.insert(7u32);
        ext.insert("route");
        give_extensions(ext);
        let again = extensions();
        assert!(again.is_empty());
        assert_eq!(again.get::<u32>(), None);
    }

    #[test]
    fn a_buffer_is_reused_once_the_pieces_cut_from_it_are_gone() {
        let mut buf = take();
        buf.extend_from_slice(b"head and body");
        let ptr = buf.as_ptr();
        let piece = buf.split_to(4).freeze();
        buf.clear();
        give(buf);
        // Still shared with `piece`: not handed out again.
        let other = take();
        assert_ne!(other.as_ptr(), ptr);
        drop(piece);
        let again = take();
        assert_eq!(
            again.as_ptr(),
            ptr,
            "reclaimed whole once the piece is gone"
        );
        assert!(again.capacity() >= SIZE && again.is_empty());
        give(other);
        give(again);
    }
}
