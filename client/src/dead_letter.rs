//! Dead letters: a record whose handler keeps failing is retried with exponential
//! backoff and then published, with headers that say why, to a dead-letter topic, so one
//! poison record does not stop its partition.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use crate::admin::TopicConfig;
use crate::error::{Error, Result};
use crate::producer::{Delivery, Producer};
use crate::record::{headers, ConsumedRecord, Record};
use crate::Client;

/// Appended to a topic's name to name its dead-letter topic.
pub const DEAD_LETTER_SUFFIX: &str = ".dlq";

/// The longest error text kept in the [`headers::DLQ_ERROR`] header; a longer one is cut
/// (at a character boundary) so a runaway message cannot bloat the dead-letter record.
pub const DLQ_ERROR_BYTES_MAX: usize = 1024;

/// How [`DeadLetters`] retries a handler and where it sends what still fails.
///
/// ```
/// use std::time::Duration;
/// use strata_client::DeadLetterPolicy;
///
/// let policy = DeadLetterPolicy {
///     max_attempts: 3,
///     backoff_min: Duration::from_millis(200),
///     topic: Some("checkout.poison".into()),
///     ..DeadLetterPolicy::default()
/// };
/// # let _ = policy;
/// ```
#[derive(Debug, Clone)]
pub struct DeadLetterPolicy {
    /// How often the handler runs at most, the first try included (default 5; at least
    /// 1).
    pub max_attempts: u32,
    /// Delay before the second try; doubled per try after (default 100 ms).
    pub backoff_min: Duration,
    /// Largest delay between tries (default 5 s).
    pub backoff_max: Duration,
    /// The dead-letter topic; `None` (the default): the record's topic with
    /// [`DEAD_LETTER_SUFFIX`], e.g. `orders.dlq`.
    pub topic: Option<String>,
    /// Create the dead-letter topic when it does not exist (default true), with the
    /// source topic's partition count and the broker's default settings. Turn it off
    /// where operators provision topics: a missing dead-letter topic then fails with
    /// [`Error::TopicNotFound`], and the record must not be committed.
    pub create_topic: bool,
}

impl Default for DeadLetterPolicy {
    fn default() -> Self {
        DeadLetterPolicy {
            max_attempts: 5,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            topic: None,
            create_topic: true,
        }
    }
}

/// What became of a record given to [`DeadLetters::process`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded, at this try.
    Processed {
        /// Tries it took, from 1.
        attempts: u32,
    },
    /// Every try failed; the record is stored in the dead-letter topic.
    DeadLettered {
        /// Tries made.
        attempts: u32,
        /// The last failure, as written to the [`headers::DLQ_ERROR`] header.
        error: String,
        /// The dead-letter topic.
        topic: String,
        /// Where the dead letter was stored.
        delivery: Delivery,
    },
}

/// Runs a handler on consumed records with retries, and moves records that still fail
/// to a dead-letter topic. Either way the record is then done with: commit it and go on.
///
/// A dead letter keeps the record's key, value and headers, is timestamped when it is
/// written, and gets these headers: [`headers::DLQ_ERROR`] (the last error's text),
/// [`headers::DLQ_ATTEMPTS`], [`headers::DLQ_SOURCE_TOPIC`],
/// [`headers::DLQ_SOURCE_PARTITION`], [`headers::DLQ_SOURCE_OFFSET`],
/// [`headers::DLQ_SOURCE_TIMESTAMP`] and [`headers::DLQ_TIMESTAMP`] (numbers in
/// decimal text). Producers to dead-letter topics are made on first use and kept.
///
/// ```no_run
/// use strata_client::{Client, DeadLetterPolicy, DeadLetters, Outcome};
/// use tokio_stream::StreamExt;
///
/// # async fn charge(_: Option<bytes::Bytes>) -> Result<(), String> { Ok(()) }
/// # async fn run() -> strata_client::Result<()> {
/// let client = Client::connect("127.0.0.1:7717").await?;
/// let mut consumer = client.consumer("payments", &["orders"]).await?;
/// let dead_letters = DeadLetters::new(&client, DeadLetterPolicy::default());
/// while let Some(record) = consumer.next().await {
///     let record = record?;
///     // The handler gets the record on each try; clone what the future needs.
///     let outcome = dead_letters
///         .process(&record, |r| charge(r.value.clone()))
///         .await?;
///     if let Outcome::DeadLettered { error, topic, .. } = outcome {
///         eprintln!("order at offset {} moved to {topic}: {error}", record.offset);
///     }
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DeadLetters {
    client: Client,
    policy: DeadLetterPolicy,
    /// Producers by dead-letter topic.
    producers: tokio::sync::Mutex<HashMap<String, Producer>>,
}

impl DeadLetters {
    /// A helper with this policy, producing over `client`'s connection.
    pub fn new(client: &Client, policy: DeadLetterPolicy) -> DeadLetters {
        DeadLetters {
            client: client.clone(),
            policy,
            producers: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &DeadLetterPolicy {
        &self.policy
    }

    /// Runs `handler` on `record` until it succeeds, at most
    /// [`max_attempts`](DeadLetterPolicy::max_attempts) times with exponential backoff
    /// in between; if the last try fails too, publishes the record to the dead-letter
    /// topic and waits until it is stored. Fails only if the dead letter cannot be
    /// written: then the record is neither processed nor stored, and must not be
    /// committed.
    ///
    /// It all runs inside the record's trace ([`ConsumedRecord::in_trace`]): what the
    /// handler produces, and the dead letter, continue the producer's trace.
    pub async fn process<F, Fut, E>(&self, record: &ConsumedRecord, handler: F) -> Result<Outcome>
    where
        F: FnMut(&ConsumedRecord) -> Fut,
        Fut: Future<Output = std::result::Result<(), E>>,
        E: Display,
    {
        record.in_trace(self.process_here(record, handler)).await
    }

    async fn process_here<F, Fut, E>(
        &self,
        record: &ConsumedRecord,
        mut handler: F,
    ) -> Result<Outcome>
    where
        F: FnMut(&ConsumedRecord) -> Fut,
        Fut: Future<Output = std::result::Result<(), E>>,
        E: Display,
    {
        let attempts = self.policy.max_attempts.max(1);
        let mut error = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                let delay = crate::backoff(
                    self.policy.backoff_min,
                    self.policy.backoff_max,
                    attempt - 1,
                );
                tokio::time::sleep(delay).await;
            }
            match handler(record).await {
                Ok(()) => {
                    return Ok(Outcome::Processed {
                        attempts: attempt + 1,
                    })
                }
                Err(e) => error = e.to_string(),
            }
        }
        let error = truncate(error, DLQ_ERROR_BYTES_MAX);
        let (topic, delivery) = self.dead_letter(record, &error, attempts).await?;
        Ok(Outcome::DeadLettered {
            attempts,
            error,
            topic,
            delivery,
        })
    }

    /// Publishes `record` to its dead-letter topic at once, with `error` and `attempts`
    /// in its headers: for a record known to be unprocessable (one that cannot be
    /// decoded, say) without retrying. Returns the topic and where the dead letter is
    /// stored.
    pub async fn dead_letter(
        &self,
        record: &ConsumedRecord,
        error: &str,
        attempts: u32,
    ) -> Result<(String, Delivery)> {
        let topic = match &self.policy.topic {
            Some(topic) => topic.clone(),
            None => format!("{}{DEAD_LETTER_SUFFIX}", record.topic),
        };
        let producer = self.producer(&topic, &record.topic).await?;
        let delivery = producer
            .send(dead_letter_record(record, error, attempts))
            .await?;
        Ok((topic, delivery))
    }

    async fn producer(&self, topic: &str, source: &str) -> Result<Producer> {
        let mut producers = self.producers.lock().await;
        if let Some(producer) = producers.get(topic) {
            return Ok(producer.clone());
        }
        let producer = match self.client.producer(topic).await {
            Err(Error::TopicNotFound { .. }) if self.policy.create_topic => {
                let admin = self.client.admin();
                let partitions = admin.describe_topic(source).await?.topic.partitions;
                match admin
                    .create_topic(topic, partitions, TopicConfig::default())
                    .await
                {
                    // Another consumer created it first.
                    Ok(_) | Err(Error::TopicExists { .. }) => {}
                    Err(e) => return Err(e),
                }
                self.client.producer(topic).await?
            }
            result => result?,
        };
        producers.insert(topic.to_string(), producer.clone());
        Ok(producer)
    }
}

/// The dead letter of `record`: its key, value and headers, plus the `dlq.*` headers.
fn dead_letter_record(record: &ConsumedRecord, error: &str, attempts: u32) -> Record {
    let mut headers = record.headers.clone();
    headers.extend([
        (headers::DLQ_ERROR.to_string(), error.to_string().into()),
        (
            headers::DLQ_ATTEMPTS.to_string(),
            attempts.to_string().into(),
        ),
        (
            headers::DLQ_SOURCE_TOPIC.to_string(),
            record.topic.to_string().into(),
        ),
        (
            headers::DLQ_SOURCE_PARTITION.to_string(),
            record.partition.to_string().into(),
        ),
        (
            headers::DLQ_SOURCE_OFFSET.to_string(),
            record.offset.to_string().into(),
        ),
        (
            headers::DLQ_SOURCE_TIMESTAMP.to_string(),
            record.timestamp_ms.to_string().into(),
        ),
        (
            headers::DLQ_TIMESTAMP.to_string(),
            crate::now_ms().to_string().into(),
        ),
    ]);
    // The dead letter is timestamped now, not with the source's time: retention of the
    // dead-letter topic counts from when the record failed.
    Record {
        key: record.key.clone(),
        value: record.value.clone(),
        headers,
        timestamp_ms: None,
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;

    fn consumed() -> ConsumedRecord {
        ConsumedRecord {
            topic: Arc::from("orders"),
            partition: 2,
            offset: 41,
            timestamp_ms: 1_000,
            key: Some(Bytes::from_static(b"order-7")),
            value: Some(Bytes::from_static(b"{bad json")),
            headers: vec![(
                headers::EVENT_TYPE.into(),
                Bytes::from_static(b"order.created"),
            )],
        }
    }

    #[test]
    fn dead_letter_keeps_the_record_and_says_why() {
        let letter = dead_letter_record(&consumed(), "invalid JSON", 3);
        assert_eq!(letter.key.as_deref(), Some(&b"order-7"[..]));
        assert_eq!(letter.value.as_deref(), Some(&b"{bad json"[..]));
        assert_eq!(letter.timestamp_ms, None);
        let header = |name: &str| {
            letter
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8(v.to_vec()).expect("text"))
        };
        assert_eq!(
            header(headers::EVENT_TYPE).as_deref(),
            Some("order.created")
        );
        assert_eq!(header(headers::DLQ_ERROR).as_deref(), Some("invalid JSON"));
        assert_eq!(header(headers::DLQ_ATTEMPTS).as_deref(), Some("3"));
        assert_eq!(header(headers::DLQ_SOURCE_TOPIC).as_deref(), Some("orders"));
        assert_eq!(header(headers::DLQ_SOURCE_PARTITION).as_deref(), Some("2"));
        assert_eq!(header(headers::DLQ_SOURCE_OFFSET).as_deref(), Some("41"));
        assert_eq!(
            header(headers::DLQ_SOURCE_TIMESTAMP).as_deref(),
            Some("1000")
        );
        assert!(header(headers::DLQ_TIMESTAMP).is_some());
    }

    #[test]
    fn truncate_respects_character_boundaries() {
        let check = |text: &str, max: usize, expected: &str| {
            assert_eq!(truncate(text.to_string(), max), expected);
        };
        check("short", 10, "short");
        check("exactly", 7, "exactly");
        check("abcdef", 3, "abc");
        // "é" is two bytes: cutting inside it keeps the whole character out.
        check("aé", 2, "a");
    }

    #[tokio::test]
    async fn handler_retries_then_succeeds_without_a_dead_letter() {
        // A lazy client never connects: a successful handler needs no broker.
        let client = Client::connect_lazy("127.0.0.1:1").expect("a valid address");
        let policy = DeadLetterPolicy {
            max_attempts: 4,
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(2),
            ..DeadLetterPolicy::default()
        };
        let dead_letters = DeadLetters::new(&client, policy);
        let mut tries = 0;
        let outcome = dead_letters
            .process(&consumed(), |_| {
                tries += 1;
                let result = if tries < 3 { Err("not yet") } else { Ok(()) };
                async move { result }
            })
            .await
            .expect("processed");
        assert_eq!(outcome, Outcome::Processed { attempts: 3 });
        assert_eq!(tries, 3);
    }
}
