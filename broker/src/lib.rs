//! `strata-broker`: topics and partitions over `strata-storage`, the gRPC services, group
//! commit, configuration, and the `strata` command line.
//!
//! Only this crate knows gRPC and topics; the storage crate knows neither.

pub mod assign;
pub mod broker;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod groups;
pub mod offsets;
pub mod partition;
pub mod server;
pub mod service;
pub mod topic;

pub use error::{Error, Result};
