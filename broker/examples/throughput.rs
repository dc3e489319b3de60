//! Broker throughput over loopback gRPC, with a same-run raw disk baseline.
//!
//! Starts the release `strata` binary next to this example (or uses `--broker`), creates a
//! topic, produces pre-encoded record batches from many concurrent requests (the fast
//! path), then fetches the whole backlog back, and prints produce and fetch MB/s and
//! records/s beside the raw sequential write bandwidth of the data directory's disk
//! measured in the same run (1 MiB writes, one final fsync).
//!
//! ```text
//! cargo build --release -p strata-broker --bin strata --example throughput
//! target/release/examples/throughput --record-bytes 1024 --partitions 4 --durability fsync
//! ```

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_broker::grpc::{CONNECTION_WINDOW_BYTES, FRAME_BYTES_MAX, STREAM_WINDOW_BYTES};
use strata_proto::v1::{self, admin_client::AdminClient, broker_client::BrokerClient};
use strata_storage::batch::BatchBuilder;
use tonic::transport::Channel;

#[derive(Debug)]
struct Args {
    broker: Option<String>,
    data_dir: PathBuf,
    record_bytes: usize,
    batch_bytes: usize,
    partitions: u32,
    durability: String,
    in_flight_per_partition: usize,
    total_bytes: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        broker: None,
        data_dir: PathBuf::from("target/throughput-data"),
        record_bytes: 1024,
        batch_bytes: 64 << 10,
        partitions: 1,
        durability: "fsync".into(),
        in_flight_per_partition: 16,
        total_bytes: 2 << 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--broker" => args.broker = Some(value()?),
            "--data-dir" => args.data_dir = PathBuf::from(value()?),
            "--record-bytes" => args.record_bytes = number(value()?)? as usize,
            "--batch-bytes" => args.batch_bytes = number(value()?)? as usize,
            "--partitions" => args.partitions = number(value()?)? as u32,
            "--durability" => args.durability = value()?,
            "--in-flight" => args.in_flight_per_partition = number(value()?)? as usize,
            "--total-mib" => args.total_bytes = number(value()?)? << 20,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// A broker process this tool started; killed on drop.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_broker(data_dir: &Path) -> Result<(Spawned, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let strata = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("strata"))
        .filter(|p| p.exists())
        .ok_or("build the broker first: cargo build --release -p strata-broker --bin strata")?;
    let mut child = Command::new(strata)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let child = Spawned(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let address = line
        .trim()
        .strip_prefix("strata listening on ")
        .ok_or(format!("unexpected broker output {line:?}"))?
        .to_string();
    Ok((child, format!("http://{address}")))
}

/// Raw sequential write bandwidth of the disk under `dir`: 1 MiB writes, final fsync.
fn disk_write_mb_s(dir: &Path, bytes: u64) -> Result<f64, String> {
    let path = dir.join("baseline.tmp");
    let mut file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let block = vec![0xa5u8; 1 << 20];
    let start = Instant::now();
    for _ in 0..bytes >> 20 {
        file.write_all(&block).map_err(|e| e.to_string())?;
    }
    file.sync_data().map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    drop(file);
    std::fs::remove_file(&path).map_err(|e| e.to_string())?;
    Ok(bytes as f64 / elapsed.as_secs_f64() / 1e6)
}

fn encode_batch(record_bytes: usize, batch_bytes: usize) -> (Vec<u8>, u64) {
    let value = vec![b'x'; record_bytes];
    let mut builder = BatchBuilder::new();
    // Record overhead is a few bytes of varints; stop before the batch passes its size.
    while builder.encoded_len() + record_bytes + 16 <= batch_bytes || builder.is_empty() {
        builder.push(1_700_000_000_000, None, Some(&value), &[]);
    }
    let records = builder.len() as u64;
    (builder.finish(), records)
}

async fn produce(
    channel: Channel,
    topic: String,
    partition: u32,
    batch: bytes::Bytes,
    batches: u64,
) -> Result<(), tonic::Status> {
    let mut client = BrokerClient::new(channel).max_encoding_message_size(64 << 20);
    for _ in 0..batches {
        client
            .produce(v1::ProduceRequest {
                topic: topic.clone(),
                target: Some(v1::produce_request::Target::Partition(partition)),
                batch: batch.clone(),
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

async fn fetch_all(channel: Channel, topic: String, partition: u32) -> Result<u64, tonic::Status> {
    let mut client = BrokerClient::new(channel).max_decoding_message_size(64 << 20);
    let mut offset = 0;
    let mut bytes = 0u64;
    loop {
        let response = client
            .fetch(v1::FetchRequest {
                topic: topic.clone(),
                partition,
                offset,
                max_bytes: 4 << 20,
                ..Default::default()
            })
            .await?
            .into_inner();
        bytes += response.batches.len() as u64;
        offset = response.next_offset;
        if offset >= response.high_watermark {
            return Ok(bytes);
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.data_dir)?;
    let baseline = disk_write_mb_s(&args.data_dir, 1 << 30)?;

    let broker_dir = args.data_dir.join(format!("broker-{}", std::process::id()));
    let (_spawned, address) = match &args.broker {
        Some(address) => (None, address.clone()),
        None => {
            let (child, address) = spawn_broker(&broker_dir)?;
            (Some(child), address)
        }
    };
    let channels: Vec<Channel> = {
        let mut channels = Vec::new();
        for _ in 0..args.partitions {
            channels.push(
                Channel::from_shared(address.clone())?
                    .tcp_nodelay(true)
                    .initial_stream_window_size(STREAM_WINDOW_BYTES)
                    .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
                    .max_frame_size(FRAME_BYTES_MAX)
                    .connect()
                    .await?,
            );
        }
        channels
    };
    let topic = format!("throughput-{}-{}", std::process::id(), args.record_bytes);
    AdminClient::new(channels[0].clone())
        .create_topic(v1::CreateTopicRequest {
            name: topic.clone(),
            partitions: args.partitions,
            config: Some(v1::TopicConfig {
                durability: Some(args.durability.clone()),
                retention_ms: Some(-1),
                ..Default::default()
            }),
        })
        .await?;

    let (batch, records_per_batch) = encode_batch(args.record_bytes, args.batch_bytes);
    let batch = bytes::Bytes::from(batch);
    let tasks = args.partitions as u64 * args.in_flight_per_partition as u64;
    let batches_per_task = (args.total_bytes / batch.len() as u64 / tasks).max(1);
    let start = Instant::now();
    let mut producers = Vec::new();
    for partition in 0..args.partitions {
        for _ in 0..args.in_flight_per_partition {
            producers.push(tokio::spawn(produce(
                channels[partition as usize].clone(),
                topic.clone(),
                partition,
                batch.clone(),
                batches_per_task,
            )));
        }
    }
    for p in producers {
        p.await??;
    }
    let produce_time = start.elapsed();
    let produced_bytes = tasks * batches_per_task * batch.len() as u64;
    let produced_records = tasks * batches_per_task * records_per_batch;

    let start = Instant::now();
    let mut fetchers = Vec::new();
    for partition in 0..args.partitions {
        fetchers.push(tokio::spawn(fetch_all(
            channels[partition as usize].clone(),
            topic.clone(),
            partition,
        )));
    }
    let mut fetched_bytes = 0;
    for f in fetchers {
        fetched_bytes += f.await??;
    }
    let fetch_time = start.elapsed();
    assert_eq!(
        fetched_bytes, produced_bytes,
        "fetched everything that was produced"
    );

    let mb_s = |bytes: u64, t: Duration| bytes as f64 / t.as_secs_f64() / 1e6;
    let produce_mb_s = mb_s(produced_bytes, produce_time);
    println!(
        "| {} B | {} | {} | {:.0} MB/s | {:.0} rec/s | {:.0}% of disk ({:.0} MB/s) | fetch {:.0} MB/s ({:.0} rec/s) |",
        args.record_bytes,
        args.partitions,
        args.durability,
        produce_mb_s,
        produced_records as f64 / produce_time.as_secs_f64(),
        100.0 * produce_mb_s / baseline,
        baseline,
        mb_s(fetched_bytes, fetch_time),
        produced_records as f64 / fetch_time.as_secs_f64(),
    );
    drop(_spawned);
    if args.broker.is_none() {
        std::fs::remove_dir_all(&broker_dir)?;
    }
    Ok(())
}
