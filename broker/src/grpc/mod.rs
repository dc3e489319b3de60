//! The gRPC listener: the `Admin`, `Broker` and `Groups` services, translating requests
//! into calls on the domain ([`crate::broker`], [`crate::topics`], [`crate::groups`])
//! and domain errors into statuses in one place ([`status`]).

pub mod checks;
pub mod connections;
pub mod groups;
pub mod instrument;
pub mod service;
pub mod status;

/// Largest gRPC message the server accepts or sends: a produce request carries at most
/// one batch (max_message_bytes), a fetch at most FETCH_BYTES_MAX plus one batch.
const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// HTTP/2 flow-control windows. The protocol's defaults (64 KiB) make a 4 MiB fetch or a
/// burst of 64 KiB produce requests wait for a window update every 64 KiB; clients should
/// use the same values (the CLI does).
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// See [`STREAM_WINDOW_BYTES`].
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest header list (gRPC metadata) of a request: trace context, a few custom
/// headers; gRPC implementations commonly allow 8 to 16 KiB.
const HEADER_LIST_BYTES_MAX: u32 = 64 << 10;
/// Largest HTTP/2 frame each side accepts. The protocol's default of 16 KiB cuts a 4 MiB
/// fetch into 256 frames; larger frames cut the per-frame work of both sides.
pub const FRAME_BYTES_MAX: u32 = 1 << 20;

use std::future::Future;
use std::sync::Arc;

use strata_proto::v1::admin_server::AdminServer;
use strata_proto::v1::broker_server::BrokerServer;
use strata_proto::v1::groups_server::GroupsServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::broker::Broker;
use crate::health::Problem;
use crate::limits::Limits;
use crate::topics::settings::MESSAGE_BYTES_CAP;
use connections::{Accepting, Cut};
use instrument::RequestsLayer;
use service::{Service, FETCH_BYTES_MAX};

/// Serves the gRPC services (with health and reflection) on `listener` until `shutdown`
/// resolves; then health turns NOT_SERVING, long polls answer, Subscribe streams end,
/// and queued requests are answered before this returns.
///
/// Health follows the broker's faults: `strata.v1.Broker` is NOT_SERVING while a
/// partition is fail-stopped, `strata.v1.Groups` while the offsets log is, and the
/// whole server (the empty service name) while either is.
pub async fn serve(
    broker: Arc<Broker>,
    limits: Limits,
    fetch_budget: Arc<tokio::sync::Semaphore>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    const { assert!(FETCH_BYTES_MAX < MESSAGE_BYTES_MAX) };
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(strata_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let metrics = Arc::clone(broker.metrics());
    let reporter = tokio::spawn(report_health(Arc::clone(&broker), health.clone()));
    let service = Service::new(broker, limits.clone(), fetch_budget);
    let stopping = service.clone();
    // Long polls and Subscribe streams would otherwise hold a graceful shutdown open.
    let shutdown = async move {
        shutdown.await;
        reporter.abort();
        // Wait for it to stop, so it cannot report SERVING after what follows.
        let _ = reporter.await;
        // Health checks see the broker going away before connections close.
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health.set_not_serving::<AdminServer<Service>>().await;
        health.set_not_serving::<BrokerServer<Service>>().await;
        health.set_not_serving::<GroupsServer<Service>>().await;
        stopping.stop_waiting();
    };
    let cut = Arc::new(Cut::default());
    let incoming = connections::incoming(
        listener,
        Accepting {
            max_connections: limits.connections,
            keepalive: limits.keepalive_interval,
            gauge: metrics.connections.clone(),
            cut: Arc::clone(&cut),
        },
    );
    let (draining, mut drain_begun) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        draining.send_replace(true);
    };
    let served = tonic::transport::Server::builder()
        // tonic's default is no limit at all (hyper's own is 200).
        .max_concurrent_streams(limits.streams_per_connection)
        // Peers that vanish without closing (a crashed host, a dropped NAT entry) are
        // found by PINGs and their connections dropped.
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        // hyper's default lets every request carry 16 MiB of headers (metadata).
        .http2_max_header_list_size(HEADER_LIST_BYTES_MAX)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX)
        .layer(RequestsLayer::new(Arc::clone(&metrics)))
        .add_service(
            AdminServer::new(service.clone())
                .max_decoding_message_size(limits.admin_request_bytes)
                .max_encoding_message_size(MESSAGE_BYTES_MAX),
        )
        .add_service(
            GroupsServer::new(service.clone())
                .max_decoding_message_size(limits.groups_request_bytes)
                .max_encoding_message_size(MESSAGE_BYTES_MAX),
        )
        .add_service(
            BrokerServer::new(service)
                // A produce request carries one batch of at most MESSAGE_BYTES_CAP; a
                // tighter bound also limits what a records-form request costs decoded.
                .max_decoding_message_size(MESSAGE_BYTES_CAP as usize + (1 << 20))
                .max_encoding_message_size(MESSAGE_BYTES_MAX),
        )
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, shutdown);
    tokio::pin!(served);
    tokio::select! {
        served = &mut served => return Ok(served?),
        _ = drain_begun.wait_for(|&begun| begun) => {}
    }
    // Requests in progress get the drain time; then whatever is still open (a client
    // that stopped sending halfway, a health Watch stream) is cut.
    if let Ok(served) = tokio::time::timeout(limits.shutdown_timeout, &mut served).await {
        return Ok(served?);
    }
    tracing::warn!(
        open = metrics.connections.get(),
        drain = ?limits.shutdown_timeout,
        "shutdown: connections still open after the drain time; cutting them"
    );
    cut.cut();
    if tokio::time::timeout(CUT_WAIT, &mut served).await.is_err() {
        tracing::warn!("shutdown: cut connections did not close; going on without them");
    }
    Ok(())
}

/// How long the server may take to drop connections once they are cut.
const CUT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps the health service in step with the broker's faults: a fail-stopped partition
/// stays so until a restart; the offsets log's fault goes away once it recovers.
async fn report_health(broker: Arc<Broker>, health: HealthReporter) {
    let mut changed = broker.faults().changed();
    loop {
        let problems = broker.problems();
        let partition_failed = problems
            .iter()
            .any(|p| matches!(p, Problem::PartitionFailed { .. }));
        let offsets_failed = problems
            .iter()
            .any(|p| matches!(p, Problem::OffsetsFailed { .. }));
        let status = |failed: bool| {
            if failed {
                ServingStatus::NotServing
            } else {
                ServingStatus::Serving
            }
        };
        health
            .set_service_status("", status(!problems.is_empty()))
            .await;
        health.set_serving::<AdminServer<Service>>().await;
        health
            .set_service_status(
                <BrokerServer<Service> as NamedService>::NAME,
                status(partition_failed),
            )
            .await;
        health
            .set_service_status(
                <GroupsServer<Service> as NamedService>::NAME,
                status(offsets_failed),
            )
            .await;
        if changed.changed().await.is_err() {
            return;
        }
    }
}
