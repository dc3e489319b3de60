//! Producer throughput: how many small records per second one [`Producer`] writes to a
//! broker, through `send` futures, batching and acknowledgements included.
//!
//! Creates a fresh topic with the given durability, sends `--records` keyless records of
//! `--record-bytes` bytes with at most `--window` sends unawaited at a time, awaits
//! every delivery, and prints records/s and MB/s (payload bytes). The producer is
//! idempotent (the default) unless `--no-idempotence` is given.
//!
//! ```text
//! cargo build --release -p strata-broker --bin strata -p strata-client --example produce_throughput
//! target/release/strata serve --data-dir /tmp/strata-bench --listen 127.0.0.1:7717 &
//! target/release/examples/produce_throughput --broker 127.0.0.1:7717 --durability none
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use strata_client::{Client, Durability, ProducerConfig, Record, TopicConfig};

struct Args {
    broker: String,
    records: u64,
    record_bytes: usize,
    partitions: u32,
    durability: Durability,
    in_flight: usize,
    linger_ms: u64,
    window: usize,
    keyed: bool,
    idempotent: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        broker: "127.0.0.1:7717".into(),
        records: 5_000_000,
        record_bytes: 100,
        partitions: 4,
        durability: Durability::None,
        in_flight: 1,
        linger_ms: 5,
        window: 500_000,
        keyed: false,
        idempotent: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--keyed" {
            args.keyed = true;
            continue;
        }
        if flag == "--no-idempotence" {
            args.idempotent = false;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--broker" => args.broker = value,
            "--records" => args.records = number(&value)?,
            "--record-bytes" => args.record_bytes = number(&value)? as usize,
            "--partitions" => args.partitions = number(&value)? as u32,
            "--in-flight" => args.in_flight = number(&value)? as usize,
            "--linger-ms" => args.linger_ms = number(&value)?,
            "--window" => args.window = number(&value)?.max(1) as usize,
            "--durability" => {
                args.durability = match value.as_str() {
                    "none" => Durability::None,
                    "fsync" => Durability::Fsync,
                    other => return Err(format!("--durability: none or fsync, not {other}")),
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let client = Client::connect(&args.broker).await?;
    let topic = format!(
        "produce-throughput-{}-{}",
        args.durability.to_string().replace(':', "-"),
        std::process::id()
    );
    let config = TopicConfig {
        durability: Some(args.durability),
        ..TopicConfig::default()
    };
    client
        .admin()
        .create_topic(&topic, args.partitions, config)
        .await?;
    let producer = client
        .producer_with(
            &topic,
            ProducerConfig {
                linger: Duration::from_millis(args.linger_ms),
                max_in_flight: args.in_flight,
                idempotent: args.idempotent,
                ..ProducerConfig::default()
            },
        )
        .await?;
    let value = Bytes::from(vec![b'x'; args.record_bytes]);
    let keys: Vec<Bytes> = (0..1024)
        .map(|k| Bytes::from(format!("key-{k:04}")))
        .collect();

    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(args.window);
    for i in 0..args.records {
        let mut record = Record::new(value.clone());
        if args.keyed {
            record.key = Some(keys[i as usize % keys.len()].clone());
        }
        if pending.len() == args.window {
            if let Some(send) = pending.pop_front() {
                send.await?;
            }
        }
        pending.push_back(producer.send(record));
    }
    for send in pending {
        send.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let records_per_s = args.records as f64 / elapsed;
    println!(
        "{} records of {} B to {} partitions ({}, durability {}, in-flight {}, linger {} ms, \
         idempotent {}): {:.2} s, {:.0} records/s, {:.1} MB/s",
        args.records,
        args.record_bytes,
        args.partitions,
        if args.keyed { "keyed" } else { "keyless" },
        args.durability,
        args.in_flight,
        args.linger_ms,
        args.idempotent,
        elapsed,
        records_per_s,
        records_per_s * args.record_bytes as f64 / 1e6,
    );
    client.admin().delete_topic(&topic).await?;
    Ok(())
}
