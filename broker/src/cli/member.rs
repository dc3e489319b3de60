//! `strata consume --group`: a consumer group member on the command line, built on
//! `strata-client`'s [`Consumer`], which owns the group protocol (join, heartbeats,
//! assignment changes, fenced fetches, commits, leave).
//!
//! Records go to standard output as `strata consume` prints them; what happens to the
//! membership goes to standard error: the member id at the join, the partitions owned
//! whenever they change, and the leave. Delivery is at least once: the consumer commits
//! only explicitly, after the records it printed are flushed, so a record is never
//! committed before it is out; a partition taken away keeps that commit, and its next
//! owner resumes there.

use std::time::Duration;

use strata_client::{Client, Consumer, ConsumerGroupConfig, TopicPartition};
use tokio::io::{AsyncWriteExt, BufWriter, Stdout};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::StreamExt;

use super::{create_it, record_line};

/// The client id the group shows for members started by `strata consume`.
const CLIENT_ID: &str = "strata-consume";
/// How often the member looks for a change of its partitions or membership to report.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// What the member last reported to the person watching.
#[derive(Debug, PartialEq)]
struct Shown {
    member_id: Option<String>,
    assignment: Vec<TopicPartition>,
}

fn status(consumer: &Consumer) -> Shown {
    Shown {
        member_id: consumer.member_id(),
        assignment: consumer.assignment(),
    }
}

fn report(group: &str, before: &Shown, now: &Shown) {
    if before.member_id != now.member_id {
        match &now.member_id {
            Some(id) => eprintln!("joined group {group} as member {id}"),
            None => eprintln!("rejoining group {group} (the broker no longer knows this member)"),
        }
    }
    if before.assignment != now.assignment && now.member_id.is_some() {
        if now.assignment.is_empty() {
            eprintln!("owns no partitions (the other members have them all)");
        } else {
            let owned: Vec<String> = now.assignment.iter().map(ToString::to_string).collect();
            eprintln!("owns {}", owned.join(", "));
        }
    }
}

/// Fires on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is
/// created, so a signal that arrives before the first poll is not lost.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Flushes what was printed, then commits it.
async fn flush_and_commit(out: &mut BufWriter<Stdout>, consumer: &Consumer) -> anyhow::Result<()> {
    out.flush().await?;
    match consumer.commit().await {
        Ok(()) => {}
        // Rejoining: the records printed since the last commit come again.
        Err(strata_client::Error::Fenced { .. }) => {}
        // Anything else is retried with the next commit (or the leave).
        Err(e) => eprintln!("strata: warning: commit failed, retrying with the next: {e}"),
    }
    Ok(())
}

/// Runs `strata consume TOPIC --group GROUP`.
pub async fn consume(
    client: &Client,
    group: &str,
    topic: &str,
    max_records: Option<u64>,
) -> anyhow::Result<()> {
    let stop = stop_signal()?;
    tokio::pin!(stop);
    let config = ConsumerGroupConfig {
        client_id: CLIENT_ID.into(),
        // Commits follow the output, below.
        auto_commit_interval: None,
        ..ConsumerGroupConfig::default()
    };
    let mut consumer = client
        .consumer_with(group, &[topic], config)
        .await
        .map_err(|e| match e {
            strata_client::Error::TopicNotFound { .. } => {
                anyhow::anyhow!(
                    "not found: topic {topic:?} does not exist; {}",
                    create_it(topic)
                )
            }
            e => anyhow::anyhow!(e),
        })?;
    let mut shown = Shown {
        member_id: None,
        assignment: Vec::new(),
    };
    let mut out = BufWriter::new(tokio::io::stdout());
    let mut printed = 0u64;
    let mut every = tokio::time::interval(STATUS_EVERY);
    let mut last_error = None;
    let mut ended = false;
    while !ended && max_records.is_none_or(|max| printed < max) {
        let mut next = tokio::select! {
            biased;
            () = &mut stop => break,
            _ = every.tick() => {
                let now = status(&consumer);
                report(group, &shown, &now);
                shown = now;
                continue;
            }
            next = consumer.next() => Some(next),
        };
        // Print every record that is ready, then flush and commit them in one go.
        while let Some(item) = next.take() {
            match item {
                Some(Ok(record)) => {
                    let line = record_line(
                        record.partition,
                        record.offset,
                        record.timestamp_ms,
                        record.key.as_deref(),
                        record.value.as_deref(),
                    );
                    out.write_all(line.as_bytes()).await?;
                    printed += 1;
                }
                // The consumer retries; the stream goes on unless it ends next.
                Some(Err(e)) => {
                    eprintln!("strata: warning: {e}");
                    last_error = Some(e);
                }
                None => ended = true,
            }
            if ended || max_records.is_some_and(|max| printed >= max) {
                break;
            }
            // A zero timeout polls the stream once: what is ready, or nothing.
            next = tokio::time::timeout(Duration::ZERO, consumer.next())
                .await
                .ok();
        }
        flush_and_commit(&mut out, &consumer).await?;
    }
    if ended {
        // The consumer stopped on an error it cannot recover from (a rejoin refused).
        return Err(anyhow::anyhow!(last_error.map_or_else(
            || format!("the member of group {group} stopped"),
            |e| e.to_string()
        )));
    }
    flush_and_commit(&mut out, &consumer).await?;
    // A second Ctrl-C leaves at once, without waiting for the commit and the leave.
    tokio::select! {
        left = consumer.close() => {
            left.map_err(|e| anyhow::anyhow!("could not commit and leave group {group}: {e}"))?;
            eprintln!("committed and left group {group}");
            Ok(())
        }
        () = stop_signal()? => Err(anyhow::anyhow!(
            "interrupted again: stopped without leaving group {group}; its partitions move \
             to the other members when this member's session times out"
        )),
    }
}
