//! HTTP plumbing: the small client every caller uses (the order service calling
//! inventory, the synchronous chain, the load generator), and serving a router.
//!
//! The client is hyper's pooled HTTP/1.1 client (already in the build through axum and
//! tonic); every call has a deadline and maps failures to [`Error::Unavailable`] and
//! [`Error::Timeout`] with the name of the service called.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Idle keep-alive connections kept per host.
const IDLE_CONNECTIONS_PER_HOST_MAX: usize = 256;
/// Largest response body read.
const RESPONSE_BYTES_MAX: usize = 1 << 20;

/// A pooled HTTP/1.1 client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

/// An answer: status, headers, body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| {
            Error::Setup(format!(
                "a {} answer is not the JSON expected: {e}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            ))
        })
    }

    /// `Ok` for a 2xx answer of `service`; a 4xx is passed on as [`Error::Refused`]
    /// (with its status), anything else is [`Error::Unavailable`].
    pub fn ensure_success(&self, service: &'static str) -> Result<()> {
        let status = self.status;
        if status.is_success() {
            Ok(())
        } else if status.is_client_error() {
            Err(Error::Refused {
                service,
                status,
                message: self.error_message(),
            })
        } else {
            Err(Error::Unavailable {
                service,
                message: format!("{status}: {}", self.error_message()),
            })
        }
    }

    /// The `error` of a JSON error body, or the body as text.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient::new()
    }
}

impl HttpClient {
    /// A client with its own connection pool.
    pub fn new() -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST_MAX)
            .build(connector);
        HttpClient { client }
    }

    /// Sends a request to `service` and reads the whole answer, within `timeout`.
    pub async fn request(
        &self,
        service: &'static str,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<HttpResponse> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            let value = HeaderValue::from_str(value)
                .map_err(|e| Error::Invalid(format!("header {name}: {e}")))?;
            request = request.header(*name, value);
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::Invalid(format!("request to {url}: {e}")))?;
        let unavailable = |e: &dyn std::error::Error| Error::Unavailable {
            service,
            message: error_chain(e),
        };
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unavailable(&e))?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| unavailable(e.as_ref()))?
                .to_bytes();
            Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| Error::Timeout {
                service,
                timeout_ms: timeout.as_millis() as u64,
            })?
    }

    /// POSTs `body` as JSON.
    pub async fn post_json<T: Serialize>(
        &self,
        service: &'static str,
        url: &str,
        headers: &[(&str, &str)],
        body: &T,
        timeout: Duration,
    ) -> Result<HttpResponse> {
        let body = serde_json::to_vec(body)
            .map_err(|e| Error::Invalid(format!("cannot encode a request: {e}")))?;
        self.request(
            service,
            Method::POST,
            url,
            headers,
            Some(body.into()),
            timeout,
        )
        .await
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A router being served.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `listen` (port 0 picks a free port) and serves `router` until `shutdown`,
    /// then lets requests in progress finish.
    pub async fn start(
        name: &'static str,
        listen: SocketAddr,
        router: Router,
        shutdown: CancellationToken,
    ) -> Result<Server> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(Error::io(format!("{name}: bind {listen}")))?;
        let addr = listener
            .local_addr()
            .map_err(Error::io(format!("{name}: local address")))?;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await });
            if let Err(e) = serve.await {
                tracing::warn!(service = name, error = %e, "HTTP server failed");
            }
        });
        Ok(Server { addr, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits up to `grace` for requests in progress after the shutdown was signalled,
    /// then drops the rest (a request that hangs forever, as in an outage, must not
    /// hold the process).
    pub async fn join(self, grace: Duration) {
        let mut task = self.task;
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
    }
}
