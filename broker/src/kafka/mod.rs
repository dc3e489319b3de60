//! The Kafka wire protocol listener: existing Kafka clients (librdkafka and kcat,
//! kafka-python, ...) produce to and fetch from the same topics as gRPC clients.
//!
//! Like every interface it only decodes, calls the domain and encodes: the codecs are
//! the `kafka-protocol` crate's; the topics, partitions and producer ids are the
//! broker's. Stored batches are Kafka record batches v2, so Produce stores the bytes a
//! client sent (after validation) and Fetch serves the stored bytes as they are.
//!
//! Each connection is served one request at a time, so responses go back in request
//! order (Kafka clients pipeline and match responses by order). A request is bounded
//! ([`REQUEST_BYTES_MAX`]), and so are the bytes of requests held at once across all
//! connections ([`REQUEST_BUDGET_BYTES`]) and the number of connections
//! ([`CONNECTIONS_MAX`]); every length and count in a request is checked against the
//! frame, and every client-sized array against the broker's topics and limits, before
//! the codec reads it (see [`guard`]). A request's budget is returned once it is
//! answered, or once it is decoded into bounded owned state when it then waits (a
//! JoinGroup, SyncGroup or Fetch long poll); a produced batch carries its share to the
//! partition's writer. A Fetch answer holds its share of the broker's fetch memory
//! budget (shared with gRPC) until written, and waits for it at most its max_wait; a
//! write, like an idle connection, is bounded in time. A shutdown drains the listener
//! with the gRPC one (see [`Running::stop`]) and waits for the topic creations and
//! deletions its clients started.

mod errors;
mod groups;
mod guard;
mod handlers;
pub mod membership;
mod unserved;
pub mod versions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseHeader};
use kafka_protocol::protocol::{decode_request_header_from_buffer, Encodable};
use kafka_protocol::ResponseError;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::broker::Broker;
use crate::config::KafkaListen;
use crate::grpc::connections::{AcceptPacer, Warner};
use crate::grpc::instrument::InFlight;
use crate::limits::Limits;

/// Largest request frame (Kafka's `socket.request.max.bytes` is 100 MiB; a produce
/// request carries at most one batch per partition, each at most 32 MiB).
pub const REQUEST_BYTES_MAX: usize = 64 << 20;
/// Bytes of request frames held at once across all Kafka connections; a connection
/// whose next request does not fit waits for others to finish.
pub const REQUEST_BUDGET_BYTES: usize = 512 << 20;
/// Most Kafka connections open at once; further ones are closed when accepted.
pub const CONNECTIONS_MAX: usize = 1024;
/// How long a request's bytes may take to arrive once its size is read, so a stalled
/// client cannot hold its share of the request budget.
const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a response may take to be written: a client that stops reading cannot
/// hold its response buffer (and its connection slot) for longer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection may stay without a request before the broker closes it
/// (Kafka's `connections.max.idle.ms` default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A connection keeps a response buffer up to this capacity between requests; a
/// larger one (a big Fetch) is freed once written.
const RESPONSE_BUFFER_KEPT: usize = 1 << 20;
/// The node id of this broker in Metadata: Strata is one node.
const NODE_ID: i32 = 0;

/// A bound Kafka listener, not yet serving.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    advertised: (String, u16),
    auto_create_topics: bool,
}

impl Listener {
    /// Binds the listener's address.
    pub async fn bind(config: &KafkaListen) -> anyhow::Result<Listener> {
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for Kafka clients on {}: {e}; choose another address with \
                 --kafka-listen (port 0 picks a free port), or turn it off with \
                 --kafka-listen off",
                config.listen
            )
        })?;
        let bound = listener.local_addr()?;
        let advertised = config
            .advertised
            .clone()
            .unwrap_or_else(|| (bound.ip().to_string(), bound.port()));
        Ok(Listener {
            listener,
            advertised,
            auto_create_topics: config.auto_create_topics,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Starts accepting connections served by `broker`, within the `limits` that apply
    /// to Kafka clients too (TCP keepalive probes every `keepalive_interval` on idle
    /// connections, `commit_metadata_bytes`). Fetch responses are held within
    /// `fetch_budget` (`fetch_memory_bytes`, shared with gRPC) until written.
    pub fn start(
        self,
        broker: Arc<Broker>,
        limits: &Limits,
        fetch_budget: Arc<Semaphore>,
    ) -> Running {
        let (stopping, stop) = tokio::sync::watch::channel(Phase::Serving);
        let context = Arc::new(Context {
            broker,
            limits: limits.clone(),
            host: self.advertised.0,
            port: self.advertised.1.into(),
            budget: Arc::new(Semaphore::new(REQUEST_BUDGET_BYTES)),
            fetch_budget,
            auto_create_topics: self.auto_create_topics,
            admin: Admin::default(),
            stop,
        });
        Running {
            task: tokio::spawn(accept(self.listener, context)),
            stopper: Stopper {
                phase: Arc::new(stopping),
                began: Arc::new(std::sync::OnceLock::new()),
            },
        }
    }
}

/// Where a listener is in its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// No new connections; each open one answers the request it is serving, then closes.
    Draining,
    /// The drain time is up: connections still open are closed.
    Cut,
}

/// Resolves once the listener's shutdown reached `phase` (or its owner is gone).
async fn reached(stop: &mut tokio::sync::watch::Receiver<Phase>, phase: Phase) {
    let _ = stop.wait_for(|now| *now >= phase).await;
}

/// Begins a listener's shutdown from outside its owner (the shutdown signal's task).
#[derive(Debug, Clone)]
pub struct Stopper {
    phase: Arc<tokio::sync::watch::Sender<Phase>>,
    /// When the drain began.
    began: Arc<std::sync::OnceLock<tokio::time::Instant>>,
}

impl Stopper {
    /// Stops accepting connections: each open one answers the request it is serving,
    /// then closes.
    pub fn drain(&self) {
        self.began.get_or_init(tokio::time::Instant::now);
        self.phase.send_if_modified(|phase| {
            let draining = *phase == Phase::Serving;
            if draining {
                *phase = Phase::Draining;
            }
            draining
        });
    }
}

/// A serving Kafka listener.
#[derive(Debug)]
pub struct Running {
    task: JoinHandle<()>,
    stopper: Stopper,
}

impl Running {
    /// What begins the drain.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Drains (if [`Stopper::drain`] has not begun it already), waits until `drain`
    /// after the drain began for the connections to answer their requests in progress,
    /// then closes those still open and waits for their tasks to end. A produce
    /// already handed to a partition is still written; its client retries.
    pub async fn stop(self, drain: Duration) {
        self.stopper.drain();
        let began = *self.stopper.began.get_or_init(tokio::time::Instant::now);
        let mut task = self.task;
        if tokio::time::timeout_at(began + drain, &mut task)
            .await
            .is_err()
        {
            tracing::info!("cutting the Kafka connections still open after the drain");
            self.stopper.phase.send_replace(Phase::Cut);
            let _ = task.await;
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
struct Context {
    broker: Arc<Broker>,
    /// The advertised host and port.
    host: String,
    port: i32,
    /// The request budget ([`REQUEST_BUDGET_BYTES`]): a request holds its frame's size
    /// of it until it is answered, or until it is decoded into state bounded otherwise
    /// when it then waits ([`handlers::Client::frame`]).
    budget: Arc<Semaphore>,
    /// The broker's fetch memory budget: a Fetch response holds its share until it is
    /// written.
    fetch_budget: Arc<Semaphore>,
    /// The broker's limits that apply to Kafka clients too: `keepalive_interval` (TCP
    /// keepalive idle time and probe interval), `commit_metadata_bytes`, and the group
    /// and partition limits that bound a request's arrays ([`guard::Bounds`]).
    limits: Limits,
    /// Topic creations and deletions in progress, each in a task of its own.
    admin: Admin,
    /// Metadata creates unknown topics when the client allows it.
    auto_create_topics: bool,
    /// The listener's shutdown phase.
    stop: tokio::sync::watch::Receiver<Phase>,
}

/// How often expired Kafka group members are removed.
const GROUP_TICK: Duration = Duration::from_millis(500);

/// Accepts connections until the drain begins, then waits for them to close, or
/// closes them when the drain time is up.
async fn accept(listener: TcpListener, context: Arc<Context>) {
    let mut connections = JoinSet::new();
    let ticking = Arc::clone(&context);
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(GROUP_TICK);
        loop {
            tick.tick().await;
            ticking.broker.kafka_members().tick();
        }
    });
    let mut stop = context.stop.clone();
    accept_until_drain(&listener, &context, &mut connections).await;
    drop(listener);
    ticker.abort();
    let _ = ticker.await;
    tokio::select! {
        () = async { while connections.join_next().await.is_some() {} } => {}
        () = reached(&mut stop, Phase::Cut) => connections.shutdown().await,
    }
    // A creation or deletion a closed connection left running still ends before the
    // broker shuts down its partitions (it is not cut: each is a few file operations).
    context.admin.finish().await;
}

/// Topic creations and deletions, each run in a task of its own so that a connection
/// closed (or cut by a shutdown) midway cannot stop one between its steps; the
/// listener's shutdown waits for them before `Broker::shutdown`.
#[derive(Debug, Default)]
struct Admin {
    tasks: std::sync::Mutex<JoinSet<()>>,
}

impl Admin {
    fn tasks(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` in a task of its own and returns its result; `None` if the task
    /// panicked.
    async fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (done, result) = tokio::sync::oneshot::channel();
        {
            let mut tasks = self.tasks();
            // Forget the tasks that ended, so the set holds only those running.
            while tasks.try_join_next().is_some() {}
            tasks.spawn(async move {
                let _ = done.send(work.await);
            });
        }
        result.await.ok()
    }

    /// Waits for every task [`Admin::run`] started.
    async fn finish(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks());
        while tasks.join_next().await.is_some() {}
    }
}

async fn accept_until_drain(
    listener: &TcpListener,
    context: &Arc<Context>,
    connections: &mut JoinSet<()>,
) {
    let mut stop = context.stop.clone();
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(context.limits.keepalive_interval)
        .with_interval(context.limits.keepalive_interval);
    let mut pacer = AcceptPacer::default();
    let mut refused = Warner::default();
    loop {
        let accepted = tokio::select! {
            () = reached(&mut stop, Phase::Draining) => return,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                pacer.failed(&e, "Kafka").await;
                continue;
            }
        };
        pacer.accepted();
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if let Some(missed) = refused.due() {
                tracing::warn!(
                    %peer,
                    limit = CONNECTIONS_MAX,
                    refused_since_last_warning = missed,
                    "refusing a Kafka connection: too many are open"
                );
            }
            drop(stream);
            continue;
        };
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
        let context = Arc::clone(context);
        connections.spawn(async move {
            let _slot = slot;
            // Counted until the task ends, even by a panic.
            let _open = InFlight::new(&context.broker.metrics().connections);
            if let Err(reason) = serve_connection(&context, stream, peer).await {
                tracing::debug!(%peer, %reason, "closed a Kafka connection");
            }
        });
    }
}

/// Serves one connection until the client closes it; the error says why the broker
/// closed it instead.
async fn serve_connection(
    context: &Context,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut response = BytesMut::new();
    let mut stop = context.stop.clone();
    loop {
        // Between requests a shutdown closes the connection; a request being read or
        // served is answered first.
        let next = tokio::select! {
            () = reached(&mut stop, Phase::Draining) => return Ok(()),
            next = tokio::time::timeout(IDLE_TIMEOUT, reader.read_i32()) => next,
        };
        let size = match next {
            Err(_) => return Err(format!("no request for {IDLE_TIMEOUT:?}")),
            Ok(Ok(size)) => size,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e.to_string()),
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if !(8..=REQUEST_BYTES_MAX).contains(&size) {
            return Err(format!(
                "request of {size} bytes is outside 8..={REQUEST_BYTES_MAX} bytes"
            ));
        }
        let permits = u32::try_from(size).unwrap_or(u32::MAX);
        let budget = Arc::clone(&context.budget)
            .acquire_many_owned(permits)
            .await
            .map_err(|e| e.to_string())?;
        let mut frame = BytesMut::zeroed(size);
        tokio::time::timeout(FRAME_READ_TIMEOUT, reader.read_exact(&mut frame))
            .await
            .map_err(|_| format!("the request's {size} bytes took over {FRAME_READ_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        response.clear();
        let mut memory = None;
        // The request is answered when `handle` returns: its bytes go back to the
        // budget (if they had not already) before the write, so a client that does not
        // read its response holds none of it.
        let answer = handle(
            context,
            peer,
            (frame.freeze(), budget),
            &mut response,
            &mut memory,
        )
        .await?;
        if answer {
            tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&response))
                .await
                .map_err(|_| {
                    format!(
                        "the client did not read a {} byte response within {WRITE_TIMEOUT:?}",
                        response.len()
                    )
                })?
                .map_err(|e| e.to_string())?;
        }
        drop(memory);
        if response.capacity() > RESPONSE_BUFFER_KEPT {
            response = BytesMut::new();
        }
    }
}

/// Answers one request frame, with its share of the request budget, into `out`
/// (length prefix included); false when the request gets no answer (a produce with
/// acks=0). `memory` gets the answer's share of the fetch memory budget, to hold until
/// it is written. An error closes the connection: the request cannot be answered in a
/// form the client would parse.
async fn handle(
    context: &Context,
    peer: SocketAddr,
    (mut frame, budget): (Bytes, OwnedSemaphorePermit),
    out: &mut BytesMut,
    memory: &mut Option<OwnedSemaphorePermit>,
) -> Result<bool, String> {
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api = ApiKey::try_from(key).map_err(|()| format!("unknown API key {key}"))?;
    let Some((min, max)) = versions::range(api) else {
        out.put_i32(0);
        if unserved::answer(api, version, correlation_id, out)? {
            tracing::debug!(
                ?api,
                version,
                "answered an unserved Kafka API: not supported"
            );
            return Ok(true);
        }
        return Err(format!(
            "API {api:?} (key {key}) is not supported by this broker; see \
             docs/kafka-compatibility.md"
        ));
    };
    if api == ApiKey::ApiVersions && version > max {
        // KIP-511: a client newer than the broker gets the supported ranges in a v0
        // body (and the v0 header ApiVersions always uses), then retries lower.
        out.put_i32(0);
        encode(
            out,
            correlation_id,
            api,
            0,
            &versions::api_versions(ResponseError::UnsupportedVersion.code()),
        )?;
        return Ok(true);
    }
    if !(min..=max).contains(&version) {
        return Err(format!(
            "{api:?} v{version} is not supported (this broker serves v{min} to v{max})"
        ));
    }
    guard::header(api.request_header_version(version), &frame)?;
    let header = decode_request_header_from_buffer(&mut frame)
        .map_err(|e| format!("invalid {api:?} v{version} request header: {e}"))?;
    // Copied out, and the header dropped: its fields are slices of the frame, which a
    // request that waits must not keep alive once it gave the frame's budget back.
    let client_id = header
        .client_id
        .as_ref()
        .map(|c| c.to_string())
        .unwrap_or_default();
    drop(header);
    tracing::trace!(?api, version, client = %client_id, "kafka request");
    let broker = &context.broker;
    let bounds = guard::Bounds::new(
        broker.topic_count(),
        broker.partition_total(),
        &context.limits,
    );
    guard::check(api, version, &frame, &bounds)?;
    out.put_i32(0);
    let metrics = context.broker.metrics();
    let in_flight = InFlight::new(&metrics.in_flight);
    let mut client = handlers::Client {
        id: client_id,
        host: format!("/{}", peer.ip()),
        clock: tokio::time::Instant::now(),
        memory: None,
        frame: Some(budget),
    };
    let answered = handlers::dispatch(
        context,
        &mut client,
        api,
        version,
        frame,
        correlation_id,
        out,
    )
    .await;
    drop(in_flight);
    *memory = client.memory.take();
    metrics.request("kafka", versions::rpc(api), client.clock.elapsed());
    answered
}

/// Appends the response header and `body` to `out`, and sets the length prefix that
/// `out` starts with.
fn encode<T: Encodable>(
    out: &mut BytesMut,
    correlation_id: i32,
    api: ApiKey,
    version: i16,
    body: &T,
) -> Result<(), String> {
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(out, api.response_header_version(version))
        .and_then(|()| body.encode(out, version))
        .map_err(|e| format!("cannot encode the {api:?} v{version} response: {e}"))?;
    let length = i32::try_from(out.len() - 4).map_err(|e| e.to_string())?;
    out[..4].copy_from_slice(&length.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{
        create_topics_request, fetch_request, join_group_request, offset_commit_request,
        CreateTopicsRequest, CreateTopicsResponse, FetchRequest, FetchResponse, GroupId,
        JoinGroupRequest, JoinGroupResponse, OffsetCommitRequest, OffsetCommitResponse,
        RequestHeader, TopicName,
    };
    use kafka_protocol::protocol::{Decodable, StrBytes};
    use kafka_protocol::ResponseError as K;

    use crate::kafka::membership::Join;
    use crate::topics::settings::TopicSettings;

    /// A listener's context over a broker in `dir`, with topic `t` of one partition.
    fn context(dir: &std::path::Path) -> Arc<Context> {
        let broker = Broker::open(
            dir,
            TopicSettings::default(),
            strata_storage::FileCache::new(64),
            Arc::new(crate::metrics::Metrics::default()),
        )
        .expect("open");
        broker
            .create_topic("t", TopicSettings::default())
            .expect("create");
        let (_, stop) = tokio::sync::watch::channel(Phase::Serving);
        Arc::new(Context {
            broker: Arc::new(broker),
            limits: Limits::default(),
            host: "127.0.0.1".into(),
            port: 9092,
            budget: Arc::new(Semaphore::new(REQUEST_BUDGET_BYTES)),
            fetch_budget: Arc::new(Semaphore::new(crate::limits::FETCH_MEMORY_BYTES_DEFAULT)),
            auto_create_topics: false,
            admin: Admin::default(),
            stop,
        })
    }

    /// A request frame (header and body, without the size prefix).
    fn frame<T: Encodable>(api: ApiKey, version: i16, body: &T) -> Bytes {
        let mut out = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(Some(StrBytes::from_static_str("test")))
            .encode(&mut out, api.request_header_version(version))
            .expect("header");
        body.encode(&mut out, version).expect("body");
        out.freeze()
    }

    /// Serves `frame` as a connection does, its size taken from the request budget.
    async fn serve(context: &Context, frame: Bytes) -> Result<Bytes, String> {
        let permits = u32::try_from(frame.len()).expect("small");
        let budget = Arc::clone(&context.budget)
            .acquire_many_owned(permits)
            .await
            .expect("budget");
        let (mut out, mut memory) = (BytesMut::new(), None);
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        handle(context, peer, (frame, budget), &mut out, &mut memory).await?;
        Ok(out.freeze())
    }

    /// The body of a response `serve` returned.
    fn answer<T: Decodable>(api: ApiKey, version: i16, mut response: Bytes) -> T {
        use bytes::Buf;
        response.advance(4);
        ResponseHeader::decode(&mut response, api.response_header_version(version))
            .expect("header");
        T::decode(&mut response, version).expect("body")
    }

    fn join_request(member_id: &str) -> JoinGroupRequest {
        JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_member_id(StrBytes::from_string(member_id.to_string()))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(30_000)
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![join_group_request::JoinGroupRequestProtocol::default(
            )
            .with_name(StrBytes::from_static_str("range"))
            .with_metadata(Bytes::from_static(b"m"))])
    }

    fn member() -> Join {
        Join {
            group: "g".into(),
            member_id: String::new(),
            client_id: "a".into(),
            client_host: "/127.0.0.1".into(),
            session: Duration::from_secs(10),
            rebalance: Duration::from_secs(30),
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"m"))],
        }
    }

    /// A JoinGroup that waits for the group's other members holds none of the request
    /// budget while it waits (nor its frame): parked joins (and SyncGroups and long
    /// polls, which give it back the same way) do not keep other clients' requests
    /// waiting for it.
    #[tokio::test]
    async fn a_join_waiting_for_the_others_holds_none_of_the_request_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let context = context(dir.path());
        let first = context
            .broker
            .kafka_members()
            .join(member(), &|_| false)
            .await;
        assert_eq!((first.error, first.generation), (0, 1));
        // A second member starts a rebalance that waits for the first to rejoin.
        let joining = tokio::spawn({
            let context = Arc::clone(&context);
            async move { serve(&context, frame(ApiKey::JoinGroup, 5, &join_request(""))).await }
        });
        let mut members = 0;
        for _ in 0..10_000 {
            members = context
                .broker
                .kafka_members()
                .describe("g")
                .map_or(0, |g| g.members.len());
            if members == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(members, 2, "the second member joined and waits");
        assert!(!joining.is_finished());
        assert_eq!(
            context.budget.available_permits(),
            REQUEST_BUDGET_BYTES,
            "the waiting join gave its frame's budget back"
        );
        joining.abort();
    }

    /// A Kafka Fetch that finds the broker's fetch memory budget full waits for it at
    /// most its max_wait_ms, then is answered without records (it waited for ever).
    #[tokio::test]
    async fn a_fetch_waits_for_fetch_memory_at_most_its_max_wait() {
        let dir = tempfile::tempdir().expect("tempdir");
        let context = context(dir.path());
        let _full = Arc::clone(&context.fetch_budget)
            .acquire_many_owned(crate::limits::FETCH_MEMORY_BYTES_DEFAULT as u32)
            .await
            .expect("all of it");
        let request = FetchRequest::default()
            .with_max_wait_ms(100)
            .with_min_bytes(1)
            .with_max_bytes(1 << 20)
            .with_topics(vec![fetch_request::FetchTopic::default()
                .with_topic(TopicName(StrBytes::from_static_str("t")))
                .with_partitions(vec![
                    fetch_request::FetchPartition::default().with_partition_max_bytes(1 << 20)
                ])]);
        // The guard against a hang only: the answer comes after ~100 ms.
        let response = tokio::time::timeout(
            Duration::from_secs(120),
            serve(&context, frame(ApiKey::Fetch, 12, &request)),
        )
        .await
        .expect("answered within its max_wait_ms")
        .expect("served");
        let fetched: FetchResponse = answer(ApiKey::Fetch, 12, response);
        let partition = &fetched.responses[0].partitions[0];
        assert_eq!(partition.error_code, 0);
        assert_eq!(partition.records.as_ref().map_or(0, |r| r.len()), 0);
    }

    /// Topic creations and deletions run in tasks the listener's shutdown waits for,
    /// even once the connection that asked is gone, before the broker shuts down.
    #[tokio::test]
    async fn the_shutdown_waits_for_admin_tasks_whose_connection_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let context = context(dir.path());
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let asking = tokio::spawn({
            let context = Arc::clone(&context);
            async move {
                context
                    .admin
                    .run(async move {
                        let _ = started.send(());
                        let _ = released.await;
                    })
                    .await
            }
        });
        running.await.expect("started");
        // The connection that asked is closed (its task ends).
        asking.abort();
        let finish = context.admin.finish();
        tokio::pin!(finish);
        tokio::select! {
            biased;
            () = &mut finish => panic!("the drain ended while an admin task ran"),
            () = tokio::task::yield_now() => {}
        }
        release.send(()).expect("the task still runs");
        finish.await;
    }

    /// A reset or deletion of a group's offsets holds the group: a Kafka join and a
    /// Kafka member's commit get COORDINATOR_LOAD_IN_PROGRESS (clients retry) until it
    /// is done, as gRPC joins wait.
    #[tokio::test]
    async fn kafka_joins_and_commits_wait_out_an_admin_changes_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let context = context(dir.path());
        let first = context
            .broker
            .kafka_members()
            .join(member(), &|_| false)
            .await;
        assert_eq!(first.error, 0);
        let hold = context
            .broker
            .coordinator()
            .exclusive("g", "reset the offsets of")
            .expect("no gRPC members");
        let joined: JoinGroupResponse = answer(
            ApiKey::JoinGroup,
            5,
            serve(&context, frame(ApiKey::JoinGroup, 5, &join_request("")))
                .await
                .expect("served"),
        );
        assert_eq!(joined.error_code, K::CoordinatorLoadInProgress.code());
        let commit = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_generation_id_or_member_epoch(first.generation)
            .with_member_id(StrBytes::from_string(first.member_id.clone()))
            .with_topics(vec![
                offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_static_str("t")))
                    .with_partitions(vec![
                        offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_committed_offset(0),
                    ]),
            ]);
        let commit_answer = |response| -> i16 {
            let answer: OffsetCommitResponse = answer(ApiKey::OffsetCommit, 8, response);
            answer.topics[0].partitions[0].error_code
        };
        let response = serve(&context, frame(ApiKey::OffsetCommit, 8, &commit))
            .await
            .expect("served");
        assert_eq!(commit_answer(response), K::CoordinatorLoadInProgress.code());
        drop(hold);
        let response = serve(&context, frame(ApiKey::OffsetCommit, 8, &commit))
            .await
            .expect("served");
        assert_eq!(
            commit_answer(response),
            0,
            "committed once the hold is gone"
        );
    }

    /// Topics are created within `max_partitions` partitions of all topics: a Kafka
    /// CreateTopics past it gets POLICY_VIOLATION, and the broker's own creation (the
    /// one gRPC CreateTopic and auto-creation use) is refused naming the limit.
    #[tokio::test]
    async fn topics_are_created_within_max_partitions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let context = context(dir.path());
        context.broker.set_max_partitions(3);
        let create = |name: &'static str, partitions: i32| {
            CreateTopicsRequest::default().with_topics(vec![
                create_topics_request::CreatableTopic::default()
                    .with_name(TopicName(StrBytes::from_static_str(name)))
                    .with_num_partitions(partitions)
                    .with_replication_factor(1),
            ])
        };
        let created = |response| -> i16 {
            let answer: CreateTopicsResponse = answer(ApiKey::CreateTopics, 7, response);
            answer.topics[0].error_code
        };
        let response = serve(&context, frame(ApiKey::CreateTopics, 7, &create("a", 2)))
            .await
            .expect("served");
        assert_eq!(created(response), 0, "1 + 2 partitions fit");
        let response = serve(&context, frame(ApiKey::CreateTopics, 7, &create("b", 1)))
            .await
            .expect("served");
        assert_eq!(created(response), K::PolicyViolation.code());
        let e = context
            .broker
            .create_topic("c", TopicSettings::default())
            .expect_err("past the limit");
        assert!(e.to_string().contains("max_partitions"), "{e}");
        assert!(context.broker.topic("b").is_err());
        assert_eq!(context.broker.partition_total(), 3);
        let broker = Arc::clone(&context.broker);
        tokio::task::spawn_blocking(move || broker.delete_topic("a"))
            .await
            .expect("joined")
            .expect("delete");
        assert_eq!(context.broker.partition_total(), 1);
        context
            .broker
            .create_topic("c", TopicSettings::default())
            .expect("room again");
    }
}
