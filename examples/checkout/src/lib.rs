//! `checkout`: sample checkout services on Strata.
//!
//! The same checkout two ways, measured against each other:
//! - **event-driven** ([`services`]): the order service validates, reserves stock (the
//!   one synchronous call), stores the order as PENDING with its event in one
//!   transaction (the [`outbox`]), and answers; payment, inventory compensation,
//!   notification and the read models follow through Strata topics;
//! - **synchronous** ([`baseline`]): seven HTTP services called one after the other.
//!
//! Code map:
//! - [`events`]: topics, event types, payloads and their versions, the header envelope;
//!   the JSON Schemas are in `schemas/`.
//! - [`trace`]: W3C `traceparent` at the HTTP edge; records carry it through
//!   strata-client's own trace support.
//! - [`outbox`]: the transactional outbox and its relay; [`consume`]: the consumer
//!   loop every service uses (groups, dead letters, commits).
//! - [`services`]: order (API, idempotency, status projection), inventory (reservation,
//!   compensation), payment, notification, revenue (the late projection).
//! - [`db`]: one SQL code path for SQLite and PostgreSQL.
//! - [`catalog`]: the business rules both designs share; [`profile`]: the simulated
//!   latencies, tails, failures and outages both designs run under.
//! - [`system`]: every service in one process; [`load`]: the load generator and the
//!   comparison. A broker of its own, when none is given, is started with
//!   `strata-spawn`.
//! - [`http`]: the HTTP client and server plumbing; [`error`]: the one error type.

pub mod baseline;
pub mod catalog;
pub mod consume;
pub mod db;
pub mod dead_letters;
pub mod error;
pub mod events;
pub mod http;
pub mod load;
pub mod outbox;
pub mod profile;
pub mod services;
pub mod system;
pub mod trace;

pub use error::{Error, Result};

/// The README's example, compiled as a doc test so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
