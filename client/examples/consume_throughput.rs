//! Consumer throughput: how many small records per second one group [`Consumer`] hands to
//! the application, next to standalone [`PartitionConsumer`]s reading the same records.
//!
//! Creates a fresh topic of `--partitions` partitions, fills it with `--records` keyless
//! records of `--record-bytes` bytes (not timed), then times reading all of them back:
//! once through a new consumer group (auto-commit on, as by default), once through one
//! partition consumer per partition. Prints records/s and MB/s (payload bytes) of each.
//!
//! ```text
//! cargo build --release -p strata-broker --bin strata -p strata-client --example consume_throughput
//! target/release/strata serve --data-dir /tmp/strata-bench --listen 127.0.0.1:7717 &
//! target/release/examples/consume_throughput --broker 127.0.0.1:7717
//! ```

use std::time::Instant;

use strata_client::{Client, Durability, PartitionConsumer, Record, StartAt, TopicConfig};
use tokio_stream::StreamExt;

struct Args {
    broker: String,
    records: u64,
    record_bytes: usize,
    partitions: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        broker: "127.0.0.1:7717".into(),
        records: 2_000_000,
        record_bytes: 100,
        partitions: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--broker" => args.broker = value,
            "--records" => args.records = number(&value)?,
            "--record-bytes" => args.record_bytes = number(&value)? as usize,
            "--partitions" => args.partitions = number(&value)?.max(1) as u32,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn report(what: &str, args: &Args, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let rate = args.records as f64 / seconds;
    let mb = rate * args.record_bytes as f64 / 1e6;
    println!(
        "{what}: {} records in {seconds:.2} s: {rate:.0} records/s, {mb:.1} MB/s",
        args.records
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let client = Client::connect(&args.broker).await?;
    let topic = format!("consume-throughput-{}", std::process::id());
    let config = TopicConfig {
        durability: Some(Durability::None),
        ..TopicConfig::default()
    };
    client
        .admin()
        .create_topic(&topic, args.partitions, config)
        .await?;
    let producer = client.producer(&topic).await?;
    let value = vec![b'x'; args.record_bytes];
    let mut pending = Vec::new();
    for _ in 0..args.records {
        pending.push(producer.send(Record::new(value.clone())));
        if pending.len() == 100_000 {
            for send in pending.drain(..) {
                send.await?;
            }
        }
    }
    producer.flush().await;
    for send in pending {
        send.await?;
    }

    let started = Instant::now();
    let mut consumer = client
        .consumer(&format!("{topic}-group"), &[&topic])
        .await?;
    for _ in 0..args.records {
        consumer.next().await.ok_or("the stream ended")??;
    }
    report("group consumer", &args, started);
    consumer.close().await?;

    let started = Instant::now();
    let mut readers: Vec<PartitionConsumer> = Vec::new();
    for partition in 0..args.partitions {
        readers.push(
            client
                .partition_consumer(&topic, partition, StartAt::Earliest)
                .await?,
        );
    }
    let mut merged = tokio_stream::StreamMap::new();
    for (partition, reader) in readers.into_iter().enumerate() {
        merged.insert(partition, reader);
    }
    for _ in 0..args.records {
        let (_, record) = merged.next().await.ok_or("the streams ended")?;
        record?;
    }
    report("partition consumers", &args, started);
    client.admin().delete_topic(&topic).await?;
    Ok(())
}
