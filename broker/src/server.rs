//! Runs the broker: opens the data directory, starts the listeners, drives periodic
//! maintenance, and shuts down cleanly.

use std::future::Future;
use std::sync::Arc;

use std::net::SocketAddr;

use tokio::net::TcpSocket;

use crate::broker::Broker;
use crate::config::ServeConfig;
use crate::error::Error;

/// How often idle partitions are committed (syncing data under the interval policy).
const COMMIT_TICK_MS: u64 = 100;
/// Connections the kernel queues before the broker accepts them (tokio's default).
const LISTEN_BACKLOG: u32 = 1024;

/// Serves until `shutdown` resolves, then answers queued requests and closes every log
/// cleanly. Prints `strata listening on <addr>` once the port is bound.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    // The address is taken before the data directory is touched, so a port in use costs
    // nothing and leaves no new directory behind; connections are accepted only once
    // every partition is open.
    let socket = bind(config.listen)?;
    let data_dir = config.data_dir.clone();
    let defaults = config.topic_defaults.clone();
    let max_open_files = config.max_open_files;
    let broker =
        tokio::task::spawn_blocking(move || Broker::open(&data_dir, defaults, max_open_files))
            .await?
            .map_err(|e| match e {
                Error::DataDirLocked { .. } => anyhow::anyhow!(
                    "{e}; stop that process, or give this broker a directory of its own with \
                     --data-dir <path>"
                ),
                e => anyhow::anyhow!(
                    "cannot open data directory {}: {e}",
                    config.data_dir.display()
                ),
            })?;
    let broker = Arc::new(broker);
    let listener = socket
        .listen(LISTEN_BACKLOG)
        .map_err(|e| listen_error(config.listen, e))?;
    let address = listener.local_addr()?;

    let maintenance = tokio::spawn(maintain(Arc::clone(&broker), config.retention_check));
    println!("strata listening on {address}");
    tracing::info!(%address, data_dir = %config.data_dir.display(), "serving");
    crate::grpc::serve(Arc::clone(&broker), listener, shutdown).await?;

    maintenance.abort();
    tracing::info!("shutting down: flushing and closing partitions");
    tokio::task::spawn_blocking(move || broker.shutdown()).await?;
    tracing::info!("shut down cleanly");
    Ok(())
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
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
