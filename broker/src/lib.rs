//! `strata-broker`: topics and partitions over `strata-storage`, consumer groups, the
//! listeners, configuration and `strata serve`. The other subcommands of the `strata`
//! binary, a client of the broker, live in the binary itself (`src/main.rs`, `src/cli/`).
//!
//! The domain ([`broker`], [`topics`], [`groups`]) knows no wire protocol; each listener
//! ([`grpc`]) decodes requests, calls the domain and encodes answers and errors. Only
//! this crate knows gRPC and topics; the storage crate knows neither.

pub mod broker;
pub mod config;
pub mod error;
pub mod groups;
pub mod grpc;
pub mod server;
pub mod topics;
pub mod units;

pub use error::{Error, Result};
