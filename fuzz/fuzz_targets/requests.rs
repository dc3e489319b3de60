//! The request handlers of the gRPC listener, called as tonic calls them, with messages
//! decoded from fuzzer bytes the way tonic decodes them: any RPC, any field values. A
//! request may be refused with any status; the broker must not panic, and after it a
//! well-formed produce and fetch on the fixture topic must still work (nothing the
//! request did may leave a partition failed or the broker wedged).
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strata_broker::broker::Broker;
use strata_broker::grpc::service::Service;
use strata_broker::limits::Limits;
use strata_broker::metrics::Metrics;
use strata_broker::topics::settings::TopicSettings;
use strata_proto::v1;
use strata_proto::v1::admin_server::Admin;
use strata_proto::v1::broker_server::Broker as _;
use strata_proto::v1::groups_server::Groups;
use strata_storage::batch::BatchBuilder;
use tonic::Request;

/// The topic every run may use and none may break.
const TOPIC: &str = "t";
/// A long poll that the fuzzer asks to wait longer is cut off here (as a client would).
const CALL_TIMEOUT: Duration = Duration::from_millis(20);

struct Fixture {
    _dir: tempfile::TempDir,
    runtime: tokio::runtime::Runtime,
    service: Service,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let defaults = TopicSettings {
            durability: "none".into(),
            ..TopicSettings::default()
        };
        let files = strata_storage::FileCache::new(64);
        let broker = Broker::open(dir.path(), defaults, files, Arc::new(Metrics::default()))
            .expect("open the broker");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        // The limits a served broker runs with; the decode-size ones are tonic's, not
        // the handlers', so requests of any size reach the handlers here.
        let limits = Limits::default();
        broker
            .coordinator()
            .set_limits(limits.group_members, limits.groups);
        let fetch_budget = Arc::new(tokio::sync::Semaphore::new(limits.fetch_memory_bytes));
        let service = Service::new(Arc::new(broker), limits, fetch_budget);
        Fixture {
            _dir: dir,
            runtime,
            service,
        }
    })
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Option<Request<M>> {
    M::decode(bytes).ok().map(Request::new)
}

/// Calls the handler `rpc` selects with the decoded message; what comes back is ignored.
async fn call(service: &Service, rpc: u8, bytes: &[u8]) -> Option<String> {
    macro_rules! run {
        ($method:ident, $message:ty) => {{
            let request = decode::<$message>(bytes)?;
            let _ = tokio::time::timeout(CALL_TIMEOUT, service.$method(request)).await;
        }};
    }
    // The group or topic the request may have created, for the clean-up.
    let mut created = None;
    match rpc % 17 {
        0 => {
            let request = decode::<v1::CreateTopicRequest>(bytes)?;
            created = Some(request.get_ref().name.clone()).filter(|name| name != TOPIC);
            let _ = tokio::time::timeout(CALL_TIMEOUT, service.create_topic(request)).await;
        }
        1 => run!(delete_topic, v1::DeleteTopicRequest),
        2 => run!(list_topics, v1::ListTopicsRequest),
        3 => run!(describe_topic, v1::DescribeTopicRequest),
        4 => run!(list_offsets, v1::ListOffsetsRequest),
        5 => run!(list_groups, v1::ListGroupsRequest),
        6 => run!(describe_group, v1::DescribeGroupRequest),
        7 => {
            let request = decode::<v1::ResetOffsetsRequest>(bytes)?;
            created = Some(request.get_ref().group.clone());
            let _ = tokio::time::timeout(CALL_TIMEOUT, service.reset_offsets(request)).await;
        }
        8 => run!(delete_group, v1::DeleteGroupRequest),
        9 => run!(produce, v1::ProduceRequest),
        10 => run!(fetch, v1::FetchRequest),
        11 => run!(init_producer, v1::InitProducerRequest),
        12 => {
            let request = decode::<v1::SubscribeRequest>(bytes)?;
            if let Ok(Ok(response)) =
                tokio::time::timeout(CALL_TIMEOUT, service.subscribe(request)).await
            {
                drop(response);
            }
        }
        13 => {
            let request = decode::<v1::HeartbeatRequest>(bytes)?;
            created = Some(request.get_ref().group.clone());
            let _ = tokio::time::timeout(CALL_TIMEOUT, service.heartbeat(request)).await;
        }
        14 => run!(leave_group, v1::LeaveGroupRequest),
        15 => {
            let request = decode::<v1::CommitOffsetsRequest>(bytes)?;
            created = Some(request.get_ref().group.clone());
            let _ = tokio::time::timeout(CALL_TIMEOUT, service.commit_offsets(request)).await;
        }
        _ => run!(fetch_offsets, v1::FetchOffsetsRequest),
    }
    created
}

/// Removes what a run created (so runs do not pile up topics and groups), and puts the
/// fixture topic back if the run deleted it.
async fn clean_up(service: &Service, rpc: u8, created: Option<String>) {
    if let Some(name) = created {
        if rpc.is_multiple_of(17) {
            let _ = service
                .delete_topic(Request::new(v1::DeleteTopicRequest { name }))
                .await;
        } else {
            let _ = service
                .delete_group(Request::new(v1::DeleteGroupRequest { group: name }))
                .await;
        }
    }
    let _ = service
        .create_topic(Request::new(v1::CreateTopicRequest {
            name: TOPIC.into(),
            partitions: 2,
            ..Default::default()
        }))
        .await;
}

/// A well-behaved client: one produce and one fetch of it on the fixture topic.
async fn still_serves(service: &Service) {
    let mut batch = BatchBuilder::new();
    batch.push(1, Some(b"key"), Some(b"value"), &[]);
    let produced = service
        .produce(Request::new(v1::ProduceRequest {
            topic: TOPIC.into(),
            target: Some(v1::produce_request::Target::Partition(1)),
            batch: batch.finish().into(),
            ..Default::default()
        }))
        .await
        .expect("a well-formed produce after a fuzzed request")
        .into_inner();
    service
        .fetch(Request::new(v1::FetchRequest {
            topic: TOPIC.into(),
            partition: 1,
            offset: produced.base_offset,
            ..Default::default()
        }))
        .await
        .expect("a fetch of what was just produced");
}

fuzz_target!(|data: &[u8]| {
    let Some((&rpc, bytes)) = data.split_first() else {
        return;
    };
    let fixture = fixture();
    fixture.runtime.block_on(async {
        clean_up(&fixture.service, 0, None).await;
        let created = call(&fixture.service, rpc, bytes).await;
        clean_up(&fixture.service, rpc, created).await;
        still_serves(&fixture.service).await;
    });
});
