//! A small HTTP GET client for the broker's own HTTP listener (`strata top`, tests),
//! built on hyper: a status and a text body, with a deadline.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Longest a request may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The address does not make a valid URL.
    #[error("invalid address {0:?}: give host:port")]
    Address(String),
    /// No answer: not reachable, refused, or too slow.
    #[error("cannot reach {url}: {cause}")]
    Unreachable {
        /// What was asked for.
        url: String,
        /// Why.
        cause: String,
    },
}

/// GETs `path` from `host:port`: the status code and the body as text.
pub async fn get(address: &str, path: &str) -> Result<(u16, String), GetError> {
    let url = format!("http://{address}{path}");
    let uri: http::Uri = url.parse().map_err(|_| GetError::Address(address.into()))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let unreachable = |cause: String| GetError::Unreachable {
        url: url.clone(),
        cause,
    };
    let exchange = async {
        let response = client
            .get(uri)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {TIMEOUT:?}")))?
}
