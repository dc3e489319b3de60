//! The one error type of the load generator.

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options do not describe a runnable workload.
    #[error("invalid options: {0}")]
    Config(String),
    /// A Strata client call failed.
    #[error("strata: {0}")]
    Strata(#[from] strata_client::Error),
    /// Getting the Strata broker ready for the run failed.
    #[error("broker: {0}")]
    Broker(String),
    /// Finding or starting the `strata` binary failed.
    #[error("broker: {0}")]
    Spawn(#[from] strata_spawn::Error),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A peer broker was reached but failed.
    #[error("{backend}: {message}")]
    Peer {
        /// `nats` or `redis`.
        backend: &'static str,
        /// What failed.
        message: String,
    },
    /// A peer broker could not be reached: the run is skipped, not failed.
    #[error("{backend} not reachable at {address}: {message}")]
    Unreachable {
        /// `nats` or `redis`.
        backend: &'static str,
        /// Where it was looked for.
        address: String,
        /// Why the connection failed.
        message: String,
    },
    /// A task of the run panicked or was cancelled (a bug in the load generator).
    #[error("a task of the run failed: {0}")]
    Task(String),
    /// The target was asked for but this binary was built without it.
    #[error(
        "--target {0} needs the `{0}` feature: cargo run --release -p strata-bench --features {0} -- ..."
    )]
    NotBuilt(&'static str),
}

/// Result with the load generator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] saying what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
