//! Runs the broker: opens the data directory, starts the listeners, drives periodic
//! maintenance, and shuts down cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strata_storage::FileCache;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::config::ServeConfig;
use crate::error::Error;
use crate::http::HttpState;
use crate::metrics::{Metrics, Source};

/// How often idle partitions are committed (syncing data under the interval policy).
const COMMIT_TICK_MS: u64 = 100;
/// Connections the kernel queues before the broker accepts them (tokio's default).
const LISTEN_BACKLOG: u32 = 1024;

/// Serves until `shutdown` resolves, then answers queued requests and closes every log
/// cleanly; fails if some log could not be closed cleanly. Prints
/// `strata http on http://<addr>` (unless the HTTP listener is off), then
/// `strata listening on <addr>` once both ports are bound and the data directory is open.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // Both addresses are taken before the data directory is touched: a port in use fails
    // at once and leaves no new directory behind. /readyz answers "starting" while
    // recovery runs; the gRPC port accepts connections only once every partition is open.
    let socket = bind(config.listen)?;
    let metrics = Arc::new(Metrics::new(config.kafka.is_some()));
    let source = Arc::new(Source::default());
    let http = HttpListener::start(
        config.http_listen,
        config.limits.http_connections,
        &metrics,
        Arc::clone(&source),
    )
    .await?;
    let kafka = match &config.kafka {
        Some(kafka) => Some(crate::kafka::Listener::bind(kafka).await?),
        None => None,
    };

    let nofile = raise_nofile_limit();
    // Before opening: each partition opened maps its indexes, so the open itself fails
    // past the limit.
    check_map_count(map_count_limit(), &config);
    let data_dir = config.data_dir.clone();
    let defaults = config.topic_defaults.clone();
    let files = FileCache::with_mapped_max(config.max_open_files, config.max_mapped_segments);
    let broker =
        tokio::task::spawn_blocking(move || Broker::open(&data_dir, defaults, files, metrics))
            .await?
            .map_err(|e| match e {
                Error::DataDirLocked { .. } => anyhow::anyhow!(
                    "{e}; stop that process, or give this broker a directory of its own with \
             --data-dir <path>"
                ),
                e if e.errno() == Some(crate::error::ENOMEM) => anyhow::anyhow!(
                    "cannot open data directory {}: {e}; if the warning above says so, raise \
             vm.max_map_count (each partition maps its indexes)",
                    config.data_dir.display()
                ),
                e => anyhow::anyhow!(
                    "cannot open data directory {}: {e}",
                    config.data_dir.display()
                ),
            })?;
    let broker = Arc::new(broker);
    check_nofile_limit(nofile, &config, &broker);
    broker
        .coordinator()
        .set_limits(config.limits.group_members, config.limits.groups);
    broker
        .kafka_members()
        .set_limits(config.limits.group_members, config.limits.groups);
    broker.set_max_partitions(config.limits.partitions);
    let listener = socket
        .listen(LISTEN_BACKLOG)
        .map_err(|e| listen_error(config.listen, e))?;
    let address = listener.local_addr()?;
    source.serve(Arc::clone(&broker));

    let maintenance = tokio::spawn(maintain(Arc::clone(&broker), config.retention_check));
    let expiry = tokio::spawn(expire_offsets(
        Arc::clone(&broker),
        config.limits.offsets_retention,
        config.retention_check,
    ));
    // Fetch responses of both listeners count against one fetch_memory_bytes.
    let fetch_budget = Arc::new(tokio::sync::Semaphore::new(
        config.limits.fetch_memory_bytes,
    ));
    let kafka = kafka.map(|listener| {
        println!("strata kafka on {}", listener.local_addr());
        listener.start(
            Arc::clone(&broker),
            &config.limits,
            Arc::clone(&fetch_budget),
        )
    });
    println!("strata listening on {address}");
    tracing::info!(%address, data_dir = %config.data_dir.display(), "serving");
    let stopping = Arc::clone(&source);
    let drain = config.limits.shutdown_timeout;
    let kafka_stopper = kafka.as_ref().map(crate::kafka::Running::stopper);
    let shutdown = async move {
        shutdown.await;
        if let Some(kafka) = kafka_stopper {
            kafka.drain();
        }
        tracing::info!(
            ?drain,
            "shutting down: no new connections; answering requests in progress for at most \
             the drain time, then cutting the connections still open"
        );
        stopping.stop();
    };
    let served = crate::grpc::serve(
        Arc::clone(&broker),
        config.limits.clone(),
        fetch_budget,
        listener,
        shutdown,
    )
    .await;

    maintenance.abort();
    expiry.abort();
    // Wait for it: an expiry in progress holds the broker and writes the offsets log.
    let _ = expiry.await;
    // Its drain began with gRPC's; it gets what is left of the same drain time.
    if let Some(kafka) = kafka {
        kafka.stop(drain).await;
    }
    tracing::info!("shutting down: flushing and closing partitions");
    let errors = tokio::task::spawn_blocking(move || broker.shutdown()).await?;
    http.stop().await;
    served?;
    if !errors.is_empty() {
        anyhow::bail!(
            "shut down, but {} log(s) did not close cleanly; the next start recovers them: {}",
            errors.len(),
            errors.join("; ")
        );
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: the broker holds one
/// descriptor per partition and one per connection, and the usual soft limit (1024)
/// is easily reached. Returns the limit in force (`None`: unlimited).
fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return limit.current;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = ?limit.current, to = ?limit.maximum, "raised the open-file limit");
            limit.maximum
        }
        Err(e) => {
            tracing::warn!(error = %e, limit = ?limit.current, "cannot raise the open-file limit");
            limit.current
        }
    }
}

/// Descriptors the broker needs beyond those of partitions and connections: the data
/// directory's lock, the offsets log, listeners, the runtime, standard streams.
const NOFILE_MARGIN: u64 = 64;

/// Descriptors the broker may need: [`NOFILE_MARGIN`], one per partition (the active
/// segment's log; its indexes are mapped without one), the segment read budget and one
/// per connection.
fn nofile_needed(partitions: u64, max_open_files: usize, max_connections: usize) -> u64 {
    NOFILE_MARGIN + partitions + max_open_files as u64 + max_connections as u64
}

/// Connections the broker may hold open: gRPC's `max_connections`, and the Kafka
/// listener's [`crate::kafka::CONNECTIONS_MAX`] when it is on.
fn connections_max(max_connections: usize, kafka: bool) -> usize {
    max_connections
        + if kafka {
            crate::kafka::CONNECTIONS_MAX
        } else {
            0
        }
}

/// Warns when the open-file limit is below what the configuration may need: past it,
/// segment rolls fail (refusing the produces that need them until descriptors are
/// free again) or connections are refused.
fn check_nofile_limit(limit: Option<u64>, config: &ServeConfig, broker: &Broker) {
    let partitions: u64 = broker
        .topics()
        .iter()
        .map(|t| u64::from(t.settings.partitions))
        .sum();
    let http = if config.http_listen.is_some() {
        config.limits.http_connections
    } else {
        0
    };
    let connections = connections_max(config.limits.connections, config.kafka.is_some()) + http;
    let needed = nofile_needed(partitions, config.max_open_files, connections);
    if let Some(limit) = limit.filter(|&limit| limit < needed) {
        tracing::warn!(
            limit,
            needed,
            partitions,
            max_open_files = config.max_open_files,
            max_connections = config.limits.connections,
            kafka_connections = connections - config.limits.connections - http,
            http_connections = http,
            "the open-file limit (ulimit -n) is below what this broker may need \
             (64 + partitions + max_open_files + max_connections + 1024 Kafka \
             connections when the Kafka listener is on + max_http_connections when the \
             HTTP listener is on): raise the hard limit, or lower --max-connections or \
             --max-open-files"
        );
    }
}

/// Memory mappings the process needs beyond the indexes: the binary and libraries,
/// thread stacks and their guard pages (tokio's blocking pool, which serves reads, grows
/// to 512 threads), the allocator's arenas. 10,000 idle partitions ran with 368 of them
/// (docs/benchmarks.md, "The writer pool").
const MAP_COUNT_MARGIN: u64 = 4096;

/// Memory mappings the broker may need: two per partition (the active segment's
/// indexes) up to `max_partitions`, two per sealed segment kept mapped for reads, and
/// [`MAP_COUNT_MARGIN`].
fn map_count_needed(max_partitions: u64, max_mapped_segments: usize) -> u64 {
    MAP_COUNT_MARGIN + 2 * max_partitions + 2 * max_mapped_segments as u64
}

/// The kernel's limit of memory mappings per process (`vm.max_map_count`), if known.
fn map_count_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// The start's warning when `vm.max_map_count` (`limit`) is below what the partitions
/// this broker may hold and its mapping budget may need: past it, opening a partition,
/// rolling a segment or mapping a sealed segment's indexes for a read fails.
fn map_count_warning(
    limit: u64,
    max_partitions: u64,
    max_mapped_segments: usize,
) -> Option<String> {
    let needed = map_count_needed(max_partitions, max_mapped_segments);
    (limit < needed).then(|| {
        format!(
            "the kernel's memory-mapping limit (vm.max_map_count = {limit}) is below what \
             this broker may need ({needed} = {MAP_COUNT_MARGIN} + 2 × max_partitions + 2 × \
             max_mapped_segments): raise it (sysctl -w vm.max_map_count=<n>, and a file in \
             /etc/sysctl.d to keep it), or lower --max-partitions or --max-mapped-segments"
        )
    })
}

/// Logs [`map_count_warning`] at start, if the limit is known and too low.
fn check_map_count(limit: Option<u64>, config: &ServeConfig) {
    let max_partitions = config.limits.partitions as u64;
    if let Some(warning) =
        limit.and_then(|limit| map_count_warning(limit, max_partitions, config.max_mapped_segments))
    {
        tracing::warn!("{warning}");
    }
}

/// Binds a socket to `address` without listening yet.
fn bind(address: SocketAddr) -> anyhow::Result<TcpSocket> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    // As a listener bound by tokio: a restart may take a port whose old connections
    // are still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address).map_err(|e| listen_error(address, e))?;
    Ok(socket)
}

fn listen_error(address: SocketAddr, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!(
            "cannot listen on {address}: the address is in use (by another strata serve, or \
             another program); stop that, or choose another address with --listen <ip:port> \
             (port 0 picks a free port)"
        )
    } else {
        anyhow::anyhow!("cannot listen on {address}: {e}")
    }
}

/// The HTTP listener's task, when it is on.
struct HttpListener {
    task: Option<(
        tokio::sync::oneshot::Sender<()>,
        JoinHandle<std::io::Result<()>>,
    )>,
}

/// How long a stopping HTTP listener waits for requests in progress (a scrape) before
/// it drops their connections: a client that never finishes its request must not hold
/// the shutdown.
const HTTP_STOP_WAIT: Duration = Duration::from_secs(2);

impl HttpListener {
    /// Binds and starts serving `/healthz`, `/readyz` (starting) and `/metrics`.
    async fn start(
        address: Option<SocketAddr>,
        max_connections: usize,
        metrics: &Metrics,
        source: Arc<Source>,
    ) -> anyhow::Result<HttpListener> {
        let Some(address) = address else {
            return Ok(HttpListener { task: None });
        };
        let state = Arc::new(HttpState::new(metrics, source));
        let listener = TcpListener::bind(address).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for HTTP (metrics) on {address}: {e}; choose another address \
                 with --http-listen, or turn it off with --http-listen off"
            )
        })?;
        println!("strata http on http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(crate::http::serve(
            listener,
            max_connections,
            Arc::clone(&state),
            async {
                let _ = stopped.await;
            },
        ));
        Ok(HttpListener {
            task: Some((stop, task)),
        })
    }

    /// Stops serving once everything else has shut down, waiting at most
    /// [`HTTP_STOP_WAIT`] for requests in progress.
    async fn stop(self) {
        if let Some((stop, mut task)) = self.task {
            let _ = stop.send(());
            match tokio::time::timeout(HTTP_STOP_WAIT, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the HTTP listener failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP listener panicked"),
                Err(_) => {
                    tracing::info!("dropping HTTP connections with unfinished requests");
                    task.abort();
                }
            }
        }
    }
}

async fn maintain(broker: Arc<Broker>, retention_every: std::time::Duration) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(COMMIT_TICK_MS));
    let mut last_retention = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let retention = last_retention.elapsed() >= retention_every;
        if retention {
            last_retention = tokio::time::Instant::now();
        }
        broker.maintain(retention);
        broker.expire_members();
    }
}

/// Every `every`, deletes the committed offsets of groups empty for `retention`.
async fn expire_offsets(broker: Arc<Broker>, retention: Duration, every: Duration) {
    let mut activity = crate::groups::api::GroupActivity::new(strata_storage::now_ms());
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        crate::groups::api::expire_offsets(
            &broker,
            retention,
            &mut activity,
            strata_storage::now_ms(),
        )
        .await;
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    let signal = tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!(signal, "received a shutdown signal");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mapping_check_counts_every_partition_the_broker_may_hold() {
        // The defaults fit the kernel's default limit, 65,530.
        let defaults = crate::limits::Limits::default().partitions as u64;
        assert_eq!(map_count_warning(65_530, defaults, 1024), None);
        assert_eq!(map_count_needed(10_000, 1024), 4096 + 20_000 + 2048);
        let warning = map_count_warning(65_530, 40_000, 1024).expect("80,000 mappings");
        assert!(
            warning
                .contains("vm.max_map_count = 65530) is below what this broker may need (86144 = "),
            "{warning}"
        );
        assert_eq!(map_count_warning(86_144, 40_000, 1024), None);
        assert!(map_count_warning(86_143, 40_000, 1024).is_some());
    }

    #[test]
    fn the_open_file_check_counts_kafka_connections_when_the_listener_is_on() {
        assert_eq!(connections_max(100, false), 100);
        assert_eq!(
            connections_max(100, true),
            100 + crate::kafka::CONNECTIONS_MAX
        );
        assert_eq!(
            nofile_needed(10, 50, connections_max(100, true)),
            NOFILE_MARGIN + 10 + 50 + 100 + 1024
        );
    }
}
