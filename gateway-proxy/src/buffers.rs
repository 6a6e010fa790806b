//! Read buffers, recycled per thread.
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

use std::cell::RefCell;
use std::collections::VecDeque;

use bytes::BytesMut;

/// The size of a buffer.
pub(crate) const SIZE: usize = 8 * 1024;
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

#[cfg(test)]
mod tests {
    use super::*;

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
