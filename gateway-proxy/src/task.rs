//! Small pieces for hand-written futures, shared by the server and the proxy.

use std::task::{Context, Waker};

/// Stores `cx`'s waker in `slot` unless the same one is there.
pub(crate) fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}
