//! Shared helpers of the black-box tests: a [`Broker`] fixture that runs the real
//! `strata` binary on a free port over a temporary data directory, and small client
//! helpers on top of the generated gRPC clients.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use strata_proto::v1::{
    self, admin_client::AdminClient, broker_client::BrokerClient, groups_client::GroupsClient,
};
use tonic::transport::Channel;

/// Path of the `strata` binary cargo built for these tests.
pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");

/// Largest gRPC message the test clients accept (the broker's own limit).
const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// A `strata` command with every `STRATA_*` variable of the test environment removed, so
/// an operator's settings cannot leak into a test.
pub fn strata_command() -> Command {
    without_strata_env(Command::new(STRATA))
}

fn without_strata_env(mut command: Command) -> Command {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("STRATA_") {
            command.env_remove(name);
        }
    }
    command
}

/// A running `strata serve` over a temporary data directory. Dropping it kills the
/// process (SIGKILL) and removes the directory, also when a test panics; a panicking
/// test also gets the broker's log printed.
pub struct Broker {
    child: Option<Child>,
    addr: SocketAddr,
    /// Holds the data directory and the broker's log file.
    dir: tempfile::TempDir,
    /// Extra flags passed to `strata serve` on every start.
    extra_args: Vec<String>,
    /// How many processes this fixture has started (names their log files).
    starts: usize,
    /// The address `strata serve` listens on; port 0 picks a free port.
    listen: SocketAddr,
    /// The HTTP (metrics) address of the running broker.
    http: Option<SocketAddr>,
    /// The Kafka listener's address, when it is on (`--kafka-listen`).
    kafka: Option<SocketAddr>,
    /// Shell commands run before `exec strata serve` (e.g. resource limits), if any.
    shell_prefix: Option<String>,
}

impl Broker {
    /// Starts a broker on a fresh data directory.
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// Starts a broker on a fresh data directory with extra `strata serve` flags.
    pub fn start_with(extra_args: &[&str]) -> Broker {
        Broker::start_in_shell(None, extra_args)
    }

    /// Starts a broker through `bash -c "<prefix>; exec strata serve ..."`, so the
    /// prefix can set limits (`ulimit`) or signal dispositions (`trap`) it inherits.
    pub fn start_in_shell(prefix: Option<&str>, extra_args: &[&str]) -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("strata-test-")
            .tempdir()
            .expect("create a temporary directory");
        std::fs::create_dir(dir.path().join("data")).expect("create the data directory");
        let mut broker = Broker {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: None,
            kafka: None,
            shell_prefix: prefix.map(str::to_string),
        };
        broker.spawn();
        broker
    }

    /// Spawns `strata serve` on the data directory and waits for its
    /// `strata listening on <addr>` line.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        self.starts += 1;
        let log_path = self.log_path(self.starts);
        let log = std::fs::File::create(&log_path).expect("create the broker log file");
        let mut command = match &self.shell_prefix {
            None => strata_command(),
            Some(prefix) => {
                let mut bash = without_strata_env(Command::new("bash"));
                bash.arg("-c")
                    .arg(format!("{prefix}; exec \"$0\" \"$@\""))
                    .arg(STRATA);
                bash
            }
        };
        // On a fixed gRPC port (a restart on the same port) the default HTTP address, the
        // next port, may have been taken meanwhile (by any connection's ephemeral port):
        // a free port instead, unless the test chose one.
        let http_free_port = self.listen.port() != 0
            && !self
                .extra_args
                .iter()
                .any(|a| a.starts_with("--http-listen"));
        command
            .arg("serve")
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--data-dir")
            .arg(self.data_dir());
        if http_free_port {
            command.args(["--http-listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn strata serve");
        let stdout = child.stdout.take().expect("piped stdout");
        // Own the child before anything can panic, so Drop kills it.
        self.child = Some(child);
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        let addr = loop {
            line.clear();
            let read = lines
                .read_line(&mut line)
                .expect("read the broker's stdout");
            if read == 0 {
                let status = self.wait();
                panic!(
                    "strata serve exited ({status}) before listening; its log:\n{}",
                    self.log()
                );
            }
            if let Some(http) = line.trim().strip_prefix("strata http on http://") {
                self.http = Some(http.parse().expect("parse the HTTP address"));
            }
            if let Some(kafka) = line.trim().strip_prefix("strata kafka on ") {
                self.kafka = Some(kafka.parse().expect("parse the Kafka address"));
            }
            if let Some(addr) = line.trim().strip_prefix("strata listening on ") {
                break addr
                    .parse::<SocketAddr>()
                    .expect("parse the listen address");
            }
        };
        // Keep draining stdout so a later write can never block or fail on a full or
        // closed pipe; the thread ends when the process does.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = lines.read_to_end(&mut sink);
        });
        self.addr = addr;
    }

    fn log_path(&self, start: usize) -> PathBuf {
        self.dir.path().join(format!("broker-{start}.log"))
    }

    /// The broker's log (stderr) of its current or last run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    /// The address as `strata --broker` takes it.
    pub fn addr_arg(&self) -> String {
        self.addr.to_string()
    }

    /// The address of the broker's HTTP listener (metrics, health), if it has one.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    /// The address of the broker's Kafka listener, if it has one.
    pub fn kafka_addr(&self) -> Option<SocketAddr> {
        self.kafka
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The process id of the running broker.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the broker is running").id()
    }

    /// A new connection to the broker.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("a valid endpoint")
            .connect()
            .await
            .expect("connect to the broker")
    }

    /// An admin client on its own connection.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await).max_decoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// A data client on its own connection.
    pub async fn client(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel().await)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// A consumer-groups client on its own connection.
    pub async fn groups(&self) -> GroupsClient<Channel> {
        GroupsClient::new(self.channel().await)
    }

    /// Waits for the broker process to exit, failing the test if it has not within
    /// `limit` (a hung shutdown), and returns how it exited.
    pub fn wait_within(&mut self, limit: std::time::Duration) -> ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        let child = self.child.as_mut().expect("the broker is running");
        loop {
            if let Some(status) = child.try_wait().expect("poll the broker") {
                self.child = None;
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the broker did not exit within {limit:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits for the broker process to exit and returns how it exited.
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the broker is running");
        child.wait().expect("wait for the broker to exit")
    }

    /// Sends SIGTERM (a graceful shutdown) without waiting for the exit.
    pub fn terminate(&self) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
    }

    /// Waits for the broker to exit after [`Broker::terminate`]; asserts that it exited
    /// successfully.
    pub fn wait_stopped(&mut self) {
        let status = self.wait_within(std::time::Duration::from_secs(120));
        assert!(
            status.success(),
            "strata serve exited with {status} after SIGTERM; its log:\n{}",
            self.log()
        );
    }

    /// Stops the broker gracefully (SIGTERM) and waits for it to exit; asserts that it
    /// exited successfully.
    pub fn stop(&mut self) {
        self.terminate();
        self.wait_stopped();
    }

    /// Kills the broker with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self) {
        let child = self.child.as_mut().expect("the broker is running");
        child.kill().expect("SIGKILL the broker");
        self.wait();
    }

    /// Starts the broker again on the same data directory (after [`Broker::stop`] or
    /// [`Broker::kill`]). The new process listens on a new port.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Starts the broker again on the same data directory and the same port as before
    /// (after [`Broker::stop`] or [`Broker::kill`]), so clients can reconnect to the
    /// address they know.
    pub fn restart_on_same_port(&mut self) {
        self.listen = self.addr;
        self.spawn();
    }

    /// Stops gracefully, then starts again on the same data directory.
    pub fn restart_graceful(&mut self) {
        self.stop();
        self.restart();
    }

    /// Crashes (SIGKILL), then starts again on the same data directory.
    pub fn restart_after_kill(&mut self) {
        self.kill();
        self.restart();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- log of the broker at {} (run {}) ---\n{}",
                self.addr,
                self.starts,
                self.log()
            );
        }
    }
}

/// A record as the tests compare it: everything a fetch returns about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// Its offset.
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Key; `None` is null.
    pub key: Option<Vec<u8>>,
    /// Value; `None` is null.
    pub value: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Rec {
    /// From the decoded form of a fetch response.
    pub fn from_proto(r: &v1::Record) -> Rec {
        Rec {
            offset: r.offset,
            timestamp: r.timestamp_ms,
            key: r.key.as_deref().map(<[u8]>::to_vec),
            value: r.value.as_deref().map(<[u8]>::to_vec),
            headers: r
                .headers
                .iter()
                .map(|h| (h.key.clone(), h.value.to_vec()))
                .collect(),
        }
    }
}

/// Decodes the raw `batches` of a fetch response with the storage codec (compressed
/// batches decompressed), keeping the records at or after `from`.
pub fn decode_batches(bytes: &[u8], from: u64) -> Vec<Rec> {
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for batch in strata_storage::batch::batches(bytes) {
        let batch = batch.expect("the broker returns valid batches");
        let records = batch
            .records_with(&mut scratch)
            .expect("the broker's batches decompress");
        for record in records {
            let record = record.expect("the broker returns valid records");
            if record.offset < from {
                continue;
            }
            out.push(Rec {
                offset: record.offset,
                timestamp: record.timestamp,
                key: record.key.map(<[u8]>::to_vec),
                value: record.value.map(<[u8]>::to_vec),
                headers: record
                    .headers()
                    .map(|(k, v)| (k.to_string(), v.unwrap_or_default().to_vec()))
                    .collect(),
            });
        }
    }
    out
}

/// A fetch request that answers at once.
pub fn fetch_request(topic: &str, partition: u32, offset: u64, decode: bool) -> v1::FetchRequest {
    v1::FetchRequest {
        topic: topic.to_string(),
        partition,
        offset,
        max_bytes: 0,
        max_wait_ms: 0,
        decode,
        member: None,
    }
}

/// Every record of a partition from `from` to the high watermark, read twice — decoded
/// by the broker and as raw batches decoded here — and checked to agree.
pub async fn read_from(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    partition: u32,
    from: u64,
) -> Vec<Rec> {
    let decoded = read_all(client, topic, partition, from, true).await;
    let raw = read_all(client, topic, partition, from, false).await;
    assert_eq!(
        decoded, raw,
        "decoded and raw fetches of {topic}/{partition} disagree"
    );
    decoded
}

/// Every record of a partition.
pub async fn read_partition(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    partition: u32,
) -> Vec<Rec> {
    read_from(client, topic, partition, 0).await
}

/// Every record from `from` to the high watermark (as of the first fetch), in one form.
async fn read_all(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    partition: u32,
    from: u64,
    decode: bool,
) -> Vec<Rec> {
    let mut records = Vec::new();
    let mut offset = from;
    let mut first_high_watermark = None;
    loop {
        let response = client
            .fetch(fetch_request(topic, partition, offset, decode))
            .await
            .expect("fetch")
            .into_inner();
        let end = *first_high_watermark.get_or_insert(response.high_watermark);
        if decode {
            assert!(
                response.batches.is_empty(),
                "decode answers carry no batches"
            );
            records.extend(response.records.iter().map(Rec::from_proto));
        } else {
            assert!(response.records.is_empty(), "raw answers carry no records");
            records.extend(decode_batches(&response.batches, offset));
        }
        if response.next_offset >= end {
            break;
        }
        assert!(
            response.next_offset > offset,
            "fetch at {offset} of {topic}/{partition} made no progress: {response:?}"
        );
        offset = response.next_offset;
    }
    let end = first_high_watermark.unwrap_or(u64::MAX);
    records.retain(|r| r.offset < end);
    records
}

/// The high watermark of every partition of a topic, from DescribeTopic.
pub async fn high_watermarks(admin: &mut AdminClient<Channel>, topic: &str) -> Vec<u64> {
    admin
        .describe_topic(v1::DescribeTopicRequest {
            name: topic.to_string(),
        })
        .await
        .expect("describe topic")
        .into_inner()
        .partitions
        .iter()
        .map(|p| p.latest_offset)
        .collect()
}

/// Creates a topic with `partitions` partitions and the given config.
pub async fn create_topic(
    admin: &mut AdminClient<Channel>,
    name: &str,
    partitions: u32,
    config: v1::TopicConfig,
) -> v1::TopicInfo {
    admin
        .create_topic(v1::CreateTopicRequest {
            name: name.to_string(),
            partitions,
            config: Some(config),
        })
        .await
        .unwrap_or_else(|e| panic!("create topic {name}: {e}"))
        .into_inner()
        .topic
        .expect("the created topic")
}

/// Names of the topics the broker lists.
pub async fn topic_names(admin: &mut AdminClient<Channel>) -> Vec<String> {
    admin
        .list_topics(v1::ListTopicsRequest {})
        .await
        .expect("list topics")
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// A simple record for produce requests.
pub fn record(key: Option<&[u8]>, value: &[u8]) -> v1::Record {
    v1::Record {
        key: key.map(bytes::Bytes::copy_from_slice),
        value: Some(bytes::Bytes::copy_from_slice(value)),
        ..Default::default()
    }
}

/// A produce request to one partition, in the decoded form.
pub fn produce_records(
    topic: &str,
    partition: u32,
    records: Vec<v1::Record>,
) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: topic.to_string(),
        target: Some(v1::produce_request::Target::Partition(partition)),
        records,
        ..Default::default()
    }
}

/// A produce request to one partition, in the encoded (fast path) form.
pub fn produce_batch(topic: &str, partition: u32, batch: Vec<u8>) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: topic.to_string(),
        target: Some(v1::produce_request::Target::Partition(partition)),
        batch: batch.into(),
        ..Default::default()
    }
}

/// Files and directories directly inside `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// A GET of `path` from the broker's HTTP listener at `addr`: the status code and the
/// body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    strata_broker::http::client::get(&addr.to_string(), path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}
