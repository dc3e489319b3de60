//! The crate's one error type, and its one mapping to HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the checkout services.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed: bad JSON, a missing field, a bad header (400).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request is well formed but cannot be done as asked: an unknown product, an
    /// idempotency key reused with a different request (422).
    #[error("{0}")]
    Unprocessable(String),
    /// Not enough stock to reserve (409).
    #[error("out of stock: {sku} has {available} left, {requested} requested")]
    OutOfStock {
        /// The product that ran short.
        sku: String,
        /// What the order asked for.
        requested: i64,
        /// What is left.
        available: i64,
    },
    /// No such order, reservation or product (404).
    #[error("not found: {0}")]
    NotFound(String),
    /// A service this one depends on failed or could not be reached (503).
    #[error("{service} unavailable: {message}")]
    Unavailable {
        /// The service called.
        service: &'static str,
        /// What happened.
        message: String,
    },
    /// A service this one depends on refused the request with a client error, passed
    /// on with its status (an out-of-stock 409 from inventory, say).
    #[error("{service}: {message}")]
    Refused {
        /// The service called.
        service: &'static str,
        /// Its answer's status.
        status: StatusCode,
        /// Its error message.
        message: String,
    },
    /// A service this one depends on did not answer in time (504).
    #[error("{service} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The service called.
        service: &'static str,
        /// The deadline that passed.
        timeout_ms: u64,
    },
    /// An event that can never be processed: missing headers, an unknown type, a
    /// payload that does not decode. It goes to the dead-letter topic at once.
    #[error("bad event: {0}")]
    BadEvent(String),
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The broker failed.
    #[error("broker: {0}")]
    Broker(#[from] strata_client::Error),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A setting or the environment is unusable: a bad database URL, a missing
    /// service URL.
    #[error("{0}")]
    Setup(String),
    /// No `strata` binary, or a broker that would not start.
    #[error(transparent)]
    Spawn(#[from] strata_spawn::Error),
}

impl Error {
    /// A closure that wraps an I/O error with what was being done, for `map_err`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Invalid(_) | Error::BadEvent(_) => StatusCode::BAD_REQUEST,
            Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::OutOfStock { .. } => StatusCode::CONFLICT,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Refused { status, .. } => *status,
            Error::Unavailable { .. } | Error::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::Database(_) | Error::Io { .. } | Error::Setup(_) | Error::Spawn(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

/// Errors answer as `{"error": "<message>"}` with [`Error::status`]; server-side
/// failures are logged here, once.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        }
        let body = serde_json::json!({ "error": self.to_string() });
        (status, axum::Json(body)).into_response()
    }
}
