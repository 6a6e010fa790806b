//! Policy layers for the gateway, one module and one cargo feature each.
//!
//! The modules land one at a time; today this crate declares the feature list that users
//! depend on (`auth`, `rate-limit`, `cache`, `retry`, `circuit-breaker`, `request-id`, and
//! `full`), and the shared vocabulary every layer speaks comes from `gateway-core`:
//! rejections are [`gateway_core::Error`]s rendered in-band, identities and client addresses
//! are read from request extensions, and upstream outcomes are judged by
//! [`gateway_core::classify`].

#![forbid(unsafe_code)]

pub use gateway_core::{Error, ErrorKind};
