//! Runs the broker: opens the data directory, serves gRPC (with health and reflection),
//! drives periodic maintenance, and shuts down cleanly.

use std::future::Future;
use std::sync::Arc;

use strata_proto::v1::admin_server::AdminServer;
use strata_proto::v1::broker_server::BrokerServer;
use strata_proto::v1::groups_server::GroupsServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::broker::Broker;
use crate::config::ServeConfig;
use crate::service::{Service, FETCH_BYTES_MAX};
use crate::topic::MESSAGE_BYTES_CAP;

/// Largest gRPC message the server accepts or sends: a produce request carries at most
/// one batch (max_message_bytes), a fetch at most FETCH_BYTES_MAX plus one batch.
const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// HTTP/2 flow-control windows. The protocol's defaults (64 KiB) make a 4 MiB fetch or a
/// burst of 64 KiB produce requests wait for a window update every 64 KiB; clients should
/// use the same values (the CLI does).
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// See [`STREAM_WINDOW_BYTES`].
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest HTTP/2 frame each side accepts. The protocol's default of 16 KiB cuts a 4 MiB
/// fetch into 256 frames; larger frames cut the per-frame work of both sides.
pub const FRAME_BYTES_MAX: u32 = 1 << 20;
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

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<Service>>().await;
    health.set_serving::<BrokerServer<Service>>().await;
    health.set_serving::<GroupsServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(strata_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let service = Service::new(Arc::clone(&broker));
    let stopping = service.clone();
    // Long polls and Subscribe streams would otherwise hold a graceful shutdown open.
    let shutdown = async move {
        shutdown.await;
        // Health checks see the broker going away before connections close.
        health.set_not_serving::<AdminServer<Service>>().await;
        health.set_not_serving::<BrokerServer<Service>>().await;
        health.set_not_serving::<GroupsServer<Service>>().await;
        stopping.stop_waiting();
    };
    const { assert!(FETCH_BYTES_MAX < MESSAGE_BYTES_MAX) };

    let maintenance = tokio::spawn(maintain(Arc::clone(&broker), config.retention_check));
    println!("strata listening on {address}");
    tracing::info!(%address, data_dir = %config.data_dir.display(), "serving");
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX)
        .add_service(
            AdminServer::new(service.clone())
                .max_decoding_message_size(MESSAGE_BYTES_MAX)
                .max_encoding_message_size(MESSAGE_BYTES_MAX),
        )
        .add_service(GroupsServer::new(service.clone()))
        .add_service(
            BrokerServer::new(service)
                // A produce request carries one batch of at most MESSAGE_BYTES_CAP; a
                // tighter bound also limits what a records-form request costs decoded.
                .max_decoding_message_size(MESSAGE_BYTES_CAP as usize + (1 << 20))
                .max_encoding_message_size(MESSAGE_BYTES_MAX),
        )
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;

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
