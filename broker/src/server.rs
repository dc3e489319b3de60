//! Runs the broker: opens the data directory, starts the listeners, drives periodic
//! maintenance, and shuts down cleanly.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::config::ServeConfig;

/// How often idle partitions are committed (syncing data under the interval policy).
const COMMIT_TICK_MS: u64 = 100;

/// Serves until `shutdown` resolves, then answers queued requests and closes every log
/// cleanly. Prints `strata listening on <addr>` once the port is bound.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let defaults = config.topic_defaults.clone();
    let max_open_files = config.max_open_files;
    let broker =
        tokio::task::spawn_blocking(move || Broker::open(&data_dir, defaults, max_open_files))
            .await?
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot open data directory {}: {e}",
                    config.data_dir.display()
                )
            })?;
    let broker = Arc::new(broker);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
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
