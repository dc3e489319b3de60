//! `strata-broker`: topics and partitions over `strata-storage`, consumer groups, the
//! listeners, configuration, and the `strata` command line.
//!
//! The domain ([`broker`], [`topics`], [`groups`]) knows no wire protocol; each listener
//! ([`grpc`], [`kafka`]) decodes requests, calls the domain and encodes answers and errors. Only
//! this crate knows gRPC and topics; the storage crate knows neither.

pub mod broker;
pub mod cli;
pub mod config;
pub mod error;
pub mod groups;
pub mod grpc;
pub mod health;
pub mod http;
pub mod kafka;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod topics;
pub mod units;

pub use error::{Error, Result};
