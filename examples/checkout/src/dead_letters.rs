//! Reading the dead-letter topics: what was moved aside, why, and from where.
//!
//! `strata consume orders.created.dlq` shows a dead letter's key and value; this adds
//! the `dlq.*` headers the client's dead-letter helper wrote (`checkout dead-letters`).

use strata_client::{headers, Client, Error as ClientError, StartAt, DEAD_LETTER_SUFFIX};
use tokio_stream::StreamExt;

use crate::error::Result;
use crate::events::topics;

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The dead-letter topic.
    pub topic: String,
    /// Where in it.
    pub partition: u32,
    /// Where in it.
    pub offset: u64,
    /// `topic/partition@offset` of the original record.
    pub source: String,
    /// Why it was moved aside.
    pub error: String,
    /// How often it was tried.
    pub attempts: String,
    /// The original value, as text.
    pub value: String,
}

/// Every dead letter of the checkout's topics, by topic and offset.
pub async fn list(client: &Client) -> Result<Vec<DeadLetter>> {
    let admin = client.admin();
    let mut out = Vec::new();
    for source in topics::ALL {
        let topic = format!("{source}{DEAD_LETTER_SUFFIX}");
        let description = match admin.describe_topic(&topic).await {
            Ok(description) => description,
            Err(ClientError::TopicNotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        for partition in &description.partitions {
            if partition.latest_offset <= partition.earliest_offset {
                continue;
            }
            let mut records = client
                .partition_consumer(&topic, partition.partition, StartAt::Earliest)
                .await?;
            while let Some(record) = records.next().await {
                let record = record?;
                let header = |name| record.header_str(name).unwrap_or("").to_string();
                out.push(DeadLetter {
                    topic: topic.clone(),
                    partition: record.partition,
                    offset: record.offset,
                    source: format!(
                        "{}/{}@{}",
                        header(headers::DLQ_SOURCE_TOPIC),
                        header(headers::DLQ_SOURCE_PARTITION),
                        header(headers::DLQ_SOURCE_OFFSET)
                    ),
                    error: header(headers::DLQ_ERROR),
                    attempts: header(headers::DLQ_ATTEMPTS),
                    value: String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
                        .into_owned(),
                });
                if record.offset + 1 >= partition.latest_offset {
                    break;
                }
            }
        }
    }
    Ok(out)
}
