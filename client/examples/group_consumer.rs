//! A consumer group member you can run in several terminals: each instance joins the
//! group, prints the partitions it owns whenever they change, prints every record
//! (`partition offset key value`, tab-separated) and commits as it goes. Ctrl-C commits
//! and leaves, so the other instances take its partitions at once.
//!
//! ```text
//! cargo run --release -p strata-client --example group_consumer -- billing orders
//! cargo run --release -p strata-client --example group_consumer -- --broker 127.0.0.1:7717 billing orders payments
//! ```

use std::time::Duration;

use strata_client::{Client, TopicPartition};
use tokio_stream::StreamExt;

fn usage() -> ! {
    eprintln!("usage: group_consumer [--broker host:port] <group> <topic>...");
    std::process::exit(2);
}

fn show(assignment: &[TopicPartition]) -> String {
    if assignment.is_empty() {
        return "nothing (yet)".into();
    }
    let parts: Vec<String> = assignment.iter().map(ToString::to_string).collect();
    parts.join(", ")
}

#[tokio::main]
async fn main() -> strata_client::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut broker = "127.0.0.1:7717".to_string();
    if args.first().map(String::as_str) == Some("--broker") {
        if args.len() < 2 {
            usage();
        }
        broker = args.remove(1);
        args.remove(0);
    }
    if args.len() < 2 {
        usage();
    }
    let group = args.remove(0);
    let topics: Vec<&str> = args.iter().map(String::as_str).collect();

    let client = Client::connect(&broker).await?;
    let mut consumer = client.consumer(&group, &topics).await?;
    eprintln!("joined group {group} as {:?}", consumer.member_id());
    let mut shown = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            record = consumer.next() => {
                let Some(record) = record else { break };
                let record = record?;
                let text = |b: &Option<bytes::Bytes>| {
                    b.as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned()
                };
                println!(
                    "{}\t{}\t{}\t{}",
                    record.partition,
                    record.offset,
                    text(&record.key),
                    text(&record.value)
                );
            }
            _ = tick.tick() => {
                let now = consumer.assignment();
                if now != shown {
                    eprintln!("owns: {}", show(&now));
                    shown = now;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("committing and leaving the group");
    consumer.close().await
}
