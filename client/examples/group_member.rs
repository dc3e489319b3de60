//! One consumer-group member that reads and counts records until SIGTERM or Ctrl-C, then
//! commits and leaves the group. `benches/soak.sh` runs one after another of these to
//! make a group rebalance under load; unlike `strata consume --group`, it prints nothing
//! per record, so it keeps up with a fast producer.
//!
//! ```text
//! cargo build --release -p strata-client --example group_member
//! target/release/examples/group_member --broker 127.0.0.1:7717 --group churn --topic orders
//! ```

use strata_client::Client;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::StreamExt;

fn parse_args() -> Result<(String, String, String), String> {
    let (mut broker, mut group, mut topic) = ("127.0.0.1:7717".to_string(), None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--broker" => broker = value,
            "--group" => group = Some(value),
            "--topic" => topic = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok((
        broker,
        group.ok_or("--group is required")?,
        topic.ok_or("--topic is required")?,
    ))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (broker, group, topic) = parse_args()?;
    let client = Client::connect(&broker).await?;
    let mut consumer = client.consumer(&group, &[&topic]).await?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut records = 0u64;
    loop {
        tokio::select! {
            record = consumer.next() => match record {
                Some(record) => {
                    record?;
                    records += 1;
                }
                None => break,
            },
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    consumer.close().await?;
    eprintln!("{records} records read");
    Ok(())
}
