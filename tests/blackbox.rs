//! The black-box tests: each starts the real `strata` binary on a free port over a
//! temporary data directory and uses it as users do, through gRPC, the client SDK, the
//! CLI or the load generator. They are one test binary with a module per area, so a
//! build links them once; `cargo test -p strata-broker --test blackbox <module>::`
//! runs one area.

mod common;

mod bench;
mod broker;
mod client;
mod consumer;
mod disk_full;
mod groups;
mod hostile;
mod kafka;
mod metrics;
mod producer;
mod torture;
mod tour;
