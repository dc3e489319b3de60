//! `strata-spawn`: finding the `strata` binary and running a broker as a child process.
//!
//! The load generator (`strata-bench`) and the checkout sample start a broker of their
//! own when none is given. Neither links the broker (nothing but its own binary and
//! tests depends on `strata-broker`): they run the `strata` binary, and this crate is
//! the one place that knows how to find it, keep it fresh and start it.
//!
//! [`find_strata`] looks, in this order:
//! 1. at the path the caller was given (its `--strata-bin`);
//! 2. at `strata` next to the running executable (cargo puts both in
//!    `target/<profile>/`; test executables live one level down, in `deps/`). When
//!    cargo started the process (`cargo run`, `cargo test`: `CARGO` is set) and the
//!    broker's sources in this workspace are newer than that binary, or it is missing,
//!    it is built first with `cargo build -p strata-broker --bin strata` in the same
//!    profile, once per process, so neither a run nor a test uses a stale broker;
//! 3. at `strata` on `PATH`.
//!
//! [`SpawnedBroker::start`] runs `strata serve --listen 127.0.0.1:0` over a data
//! directory ([`BrokerDir`]) and reads the `strata listening on <addr>` line it prints
//! to learn its port.
//!
//! Invariants:
//! - An operator's `STRATA_*` environment never reaches the child: the broker runs with
//!   the settings on its command line and its defaults.
//! - Dropping a [`SpawnedBroker`] kills the process (SIGKILL) and waits for it, before
//!   any temporary directory it used is removed.
//! - The child never blocks on a full stdout pipe: its stdout is drained until it exits.

mod child;
mod error;
mod find;

pub use child::{BrokerDir, SpawnedBroker};
pub use error::{Error, Result};
pub use find::find_strata;
