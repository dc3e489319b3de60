//! The crate's one error type.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why no broker could be found or started. The messages name the flags of the tools
/// that use this crate (`--strata-bin`, `--broker`): both take them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The binary the caller named does not exist.
    #[error("--strata-bin {} is not a file", .0.display())]
    NotAFile(PathBuf),
    /// No binary next to the executable, none built, none on `PATH`.
    #[error(
        "no strata binary at {} nor on PATH: build it with `cargo build --release -p \
         strata-broker --bin strata`, pass --strata-bin, or give a running broker with \
         --broker",
        .beside.display()
    )]
    NotFound {
        /// Where it was expected, next to the running executable.
        beside: PathBuf,
    },
    /// Bringing the binary up to date with cargo failed.
    #[error(
        "cargo build -p strata-broker --bin strata failed ({status}) or did not produce {}",
        .binary.display()
    )]
    Build {
        /// How cargo exited.
        status: ExitStatus,
        /// The binary it should have produced.
        binary: PathBuf,
    },
    /// The broker exited before it printed its address.
    #[error("{} exited before listening; its log:\n{log}", .binary.display())]
    Exited {
        /// The binary that ran.
        binary: PathBuf,
        /// What it wrote to stderr.
        log: String,
    },
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl Error {
    /// A closure that wraps an I/O error with what was being done, for `map_err`.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
