//! A standalone consumer of one partition (no consumer group): a background task reads
//! it (`follow`) and buffers answers ahead of the application within a byte budget.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use strata_proto::v1::broker_client::BrokerClient;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::transport::Channel;

use crate::admin::{Admin, OffsetSpec};
use crate::error::{Error, Result};
use crate::follow::{self, Follower};
use crate::record::ConsumedRecord;

/// Where a [`PartitionConsumer`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// At this offset. An offset inside a batch skips the batch's earlier records.
    Offset(u64),
    /// At the first offset still stored.
    Earliest,
    /// At the high watermark: only records written from now on.
    Latest,
    /// At the first record whose timestamp is at or after this time (ms since the Unix
    /// epoch), or at the high watermark if there is none.
    Timestamp(i64),
}

/// Settings of a [`PartitionConsumer`].
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Soft limit on the bytes of one message of the stream (the broker caps it at
    /// 8 MiB).
    pub fetch_bytes_max: u32,
    /// Bytes of answers buffered ahead of the application (default 4 MiB). When an
    /// answer would pass it, the stream is cancelled, so a slow application holds no
    /// broker memory, and the consumer polls with Fetch until it has caught up.
    pub prefetch_bytes_max: u32,
    /// How often the subscription is made again, in a row, after a retriable failure (the
    /// broker restarted or could not be reached, or its fetch memory was busy) before the
    /// stream yields the error and ends. A message received resets the count.
    pub retries: u32,
    /// First retry delay; doubled per attempt.
    pub retry_backoff_min: Duration,
    /// Largest retry delay.
    pub retry_backoff_max: Duration,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            fetch_bytes_max: 1 << 20,
            prefetch_bytes_max: 4 << 20,
            retries: 30,
            retry_backoff_min: Duration::from_millis(20),
            retry_backoff_max: Duration::from_secs(1),
        }
    }
}

/// Reads one partition in offset order, as an endless [`Stream`] of records. After an
/// error (an unknown topic, an [`Error::OffsetOutOfRange`] when retention overtook the
/// reader, a broker unreachable for longer than the retries) the stream yields that
/// error and ends.
///
/// It tails the partition through one Subscribe stream while it keeps up: the broker
/// sends new records as soon as they are committed, with no request per answer. Behind
/// its prefetch budget, it polls with Fetch until it reaches the end of the partition.
/// Dropping the consumer ends the stream.
///
/// ```no_run
/// use strata_client::{Client, StartAt};
/// use tokio_stream::StreamExt;
///
/// # async fn run() -> strata_client::Result<()> {
/// let client = Client::connect("127.0.0.1:7717").await?;
/// let mut consumer = client.partition_consumer("orders", 0, StartAt::Earliest).await?;
/// while let Some(record) = consumer.next().await {
///     let record = record?;
///     println!("{}: {:?}", record.offset, record.value);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct PartitionConsumer {
    answers: mpsc::UnboundedReceiver<Answer>,
    ready: VecDeque<ConsumedRecord>,
    task: tokio::task::JoinHandle<()>,
    start: u64,
}

impl PartitionConsumer {
    pub(crate) async fn start(
        client: BrokerClient<Channel>,
        admin: Admin,
        topic: &str,
        partition: u32,
        start: StartAt,
        config: ConsumerConfig,
    ) -> Result<PartitionConsumer> {
        let partitions = admin.describe_topic(topic).await?.topic.partitions;
        if partition >= partitions {
            return Err(Error::PartitionNotFound {
                topic: topic.to_string(),
                partition,
                partitions,
            });
        }
        let offset = match start {
            StartAt::Offset(offset) => offset,
            StartAt::Earliest => {
                admin
                    .list_offsets(topic, partition, OffsetSpec::Earliest)
                    .await?
            }
            StartAt::Latest => {
                admin
                    .list_offsets(topic, partition, OffsetSpec::Latest)
                    .await?
            }
            StartAt::Timestamp(t) => {
                admin
                    .list_offsets(topic, partition, OffsetSpec::Timestamp(t))
                    .await?
            }
        };
        // Unbounded in answers, bounded in bytes: an answer holds its share of the
        // prefetch budget until the application takes it.
        let (tx, answers) = mpsc::unbounded_channel();
        let budget_bytes = config.prefetch_bytes_max.max(1);
        let fetcher = Fetcher {
            follower: Follower {
                client,
                topic: Arc::from(topic),
                partition,
                member: None,
                fetch_bytes_max: config.fetch_bytes_max,
                budget: Arc::new(Semaphore::new(budget_bytes as usize)),
                budget_bytes,
                polling: false,
            },
            config,
            tx,
        };
        let task = tokio::spawn(fetcher.run(offset));
        Ok(PartitionConsumer {
            answers,
            ready: VecDeque::new(),
            task,
            start: offset,
        })
    }

    /// The offset this consumer started at (resolved from its [`StartAt`]).
    pub fn start_offset(&self) -> u64 {
        self.start
    }
}

impl Stream for PartitionConsumer {
    type Item = Result<ConsumedRecord>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(record) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(record)));
            }
            match self.answers.poll_recv(cx) {
                // The answer's budget goes back as it is taken.
                Poll::Ready(Some((Ok(records), _budget))) => self.ready = records.into(),
                Poll::Ready(Some((Err(e), _))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for PartitionConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer for the application, with its share of the prefetch budget (none for the
/// error that ends the stream).
type Answer = (Result<Vec<ConsumedRecord>>, Option<OwnedSemaphorePermit>);

struct Fetcher {
    follower: Follower,
    config: ConsumerConfig,
    tx: mpsc::UnboundedSender<Answer>,
}

impl Fetcher {
    async fn run(mut self, mut offset: u64) {
        let mut hand_on = |records, budget| self.tx.send((Ok(records), Some(budget))).is_ok();
        let mut failures = 0;
        loop {
            let error = match self
                .follower
                .read(&mut offset, &mut failures, &mut hand_on)
                .await
            {
                Ok(()) => return,
                Err(e) => e,
            };
            if follow::retriable(&error) && failures < self.config.retries {
                let delay = crate::backoff(
                    self.config.retry_backoff_min,
                    self.config.retry_backoff_max,
                    failures,
                );
                failures += 1;
                tokio::time::sleep(delay).await;
                continue;
            }
            let _ = self.tx.send((Err(error), None));
            return;
        }
    }
}
