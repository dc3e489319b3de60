//! Reading one partition for a consumer, the one place both consumers do it: a
//! Subscribe stream while the application keeps up, so records arrive as soon as they
//! are committed with no request per answer.
//!
//! - **Prefetch budget.** Every answer handed to the application holds its bytes of the
//!   consumer's budget until the application takes it. When a message does not fit, the
//!   stream is dropped, which cancels it: a consumer holds a stream only while it has
//!   room for what the stream brings, so an application that stops reading leaves the
//!   broker holding nothing for it.
//! - **Behind, it polls.** An application slower than its partition would have every
//!   new stream cancelled at its first answer, after the broker had read and sent ahead
//!   what the stream's window allows, for nothing. So after a pause the reader uses
//!   long-poll Fetch, one answer per request and nothing read ahead, until an answer
//!   reaches the high watermark: caught up, it subscribes again.
//! - **The broker's streaming memory.** The broker lets Subscribe streams hold only part
//!   of its fetch memory and keeps the rest for Fetch. When a Subscribe is refused or
//!   ended for lack of it (`RESOURCE_EXHAUSTED`), the reader polls too, so clients that
//!   hold the streaming part (or a hostile one) slow a consumer down but do not stop it.

use std::sync::Arc;
use std::time::Duration;

use strata_proto::v1::{self, broker_client::BrokerClient};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tonic::transport::Channel;
use tonic::Status;

use crate::error::{Error, Result};
use crate::record::{decode, ConsumedRecord};

/// How long the Fetch that stands in for a refused Subscribe waits for new data.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// How much longer than its wait that Fetch may take before it counts as failed.
const POLL_TIMEOUT_MARGIN: Duration = Duration::from_secs(30);

/// One partition's reader.
pub(crate) struct Follower {
    pub client: BrokerClient<Channel>,
    pub topic: Arc<str>,
    pub partition: u32,
    /// Set for a group member: the broker serves it only while it owns the partition.
    pub member: Option<v1::GroupMember>,
    /// Soft limit on one answer's bytes.
    pub fetch_bytes_max: u32,
    /// The consumer's prefetch budget (bytes), and its size.
    pub budget: Arc<Semaphore>,
    pub budget_bytes: u32,
    /// Reading with Fetch until caught up (see the module documentation).
    pub polling: bool,
}

/// How one stream or poll ended, when not by an error.
enum Stop {
    /// The application side is gone.
    Gone,
    /// A message did not fit the budget: the stream is cancelled. [`Follower::resume`]
    /// waits for room, and these records go on before reading again.
    Paused(Paused),
    /// A poll handed on what it read: read again.
    Again,
}

/// Records that did not fit the prefetch budget, and the budget they need.
struct Paused {
    records: Vec<ConsumedRecord>,
    permits: u32,
}

/// Whether a failed read is worth retrying: the broker is unreachable or restarting, or
/// busy (a read asks for nothing too large, so `RESOURCE_EXHAUSTED` means its fetch
/// memory is held by responses in flight, and frees as they go).
pub(crate) fn retriable(error: &Error) -> bool {
    error.is_retriable() || matches!(error, Error::TooLarge { .. })
}

impl Follower {
    /// Reads from `offset` on, moving it past what it hands on, until a read fails (the
    /// error) or the application side is gone (`Ok`). `hand_on` gives records with their
    /// budget to the application side, false once it is gone. An answer decoded resets
    /// `failures`.
    pub async fn read(
        &mut self,
        offset: &mut u64,
        failures: &mut u32,
        hand_on: &mut impl FnMut(Vec<ConsumedRecord>, OwnedSemaphorePermit) -> bool,
    ) -> Result<()> {
        loop {
            match self.follow(offset, failures, hand_on).await? {
                Stop::Gone => return Ok(()),
                Stop::Again => {}
                Stop::Paused(paused) => {
                    if !self.resume(paused, hand_on).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// One stream (one poll while polling), until an error, the application side is
    /// gone, or a message does not fit the budget.
    async fn follow(
        &mut self,
        offset: &mut u64,
        failures: &mut u32,
        hand_on: &mut impl FnMut(Vec<ConsumedRecord>, OwnedSemaphorePermit) -> bool,
    ) -> Result<Stop> {
        if self.polling {
            return self.poll(offset, failures, hand_on).await;
        }
        let request = v1::SubscribeRequest {
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: *offset,
            max_bytes: self.fetch_bytes_max,
            decode: false,
            member: self.member.clone(),
        };
        let mut stream = match self.client.clone().subscribe(request).await {
            Ok(answer) => answer.into_inner(),
            Err(status) => {
                return self
                    .streaming_failed(status, offset, failures, hand_on)
                    .await
            }
        };
        loop {
            let answer = match stream.message().await {
                Ok(answer) => answer,
                Err(status) => {
                    return self
                        .streaming_failed(status, offset, failures, hand_on)
                        .await
                }
            };
            let Some(answer) = answer else {
                // The broker ends a stream only with a status; an end without one is a
                // cut connection.
                return Err(Error::Unavailable {
                    message: format!(
                        "the subscription to {} partition {} ended without a status",
                        self.topic, self.partition
                    ),
                });
            };
            if let Some(stop) = self.take(answer, offset, failures, hand_on)? {
                return Ok(stop);
            }
        }
    }

    /// A refused Subscribe or a failed stream: the error, or for lack of the broker's
    /// streaming memory a poll from the rest of it.
    async fn streaming_failed(
        &mut self,
        status: Status,
        offset: &mut u64,
        failures: &mut u32,
        hand_on: &mut impl FnMut(Vec<ConsumedRecord>, OwnedSemaphorePermit) -> bool,
    ) -> Result<Stop> {
        match self.refused(status, *offset) {
            Error::TooLarge { .. } => {
                self.polling = true;
                self.poll(offset, failures, hand_on).await
            }
            e => Err(e),
        }
    }

    /// One long-poll Fetch; caught up with the partition, it stops polling.
    async fn poll(
        &mut self,
        offset: &mut u64,
        failures: &mut u32,
        hand_on: &mut impl FnMut(Vec<ConsumedRecord>, OwnedSemaphorePermit) -> bool,
    ) -> Result<Stop> {
        let mut request = tonic::Request::new(v1::FetchRequest {
            topic: self.topic.to_string(),
            partition: self.partition,
            offset: *offset,
            max_bytes: self.fetch_bytes_max,
            max_wait_ms: POLL_WAIT.as_millis() as u32,
            decode: false,
            member: self.member.clone(),
        });
        request.set_timeout(POLL_WAIT + POLL_TIMEOUT_MARGIN);
        let answer = self
            .client
            .clone()
            .fetch(request)
            .await
            .map_err(|s| self.refused(s, *offset))?
            .into_inner();
        let caught_up = answer.next_offset >= answer.high_watermark;
        let stop = self.take(answer, offset, failures, hand_on)?;
        if caught_up && stop.is_none() {
            self.polling = false;
        }
        Ok(stop.unwrap_or(Stop::Again))
    }

    /// Decodes one answer and hands its records on within the budget; what stops the
    /// reading, if anything.
    fn take(
        &mut self,
        answer: v1::FetchResponse,
        offset: &mut u64,
        failures: &mut u32,
        hand_on: &mut impl FnMut(Vec<ConsumedRecord>, OwnedSemaphorePermit) -> bool,
    ) -> Result<Option<Stop>> {
        let mut records = Vec::new();
        decode(
            &answer.batches,
            &self.topic,
            self.partition,
            *offset,
            &mut records,
        )?;
        *failures = 0;
        *offset = (*offset).max(answer.next_offset);
        if records.is_empty() {
            return Ok(None);
        }
        let permits = answer.batches.len().clamp(1, self.budget_bytes as usize) as u32;
        let budget = match Arc::clone(&self.budget).try_acquire_many_owned(permits) {
            Ok(budget) => budget,
            Err(TryAcquireError::NoPermits) => {
                self.polling = true;
                return Ok(Some(Stop::Paused(Paused { records, permits })));
            }
            Err(TryAcquireError::Closed) => return Ok(Some(Stop::Gone)),
        };
        Ok((!hand_on(records, budget)).then_some(Stop::Gone))
    }

    /// Waits until the budget has room for `paused`, hands the records on, and says
    /// whether the application side is still there.
    async fn resume(
        &self,
        paused: Paused,
        hand_on: &mut impl FnMut(Vec<ConsumedRecord>, OwnedSemaphorePermit) -> bool,
    ) -> bool {
        match Arc::clone(&self.budget)
            .acquire_many_owned(paused.permits)
            .await
        {
            Ok(budget) => hand_on(paused.records, budget),
            Err(_) => false,
        }
    }

    /// The error of a refused call or a failed stream, with the read's context.
    fn refused(&self, status: Status, offset: u64) -> Error {
        let read = Some((self.partition, offset));
        match &self.member {
            Some(member) => Error::from_member_status(status, &member.group, &self.topic, read),
            None => Error::from_status(status, &self.topic, read),
        }
    }
}
