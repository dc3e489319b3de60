//! Consumer groups: a [`Consumer`] joins a group, follows its assignment, reads the
//! partitions it owns and commits the positions the application has received.
//!
//! Three kinds of work run per consumer:
//! - the application side, [`Consumer`] as a [`Stream`], takes fetched answers off one
//!   channel and hands out their records;
//! - the coordinator task runs the membership protocol (join, heartbeats, assignment
//!   changes; docs/protocol.md) and makes every commit, so a commit always carries the
//!   member's current epoch and never races an assignment change;
//! - one fetch task per owned partition finds its start position, follows a Subscribe
//!   stream as the member (the broker ends it for a member that lost the partition),
//!   decodes, and sends the answers on while the prefetch budget (bytes) allows.
//!
//! Each owned partition has one [`Assigned`], shared by the three. Its cursor (a mutex
//! never held across an await) holds the positions that may be committed and whether the
//! partition was taken away. The invariants:
//! - no record of a partition reaches the application after the partition was revoked
//!   or dropped: the flag is checked under the cursor lock as each record is handed out,
//!   and records already fetched or buffered are discarded then;
//! - nothing past what the application was handed is ever committed, per partition;
//!   with auto-commit a record counts once the application asks for the next record
//!   (or commits, or closes), so a crash while a record is being handled leaves it
//!   uncommitted and it is delivered again;
//! - a revoked partition's position is committed before the partition is released; a
//!   fenced member drops its partitions without committing (another member may own them
//!   now).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use strata_proto::v1::{self, broker_client::BrokerClient, groups_client::GroupsClient};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::Stream;
use tonic::transport::Channel;

use crate::admin::{flatten, Admin, OffsetSpec, TopicPartition};
use crate::error::{Error, Result};
use crate::follow::{self, Follower};
use crate::record::ConsumedRecord;
use crate::Client;

/// The range the broker accepts for the session and rebalance timeouts.
const GROUP_TIMEOUT_MIN: Duration = Duration::from_secs(1);
const GROUP_TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// How often [`Client::consumer`] retries its join on a retriable error before failing.
const JOIN_RETRIES: u32 = 8;
/// Commands from the application to the coordinator waiting at once; senders wait
/// beyond.
const COMMANDS_MAX: usize = 16;
/// The member stops handing out records this share of a session before the broker
/// could expire it, to absorb clock rate differences and the time a record takes to
/// reach the application.
const LEASE_MARGIN_DIVISOR: u32 = 10;
/// Auto-commits the broker refused in a row (it answered, with an error) before the
/// consumer's stream reports the failure; once per run of failures.
const AUTO_COMMIT_FAILURES_REPORTED: u32 = 3;

/// How long this member may hand out records: until the send time of the last
/// heartbeat (or join) the broker answered, plus the session timeout, minus a margin.
/// The broker expires a member a session after it *received* that heartbeat, which is
/// later, so a member cut off from the broker (a network partition, a broker restart)
/// stops before its partitions can go to another member, not when a later heartbeat
/// fails.
#[derive(Debug)]
struct Lease {
    base: Instant,
    /// Microseconds after `base` the lease ends.
    until_micros: AtomicU64,
}

impl Lease {
    /// An expired lease: nothing is handed out before the first renewal.
    fn new() -> Lease {
        Lease {
            base: Instant::now(),
            until_micros: AtomicU64::new(0),
        }
    }

    /// Extends the lease after an answer to a heartbeat sent at `sent`.
    fn renew(&self, sent: Instant, session_timeout: Duration) {
        let until = sent + session_timeout - session_timeout / LEASE_MARGIN_DIVISOR;
        let micros = until.saturating_duration_since(self.base).as_micros();
        self.until_micros
            .fetch_max(micros.min(u64::MAX.into()) as u64, Ordering::Release);
    }

    fn deadline(&self) -> Instant {
        self.base + Duration::from_micros(self.until_micros.load(Ordering::Acquire))
    }

    fn expired(&self) -> bool {
        Instant::now() >= self.deadline()
    }
}

/// Where a member starts reading a partition its group has no committed position for
/// (a new group, or a partition added to a topic), and where it resumes when retention
/// deleted the records at its position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OffsetReset {
    /// At the first offset still stored: a new group processes what is already there.
    /// The default, unlike Kafka's: a service deployed after events were published (a
    /// new billing service reading existing orders) must not skip them silently.
    #[default]
    Earliest,
    /// At the high watermark: a new group sees only records written from now on.
    Latest,
    /// Nowhere: the stream yields [`Error::NoPosition`] for the partition (once per run
    /// of attempts) and the partition is not read until the group has a committed
    /// position there, which the consumer keeps checking for. For groups that must
    /// never skip or re-read by accident.
    None,
}

/// Why partitions are taken from a consumer, as its [`OnRevoke`] hook is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// The group moved them to another member, or the consumer is closing: their
    /// positions are committed right after the hook returns.
    Revoked,
    /// The consumer lost its membership (its session ran out, or the group forgot it):
    /// another member may own them already, so nothing is committed.
    Lost,
}

/// A hook a [`Consumer`] calls when partitions are taken from it, after the stream has
/// stopped handing out their records (a record already in the application's hands
/// stays there) and before anything is committed: the place to flush work built from
/// their records. It runs on the consumer's coordinator task: keep it short, and do not
/// wait on this consumer from it (its commits go through that task).
#[derive(Clone)]
pub struct OnRevoke(Arc<RevokeFn>);

type RevokeFn = dyn Fn(Revocation, &[TopicPartition]) + Send + Sync;

impl OnRevoke {
    /// Wraps `hook`.
    pub fn new(hook: impl Fn(Revocation, &[TopicPartition]) + Send + Sync + 'static) -> OnRevoke {
        OnRevoke(Arc::new(hook))
    }
}

impl std::fmt::Debug for OnRevoke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRevoke(..)")
    }
}

/// Settings of a [`Consumer`]. Every field has a default; see each.
///
/// ```
/// use std::time::Duration;
/// use strata_client::{ConsumerGroupConfig, OffsetReset};
///
/// let config = ConsumerGroupConfig {
///     client_id: "billing-7".into(),
///     session_timeout: Duration::from_secs(6),
///     // Commit only through Consumer::commit and Consumer::commit_record.
///     auto_commit_interval: None,
///     auto_offset_reset: OffsetReset::Latest,
///     ..ConsumerGroupConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerGroupConfig {
    /// A name shown by [`Admin::describe_group`](crate::Admin::describe_group).
    pub client_id: String,
    /// Without a heartbeat for this long the broker removes the member and gives its
    /// partitions to others: how long a crashed consumer holds up its partitions (1 s to
    /// 5 min; default 10 s). A consumer that has not had an answer to a heartbeat sent
    /// within the last nine tenths of this stops handing out records and rejoins, so a
    /// consumer cut off from the broker stops before its partitions can go to another.
    pub session_timeout: Duration,
    /// How long the member may keep partitions taken away from it (the time to commit
    /// and stop them) before the broker removes it (1 s to 5 min; default 30 s).
    pub rebalance_timeout: Duration,
    /// Commit the received positions this often (default 5 s), and when partitions are
    /// revoked and on [`Consumer::close`]. When the broker refuses three auto-commits
    /// in a row, the stream yields that error once (and goes on). `None`: commit only through
    /// [`Consumer::commit`] and [`Consumer::commit_record`] (a revoked partition then
    /// keeps its last explicit commit).
    pub auto_commit_interval: Option<Duration>,
    /// Where to start without a committed position (default [`OffsetReset::Earliest`]).
    pub auto_offset_reset: OffsetReset,
    /// Soft limit on the bytes of one streamed answer (per partition; the broker caps it
    /// at 8 MiB).
    pub fetch_bytes_max: u32,
    /// Fetched bytes the consumer buffers ahead of the application, all partitions
    /// together (default 16 MiB). A fetch task waits for room before handing on an
    /// answer, so memory stays within this plus one answer per owned partition, plus
    /// what HTTP/2 flow control lets the broker stream ahead (the connection's window,
    /// 32 MiB).
    pub prefetch_bytes_max: u32,
    /// How long a group call (heartbeat, commit, leave) may take; capped at half the
    /// session timeout so a hung call cannot cost the membership.
    pub request_timeout: Duration,
    /// First delay before retrying a failed call; doubled per attempt.
    pub retry_backoff_min: Duration,
    /// Largest retry delay.
    pub retry_backoff_max: Duration,
    /// Called when partitions are taken from the consumer (default none); see
    /// [`OnRevoke`].
    pub on_revoke: Option<OnRevoke>,
}

impl Default for ConsumerGroupConfig {
    fn default() -> Self {
        ConsumerGroupConfig {
            client_id: "strata-client".into(),
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(30),
            auto_commit_interval: Some(Duration::from_secs(5)),
            auto_offset_reset: OffsetReset::Earliest,
            fetch_bytes_max: 1 << 20,
            prefetch_bytes_max: 16 << 20,
            request_timeout: Duration::from_secs(10),
            retry_backoff_min: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(2),
            on_revoke: None,
        }
    }
}

impl ConsumerGroupConfig {
    fn validate(&self) -> Result<()> {
        let range = GROUP_TIMEOUT_MIN..=GROUP_TIMEOUT_MAX;
        for (name, value) in [
            ("session_timeout", self.session_timeout),
            ("rebalance_timeout", self.rebalance_timeout),
        ] {
            if !range.contains(&value) {
                return Err(Error::InvalidArgument {
                    message: format!("{name} is {value:?}; it must lie between 1 s and 5 min"),
                });
            }
        }
        if self.prefetch_bytes_max == 0 || self.auto_commit_interval == Some(Duration::ZERO) {
            return Err(Error::InvalidArgument {
                message: "prefetch_bytes_max and auto_commit_interval must be above zero".into(),
            });
        }
        Ok(())
    }

    /// The deadline of one group call.
    fn rpc_timeout(&self) -> Duration {
        self.request_timeout.min(self.session_timeout / 2)
    }
}

/// A member of a consumer group: the group's partitions of the subscribed topics are
/// shared among its members, and this one reads those the broker assigns to it, as an
/// endless [`Stream`] of records in offset order per partition. Create one with
/// [`Client::consumer`] or [`Client::consumer_with`].
///
/// Delivery is at least once. The consumer commits, per partition, the position after
/// the records the application has received: with auto-commit (the default, every 5 s)
/// a record counts as received once the application asks for the next record, so a
/// record being handled when the process dies is delivered again. Positions are also
/// committed when a partition moves to another member and on [`close`](Consumer::close).
/// Without auto-commit, the application commits after processing with
/// [`commit`](Consumer::commit) or [`commit_record`](Consumer::commit_record).
///
/// The consumer rides out broker restarts and network failures: calls are retried with
/// backoff, and when the group no longer knows it (the broker restarted, or its session
/// expired) it drops its partitions without committing and rejoins, resuming from the
/// committed positions. Records fetched for a partition it lost are never handed out.
/// The stream yields an error only for what the application should see: a rejoin
/// refused (a topic deleted, an invalid setting), after which the stream ends, and an
/// unexpected broker failure on a partition, which is retried.
///
/// Call [`close`](Consumer::close) to commit and leave the group, so the partitions are
/// free at once and the other members take them on their next heartbeat (within 3 s).
/// Dropping a consumer stops it at once, like a crash: nothing is committed, and its
/// partitions move when its session times out.
///
/// ```no_run
/// use strata_client::Client;
/// use tokio_stream::StreamExt;
///
/// # async fn handle(_: &strata_client::ConsumedRecord) {}
/// # async fn run() -> strata_client::Result<()> {
/// let client = Client::connect("127.0.0.1:7717").await?;
/// let mut consumer = client.consumer("billing", &["orders"]).await?;
/// while let Some(record) = consumer.next().await {
///     let record = record?;
///     handle(&record).await;
///     if record.header_str("event-type") == Some("shutdown") {
///         break;
///     }
/// }
/// consumer.close().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Consumer {
    answers: mpsc::UnboundedReceiver<Answer>,
    /// The answer records are being handed out from.
    current: Option<Fetched>,
    commands: mpsc::Sender<Command>,
    status: Arc<Mutex<Status>>,
    /// Records are handed out only while it lasts.
    lease: Arc<Lease>,
    group: String,
    /// The coordinator; aborting it drops the fetch tasks too.
    _coordinator: AbortOnDrop,
}

/// What the coordinator publishes for [`Consumer::assignment`] and
/// [`Consumer::member_id`].
#[derive(Debug, Default)]
struct Status {
    member_id: Option<String>,
    assignment: Vec<TopicPartition>,
}

/// What fetch tasks and the coordinator send the application side.
#[derive(Debug)]
enum Answer {
    Records(Fetched),
    Error(Error),
}

/// One fetch answer of one partition, decoded.
#[derive(Debug)]
struct Fetched {
    assigned: Arc<Assigned>,
    records: std::vec::IntoIter<ConsumedRecord>,
    /// The last record handed out came from here: it is the one in the application's
    /// hands.
    holding: bool,
    /// Its share of the prefetch budget, returned when the answer is used up.
    _budget: OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Command {
    /// Commit what the application received: everything, or up to and including
    /// `offset` of one partition.
    Commit {
        record: Option<(TopicPartition, u64)>,
        reply: oneshot::Sender<Result<()>>,
    },
    Close {
        reply: oneshot::Sender<Result<()>>,
    },
    /// Read `partition` from `offset` on, and commit that position.
    Seek {
        partition: TopicPartition,
        offset: u64,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// A partition this member owns, shared by its fetch task, the coordinator and the
/// application side. A partition assigned again later gets a new one.
#[derive(Debug)]
struct Assigned {
    topic: Arc<str>,
    partition: u32,
    cursor: Mutex<Cursor>,
}

#[derive(Debug, Default)]
struct Cursor {
    /// Taken away (revoked, fenced, closed): hand out nothing more.
    revoked: bool,
    /// One past the last record handed to the application; the start position before
    /// the first. `None` until the fetch task has found the start.
    delivered: Option<u64>,
    /// The last record handed out may still be in the application's hands (it has not
    /// asked for the next record since).
    in_hand: bool,
    /// The position the application committed explicitly.
    acked: Option<u64>,
    /// The position the group has committed, as last seen.
    committed: Option<u64>,
}

impl Cursor {
    /// The position that may be committed: with auto-commit, past every record the
    /// application is done with; and never behind an explicit commit.
    fn committable(&self, auto_commit: bool) -> Option<u64> {
        let delivered = self.delivered?;
        let received = auto_commit.then(|| delivered - u64::from(self.in_hand));
        received.max(self.acked)
    }

    /// The committable position if the group has not committed it yet.
    fn pending(&self, auto_commit: bool) -> Option<u64> {
        let position = self.committable(auto_commit)?;
        self.committed
            .is_none_or(|committed| position > committed)
            .then_some(position)
    }
}

impl Assigned {
    fn lock(&self) -> MutexGuard<'_, Cursor> {
        // A panic while holding the lock leaves the cursor consistent (every update is
        // a single assignment), so a poisoned lock is still usable.
        self.cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Aborts a task when dropped, so stopping the owner stops the task.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Consumer {
    /// Joins `group` subscribed to `topics` and starts following its assignment.
    pub(crate) async fn start(
        client: &Client,
        group: &str,
        topics: &[&str],
        config: ConsumerGroupConfig,
    ) -> Result<Consumer> {
        config.validate()?;
        if topics.is_empty() {
            return Err(Error::InvalidArgument {
                message: format!("consumer of group {group:?} subscribes to no topic"),
            });
        }
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let (commands_tx, commands) = mpsc::channel(COMMANDS_MAX);
        let (refused_tx, refused) = mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(Status::default()));
        let lease = Arc::new(Lease::new());
        let now = Instant::now();
        let mut coordinator = Coordinator {
            groups: client.groups_client(),
            broker: client.broker_client(),
            admin: client.admin(),
            group: group.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            auto_commit: config.auto_commit_interval.is_some(),
            budget: Arc::new(Semaphore::new(config.prefetch_bytes_max as usize)),
            config: Arc::new(config),
            member: None,
            owned: BTreeMap::new(),
            answers: answers_tx,
            commands,
            refused,
            refused_tx,
            status: Arc::clone(&status),
            lease: Arc::clone(&lease),
            missing: BTreeSet::new(),
            next_heartbeat: now,
            next_auto_commit: None,
            failures: 0,
            commit_refused: false,
            auto_commit_refusals: 0,
            join_key: new_join_key(),
        };
        // The first join answers here, so a missing topic or a bad setting fails the
        // call instead of surfacing later in the stream. A broker that is restarting,
        // or busy resetting the group, is given a few tries.
        let mut attempt = 0;
        let (answer, sent) = loop {
            let sent = Instant::now();
            match coordinator.call_heartbeat(coordinator.join_request()).await {
                Err(e) if e.is_retriable() && attempt < JOIN_RETRIES => {
                    let config = &coordinator.config;
                    let delay =
                        crate::backoff(config.retry_backoff_min, config.retry_backoff_max, attempt);
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                result => break (result?, sent),
            }
        };
        coordinator.accept(answer, sent).await;
        coordinator.next_auto_commit = coordinator
            .config
            .auto_commit_interval
            .map(|interval| Instant::now() + interval);
        let task = tokio::spawn(coordinator.run());
        Ok(Consumer {
            answers,
            current: None,
            commands: commands_tx,
            status,
            lease,
            group: group.to_string(),
            _coordinator: AbortOnDrop(task),
        })
    }

    /// The group this consumer belongs to.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The id the broker gave this member; `None` while it is rejoining.
    pub fn member_id(&self) -> Option<String> {
        self.status().member_id.clone()
    }

    /// The partitions this consumer owns now, sorted.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.status().assignment.clone()
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Commits, for every partition it owns, the position after the last record the
    /// stream handed out: call it once those records are processed. Fails with
    /// [`Error::Fenced`] while the consumer is rejoining its group (the records it had
    /// received will be delivered again), and with [`Error::Closed`] after the stream
    /// ended on an error.
    pub async fn commit(&self) -> Result<()> {
        self.request(|reply| Command::Commit {
            record: None,
            reply,
        })
        .await
    }

    /// Commits the position after `record` in its partition: it and every record before
    /// it there are processed. Fails with [`Error::PartitionRevoked`] if the partition
    /// has moved to another member since (which will deliver the record again), and
    /// with [`Error::InvalidArgument`] for a record this consumer has not handed out.
    pub async fn commit_record(&self, record: &ConsumedRecord) -> Result<()> {
        let partition = TopicPartition {
            topic: record.topic.to_string(),
            partition: record.partition,
        };
        self.request(|reply| Command::Commit {
            record: Some((partition, record.offset)),
            reply,
        })
        .await
    }

    /// Reads `partition` of `topic` from `offset` on: records already buffered from the
    /// old position are dropped and the next record of that partition is the one at
    /// `offset`. Ahead of the group's committed position, `offset` is committed at
    /// once. Behind it, the group's position stays (the broker never moves a member's
    /// commit backwards, so a slow commit cannot undo a newer one): the rewind re-reads
    /// in this consumer, and a restart or rebalance resumes from the committed position;
    /// to move the group back for good, use `Admin::reset_offsets` while it has no
    /// members. The partition must be owned by this consumer
    /// ([`Error::PartitionRevoked`] otherwise) and `offset` between its earliest and
    /// latest offsets ([`Error::InvalidArgument`] otherwise).
    pub async fn seek(&self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        let partition = TopicPartition {
            topic: topic.to_string(),
            partition,
        };
        self.request(|reply| Command::Seek {
            partition,
            offset,
            reply,
        })
        .await
    }

    /// Stops fetching, commits (with auto-commit: everything handed out; without: what
    /// was committed explicitly stays) and leaves the group, so its partitions are free
    /// at once; the other members take them on their next heartbeat (within 3 s, the
    /// longest heartbeat interval the broker gives). If the broker cannot be reached
    /// this fails with [`Error::Unavailable`]; the partitions then move when the session
    /// times out, and what was not committed is delivered again.
    pub async fn close(self) -> Result<()> {
        match self.request(|reply| Command::Close { reply }).await {
            // Stopped already, after an error the stream reported: nothing to leave.
            Err(Error::Closed) => Ok(()),
            result => result,
        }
    }

    /// Hands a command to the coordinator and waits for its answer; [`Error::Closed`]
    /// if the coordinator has stopped (after an error the stream reported).
    async fn request(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<()>>) -> Command,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumedRecord>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(fetched) = &mut this.current {
                let Some(record) = fetched.records.next() else {
                    // Asking for a record means the application is done with the one
                    // handed out before.
                    if fetched.holding {
                        fetched.assigned.lock().in_hand = false;
                    }
                    this.current = None;
                    continue;
                };
                let mut cursor = fetched.assigned.lock();
                if !cursor.revoked && this.lease.expired() {
                    // The broker may expire this member any moment now and give the
                    // partition to another: stop here. The coordinator rejoins, and
                    // starts the partition again from its committed position if it
                    // gets it back.
                    cursor.revoked = true;
                }
                if cursor.revoked {
                    drop(cursor);
                    this.current = None;
                    continue;
                }
                // This also releases the previous record of the same answer: the
                // committable position moves to this record.
                cursor.delivered = Some(record.offset + 1);
                cursor.in_hand = true;
                drop(cursor);
                fetched.holding = true;
                return Poll::Ready(Some(Ok(record)));
            }
            match this.answers.poll_recv(cx) {
                Poll::Ready(Some(Answer::Records(fetched))) => this.current = Some(fetched),
                Poll::Ready(Some(Answer::Error(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The membership this consumer holds.
#[derive(Debug, Clone)]
struct Member {
    id: String,
    epoch: u64,
}

/// A partition owned, with its fetch task.
#[derive(Debug)]
struct Owned {
    assigned: Arc<Assigned>,
    _fetcher: AbortOnDrop,
}

/// The background task of a [`Consumer`]: membership, assignment changes and commits.
struct Coordinator {
    groups: GroupsClient<Channel>,
    broker: BrokerClient<Channel>,
    admin: Admin,
    group: String,
    topics: Vec<String>,
    config: Arc<ConsumerGroupConfig>,
    auto_commit: bool,
    budget: Arc<Semaphore>,
    /// `None` while (re)joining.
    member: Option<Member>,
    owned: BTreeMap<TopicPartition, Owned>,
    answers: mpsc::UnboundedSender<Answer>,
    commands: mpsc::Receiver<Command>,
    /// Fetch tasks report here when the broker refused them as the owner of their
    /// partition: the assignment has probably changed, so heartbeat now.
    refused: mpsc::UnboundedReceiver<()>,
    refused_tx: mpsc::UnboundedSender<()>,
    status: Arc<Mutex<Status>>,
    lease: Arc<Lease>,
    /// Subscribed topics the broker said no longer exist; joins leave them out, so the
    /// other topics go on being consumed. Checked again at every join.
    missing: BTreeSet<String>,
    /// When to heartbeat (or, while not a member, join) next.
    next_heartbeat: Instant,
    next_auto_commit: Option<Instant>,
    /// Failed group calls in a row, for the backoff.
    failures: u32,
    /// The last failed commit was answered by the broker (not lost in transport).
    commit_refused: bool,
    /// Auto-commits the broker refused in a row.
    auto_commit_refusals: u32,
    /// Sent with every attempt of the next join, so the broker recognises a retry of a
    /// join whose answer was lost and gives this consumer that member back; a new one
    /// after every join that was answered.
    join_key: String,
}

fn new_join_key() -> String {
    format!("{:016x}", crate::trace::random_u64())
}

impl Coordinator {
    async fn run(mut self) {
        loop {
            // Far enough never to fire; the branch is disabled without auto-commit.
            let auto_commit_at = self
                .next_auto_commit
                .unwrap_or_else(|| Instant::now() + GROUP_TIMEOUT_MAX);
            let fatal = tokio::select! {
                command = self.commands.recv() => match command {
                    // The consumer was dropped: stop, like a crash.
                    None => return,
                    Some(Command::Close { reply }) => {
                        let _ = reply.send(self.close().await);
                        return;
                    }
                    Some(Command::Commit { record, reply }) => {
                        let _ = reply.send(self.commit_requested(record).await);
                        None
                    }
                    Some(Command::Seek { partition, offset, reply }) => {
                        let _ = reply.send(self.seek(partition, offset).await);
                        None
                    }
                },
                Some(()) = self.refused.recv() => {
                    if self.member.is_some() {
                        self.next_heartbeat = Instant::now();
                    }
                    None
                }
                () = tokio::time::sleep_until(self.next_heartbeat) => self.heartbeat().await,
                () = tokio::time::sleep_until(self.lease.deadline()), if self.member.is_some() => {
                    // No answered heartbeat for (nearly) a session: the application
                    // side has stopped handing out records; give up the membership.
                    self.fence();
                    None
                }
                () = tokio::time::sleep_until(auto_commit_at),
                    if self.next_auto_commit.is_some() => {
                    self.auto_commit().await;
                    None
                }
            };
            if let Some(e) = fatal {
                let _ = self.answers.send(Answer::Error(e));
                return;
            }
        }
    }

    fn join_request(&self) -> v1::HeartbeatRequest {
        v1::HeartbeatRequest {
            group: self.group.clone(),
            member_id: String::new(),
            member_epoch: 0,
            topics: self
                .topics
                .iter()
                .filter(|t| !self.missing.contains(*t))
                .cloned()
                .collect(),
            owned: Vec::new(),
            session_timeout_ms: millis(self.config.session_timeout),
            rebalance_timeout_ms: millis(self.config.rebalance_timeout),
            client_id: self.config.client_id.clone(),
            join_key: self.join_key.clone(),
        }
    }

    async fn call_heartbeat(
        &mut self,
        request: v1::HeartbeatRequest,
    ) -> Result<v1::HeartbeatResponse> {
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.config.rpc_timeout());
        let answer =
            self.groups.heartbeat(request).await.map_err(|s| {
                Error::from_member_status(s, &self.group, &self.topics.join(","), None)
            })?;
        Ok(answer.into_inner())
    }

    /// One heartbeat, or a join while not a member. Returns an error the consumer
    /// cannot recover from.
    async fn heartbeat(&mut self) -> Option<Error> {
        if self.member.is_none() && !self.missing.is_empty() {
            self.refresh_missing().await;
            if self.missing.len() == self.topics.len() {
                // Every subscribed topic is gone (reported already): wait for one.
                self.retry_later();
                return None;
            }
        }
        let request = match &self.member {
            None => self.join_request(),
            Some(member) => v1::HeartbeatRequest {
                group: self.group.clone(),
                member_id: member.id.clone(),
                member_epoch: member.epoch,
                owned: owned_lists(self.owned.keys()),
                client_id: self.config.client_id.clone(),
                ..v1::HeartbeatRequest::default()
            },
        };
        let joining = self.member.is_none();
        let sent = Instant::now();
        match self.call_heartbeat(request).await {
            Ok(answer) => {
                self.failures = 0;
                self.accept(answer, sent).await;
                None
            }
            // A subscribed topic was deleted (its partitions' owners were removed with
            // it): join without it, so the other topics go on being consumed, and tell
            // the application once.
            Err(e @ Error::TopicNotFound { .. }) if joining => {
                if self.refresh_missing().await || self.failures == 0 {
                    let _ = self.answers.send(Answer::Error(e));
                }
                self.retry_later();
                None
            }
            Err(Error::Fenced { .. }) => {
                self.fence();
                self.retry_later();
                None
            }
            Err(e) if e.is_retriable() => {
                // Without a heartbeat for a session the broker has removed this member
                // and others may own its partitions: stop handing them out.
                if self.member.is_some() && self.lease.expired() {
                    self.fence();
                }
                self.retry_later();
                None
            }
            Err(e) => Some(e),
        }
    }

    /// Asks which subscribed topics exist, and joins without the others from now on
    /// (a topic created again is joined again). Returns whether the set of missing
    /// topics changed; it stays as it was when the broker cannot be asked.
    async fn refresh_missing(&mut self) -> bool {
        let Ok(topics) = self.admin.list_topics().await else {
            return false;
        };
        let existing: BTreeSet<&str> = topics.iter().map(|t| t.name.as_str()).collect();
        let missing: BTreeSet<String> = self
            .topics
            .iter()
            .filter(|t| !existing.contains(t.as_str()))
            .cloned()
            .collect();
        let changed = missing != self.missing;
        self.missing = missing;
        changed
    }

    fn retry_later(&mut self) {
        let delay = crate::backoff(
            self.config.retry_backoff_min,
            self.config.retry_backoff_max,
            self.failures,
        );
        self.failures += 1;
        self.next_heartbeat = Instant::now() + delay;
    }

    /// Takes in a heartbeat (or join) answer: the membership and the assignment.
    /// `sent` is when the heartbeat was sent: the lease runs from there.
    async fn accept(&mut self, answer: v1::HeartbeatResponse, sent: Instant) {
        let now = Instant::now();
        self.lease.renew(sent, self.config.session_timeout);
        if self.member.is_none() {
            // This join was answered: the next one is a new join.
            self.join_key = new_join_key();
        }
        self.member = Some(Member {
            id: answer.member_id,
            epoch: answer.member_epoch,
        });
        let interval = match answer.heartbeat_interval_ms {
            0 => self.config.session_timeout / 3,
            ms => Duration::from_millis(ms.into()),
        };
        self.next_heartbeat = now + interval;
        self.reconcile(flatten(answer.assignment)).await;
        self.publish_status();
    }

    /// Moves from the partitions owned to `target`: commits and releases the revoked
    /// ones (then heartbeats at once, so the broker can hand them on), and starts
    /// fetching the new ones.
    async fn reconcile(&mut self, target: Vec<TopicPartition>) {
        let target: BTreeSet<TopicPartition> = target.into_iter().collect();
        // Partitions the application side stopped when the lease ran out before this
        // answer came: start them again from the committed position (their records
        // past it are delivered again).
        self.owned.retain(|_, owned| !owned.assigned.lock().revoked);
        let revoked: Vec<TopicPartition> = self
            .owned
            .keys()
            .filter(|tp| !target.contains(*tp))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            let releasing: Vec<Owned> = revoked
                .iter()
                .filter_map(|tp| self.owned.remove(tp))
                .collect();
            // Stop handing out records first, so the position read for the commit is
            // final; dropping `releasing` then stops the fetch tasks.
            let parts: Vec<Arc<Assigned>> = releasing
                .iter()
                .map(|owned| {
                    owned.assigned.lock().revoked = true;
                    Arc::clone(&owned.assigned)
                })
                .collect();
            drop(releasing);
            self.revoked(Revocation::Revoked, &revoked);
            // A revoked partition still belongs to this member until the next heartbeat,
            // so the commit is accepted. If it fails otherwise, the partition is
            // released anyway: its records are delivered again, never lost.
            if let Err(Error::Fenced { .. }) = self.commit(&parts).await {
                self.fence();
                return;
            }
            self.next_heartbeat = Instant::now();
        }
        let Some(member) = self.member.clone() else {
            return;
        };
        for tp in target {
            if !self.owned.contains_key(&tp) {
                self.start_partition(tp, &member, None);
            }
        }
    }

    /// Starts reading `tp`: from `start`, or where the group's committed position (or
    /// the reset policy) says.
    fn start_partition(
        &mut self,
        tp: TopicPartition,
        member: &Member,
        start: Option<u64>,
    ) -> Arc<Assigned> {
        let assigned = Arc::new(Assigned {
            topic: Arc::from(tp.topic.as_str()),
            partition: tp.partition,
            cursor: Mutex::new(Cursor::default()),
        });
        // Granted at this epoch, the partition may be read with it for as long as the
        // member owns it, whatever later epochs bring.
        let member = v1::GroupMember {
            group: self.group.clone(),
            member_id: member.id.clone(),
            member_epoch: member.epoch,
        };
        let fetcher = Fetcher {
            follower: Follower {
                client: self.broker.clone(),
                topic: Arc::clone(&assigned.topic),
                partition: assigned.partition,
                member: Some(member.clone()),
                fetch_bytes_max: self.config.fetch_bytes_max,
                budget: Arc::clone(&self.budget),
                budget_bytes: self.config.prefetch_bytes_max,
                polling: false,
            },
            groups: self.groups.clone(),
            admin: self.admin.clone(),
            assigned: Arc::clone(&assigned),
            member,
            config: Arc::clone(&self.config),
            answers: self.answers.clone(),
            refused: self.refused_tx.clone(),
            start,
        };
        let task = AbortOnDrop(tokio::spawn(fetcher.run()));
        self.owned.insert(
            tp,
            Owned {
                assigned: Arc::clone(&assigned),
                _fetcher: task,
            },
        );
        assigned
    }

    /// Moves an owned partition's position to `offset`: records buffered from the old
    /// position are dropped, reading starts there, and the position is committed (the
    /// broker keeps the committed one when it is ahead).
    async fn seek(&mut self, tp: TopicPartition, offset: u64) -> Result<()> {
        let Some(member) = self.member.clone() else {
            return Err(Error::Fenced {
                group: self.group.clone(),
                message: "the consumer is rejoining its group; seek again once it owns the \
                          partition"
                    .into(),
            });
        };
        if !self.owned.contains_key(&tp) {
            return Err(Error::PartitionRevoked {
                topic: tp.topic,
                partition: tp.partition,
            });
        }
        let earliest = self
            .admin
            .list_offsets(&tp.topic, tp.partition, OffsetSpec::Earliest)
            .await?;
        let latest = self
            .admin
            .list_offsets(&tp.topic, tp.partition, OffsetSpec::Latest)
            .await?;
        if !(earliest..=latest).contains(&offset) {
            return Err(Error::InvalidArgument {
                message: format!(
                    "cannot seek {tp} to offset {offset}: it holds offsets {earliest} to \
                     {latest}"
                ),
            });
        }
        // The ownership may have changed during those calls.
        let Some(old) = self.owned.remove(&tp) else {
            return Err(Error::PartitionRevoked {
                topic: tp.topic,
                partition: tp.partition,
            });
        };
        old.assigned.lock().revoked = true;
        drop(old);
        let assigned = self.start_partition(tp, &member, Some(offset));
        {
            let mut cursor = assigned.lock();
            cursor.delivered = Some(offset);
            cursor.acked = Some(offset);
        }
        let result = self.commit(&[assigned]).await;
        if let Err(Error::Fenced { .. }) = result {
            self.fence();
        }
        result
    }

    /// The group no longer knows this member (or it lost its session): drop every
    /// partition without committing (another member may own them now) and rejoin.
    fn fence(&mut self) {
        for owned in self.owned.values() {
            owned.assigned.lock().revoked = true;
        }
        let lost: Vec<TopicPartition> = self.owned.keys().cloned().collect();
        self.revoked(Revocation::Lost, &lost);
        self.owned.clear();
        self.member = None;
        self.next_heartbeat = Instant::now();
        self.publish_status();
    }

    /// Tells the application's hook, if any, that `partitions` were taken.
    fn revoked(&self, why: Revocation, partitions: &[TopicPartition]) {
        if let (Some(hook), false) = (&self.config.on_revoke, partitions.is_empty()) {
            (hook.0)(why, partitions);
        }
    }

    fn publish_status(&self) {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        status.member_id = self.member.as_ref().map(|m| m.id.clone());
        status.assignment = self.owned.keys().cloned().collect();
    }

    fn owned_parts(&self) -> Vec<Arc<Assigned>> {
        self.owned
            .values()
            .map(|owned| Arc::clone(&owned.assigned))
            .collect()
    }

    /// Commits the positions of `parts` that are ahead of what the group has.
    async fn commit(&mut self, parts: &[Arc<Assigned>]) -> Result<()> {
        let Some(member) = &self.member else {
            return Err(Error::Fenced {
                group: self.group.clone(),
                message: "the consumer is rejoining its group; records it received \
                          before will be delivered again"
                    .into(),
            });
        };
        let offsets: Vec<v1::PartitionOffset> = parts
            .iter()
            .filter_map(|part| {
                let offset = part.lock().pending(self.auto_commit)?;
                Some(v1::PartitionOffset {
                    topic: part.topic.to_string(),
                    partition: part.partition,
                    offset,
                    ..v1::PartitionOffset::default()
                })
            })
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        let mut request = tonic::Request::new(v1::CommitOffsetsRequest {
            group: self.group.clone(),
            member_id: member.id.clone(),
            member_epoch: member.epoch,
            offsets,
        });
        request.set_timeout(self.config.rpc_timeout());
        let answer = match self.groups.commit_offsets(request).await {
            Ok(answer) => answer,
            Err(status) => {
                // A status the transport made carries its cause as a source.
                self.commit_refused = std::error::Error::source(&status).is_none();
                return Err(Error::from_member_status(status, &self.group, "", None));
            }
        };
        for done in answer.into_inner().offsets {
            let part = parts
                .iter()
                .find(|p| p.partition == done.partition && *p.topic == *done.topic);
            if let Some(part) = part {
                let mut cursor = part.lock();
                cursor.committed = cursor.committed.max(Some(done.offset));
            }
        }
        Ok(())
    }

    async fn auto_commit(&mut self) {
        if let Some(interval) = self.config.auto_commit_interval {
            self.next_auto_commit = Some(Instant::now() + interval);
        }
        if self.member.is_none() {
            return;
        }
        let parts = self.owned_parts();
        // A failure is retried at the next tick (or the next revoke or close). One the
        // broker keeps answering (its committed-offsets log failed, say) is not
        // swallowed: the stream reports it once per run, and it is logged.
        match self.commit(&parts).await {
            Ok(()) => self.auto_commit_refusals = 0,
            Err(Error::Fenced { .. }) => self.fence(),
            Err(e) => {
                if !self.commit_refused {
                    return;
                }
                self.auto_commit_refusals += 1;
                if self.auto_commit_refusals == AUTO_COMMIT_FAILURES_REPORTED {
                    tracing::warn!(group = %self.group, error = %e, "auto-commit keeps failing");
                    let _ = self.answers.send(Answer::Error(e));
                }
            }
        }
    }

    async fn commit_requested(&mut self, record: Option<(TopicPartition, u64)>) -> Result<()> {
        match record {
            None => {
                for owned in self.owned.values() {
                    let mut cursor = owned.assigned.lock();
                    cursor.acked = cursor.acked.max(cursor.delivered);
                }
            }
            Some((tp, offset)) => {
                let Some(owned) = self.owned.get(&tp) else {
                    return Err(Error::PartitionRevoked {
                        topic: tp.topic,
                        partition: tp.partition,
                    });
                };
                let mut cursor = owned.assigned.lock();
                let next = offset.saturating_add(1);
                if cursor.delivered.is_none_or(|delivered| next > delivered) {
                    return Err(Error::InvalidArgument {
                        message: format!(
                            "offset {offset} of {tp} was not handed out by this consumer; \
                             only records it delivered can be committed"
                        ),
                    });
                }
                cursor.acked = cursor.acked.max(Some(next));
            }
        }
        let parts = self.owned_parts();
        let result = self.commit(&parts).await;
        if let Err(Error::Fenced { .. }) = result {
            self.fence();
        }
        result
    }

    /// Stops fetching, commits and leaves.
    async fn close(&mut self) -> Result<()> {
        let Some(member) = self.member.clone() else {
            return Ok(());
        };
        let parts = self.owned_parts();
        for part in &parts {
            let mut cursor = part.lock();
            cursor.revoked = true;
            // The application is done with everything it was handed.
            cursor.in_hand = false;
        }
        let released: Vec<TopicPartition> = self.owned.keys().cloned().collect();
        self.revoked(Revocation::Revoked, &released);
        self.owned.clear();
        let committed = self.commit(&parts).await;
        let mut request = tonic::Request::new(v1::LeaveGroupRequest {
            group: self.group.clone(),
            member_id: member.id,
        });
        request.set_timeout(self.config.rpc_timeout());
        let left = match self.groups.leave_group(request).await {
            Ok(_) => Ok(()),
            Err(s) => match Error::from_member_status(s, &self.group, "", None) {
                // Already out of the group: nothing to leave.
                Error::Fenced { .. } => Ok(()),
                e => Err(e),
            },
        };
        self.member = None;
        self.publish_status();
        committed.and(left)
    }
}

/// The protocol's per-topic partition lists.
fn owned_lists<'a>(
    partitions: impl Iterator<Item = &'a TopicPartition>,
) -> Vec<v1::TopicPartitions> {
    let mut lists: Vec<v1::TopicPartitions> = Vec::new();
    for tp in partitions {
        match lists.last_mut() {
            Some(list) if list.topic == tp.topic => list.partitions.push(tp.partition),
            _ => lists.push(v1::TopicPartitions {
                topic: tp.topic.clone(),
                partitions: vec![tp.partition],
            }),
        }
    }
    lists
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX.into()) as u32
}

/// The task that reads one owned partition.
struct Fetcher {
    follower: Follower,
    groups: GroupsClient<Channel>,
    admin: Admin,
    assigned: Arc<Assigned>,
    member: v1::GroupMember,
    config: Arc<ConsumerGroupConfig>,
    answers: mpsc::UnboundedSender<Answer>,
    refused: mpsc::UnboundedSender<()>,
    /// Where to start instead of the committed position (a seek).
    start: Option<u64>,
}

impl Fetcher {
    /// Runs until aborted (the partition was revoked) or the consumer is gone.
    async fn run(mut self) {
        let mut failures = 0;
        let mut offset = loop {
            if let Some(start) = self.start {
                break start;
            }
            match self.start_offset().await {
                Ok(offset) => break offset,
                Err(e) => self.failed(e, &mut failures).await,
            }
        };
        {
            let mut cursor = self.assigned.lock();
            cursor.delivered = Some(offset);
            cursor.acked = Some(offset);
        }
        failures = 0;
        let mut hand_on = |records: Vec<ConsumedRecord>, budget| {
            let fetched = Fetched {
                assigned: Arc::clone(&self.assigned),
                records: records.into_iter(),
                holding: false,
                _budget: budget,
            };
            self.answers.send(Answer::Records(fetched)).is_ok()
        };
        loop {
            let error = match self
                .follower
                .read(&mut offset, &mut failures, &mut hand_on)
                .await
            {
                Ok(()) => return,
                Err(e) => e,
            };
            match error {
                // Retention deleted the records at the position (or the position lies
                // past the end): start again where the reset policy says.
                Error::OffsetOutOfRange { .. } => match self
                    .reset_offset("retention deleted the records at its position")
                    .await
                {
                    Ok(reset) => offset = reset,
                    Err(e) => self.failed(e, &mut failures).await,
                },
                e => self.failed(e, &mut failures).await,
            }
        }
    }

    /// Handles a failed call, then waits before the retry.
    async fn failed(&self, e: Error, failures: &mut u32) {
        match e {
            // The broker restarts or is busy: retry.
            e if follow::retriable(&e) => {}
            // The broker no longer counts this member as the owner, or the topic is
            // gone: the assignment has changed, and the coordinator learns how.
            Error::Fenced { .. } | Error::TopicNotFound { .. } => {
                let _ = self.refused.send(());
            }
            // Anything else is unexpected: tell the application once per run of
            // failures, and keep trying.
            e => {
                if *failures == 0 {
                    let _ = self.answers.send(Answer::Error(e));
                }
            }
        }
        let delay = crate::backoff(
            self.config.retry_backoff_min,
            self.config.retry_backoff_max,
            *failures,
        );
        *failures += 1;
        tokio::time::sleep(delay).await;
    }

    /// The group's committed position, or the reset policy's offset without one.
    async fn start_offset(&mut self) -> Result<u64> {
        let mut request = tonic::Request::new(v1::FetchOffsetsRequest {
            group: self.member.group.clone(),
            partitions: vec![v1::TopicPartitions {
                topic: self.assigned.topic.to_string(),
                partitions: vec![self.assigned.partition],
            }],
        });
        request.set_timeout(self.config.rpc_timeout());
        let answer = self
            .groups
            .fetch_offsets(request)
            .await
            .map_err(|s| {
                Error::from_member_status(s, &self.member.group, &self.assigned.topic, None)
            })?
            .into_inner();
        let committed = answer
            .offsets
            .iter()
            .find(|o| o.partition == self.assigned.partition && *o.topic == *self.assigned.topic);
        if let Some(committed) = committed {
            self.assigned.lock().committed = Some(committed.offset);
            return Ok(committed.offset);
        }
        self.reset_offset("the group has no committed offset there")
            .await
    }

    /// Where the reset policy says to start; `why` there is no position to go on from.
    async fn reset_offset(&self, why: &str) -> Result<u64> {
        let spec = match self.config.auto_offset_reset {
            OffsetReset::Earliest => OffsetSpec::Earliest,
            OffsetReset::Latest => OffsetSpec::Latest,
            OffsetReset::None => {
                return Err(Error::NoPosition {
                    group: self.member.group.clone(),
                    topic: self.assigned.topic.to_string(),
                    partition: self.assigned.partition,
                    message: format!(
                        "{why}, and the consumer's reset policy is OffsetReset::None: commit \
                         or reset one (Admin::reset_offsets, `strata groups reset`) while \
                         the group has no members"
                    ),
                })
            }
        };
        self.admin
            .list_offsets(&self.assigned.topic, self.assigned.partition, spec)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(delivered: u64, in_hand: bool, acked: Option<u64>) -> Cursor {
        Cursor {
            delivered: Some(delivered),
            in_hand,
            acked,
            ..Cursor::default()
        }
    }

    #[test]
    fn committable_positions() {
        // (cursor, auto-commit, committable)
        let check = |c: Cursor, auto: bool, expected: Option<u64>| {
            assert_eq!(c.committable(auto), expected, "{c:?} auto={auto}");
        };
        // Before the start is known nothing can be committed.
        check(Cursor::default(), true, None);
        // The record in the application's hands is not committed by auto-commit.
        check(cursor(10, true, Some(0)), true, Some(9));
        check(cursor(10, false, Some(0)), true, Some(10));
        // An explicit commit counts even while the record is held.
        check(cursor(10, true, Some(10)), true, Some(10));
        // Without auto-commit only explicit commits count.
        check(cursor(10, false, Some(4)), false, Some(4));
        check(cursor(10, false, None), false, None);
    }

    #[test]
    fn pending_only_when_ahead_of_the_group() {
        let mut c = cursor(10, false, Some(3));
        assert_eq!(c.pending(true), Some(10));
        c.committed = Some(10);
        assert_eq!(c.pending(true), None);
        c.committed = Some(12);
        assert_eq!(c.pending(true), None);
        // A start position without a committed one is committed, so a later owner
        // starts there too.
        let fresh = cursor(5, false, Some(5));
        assert_eq!(fresh.pending(false), Some(5));
    }

    fn assigned(partition: u32, start: u64) -> Arc<Assigned> {
        Arc::new(Assigned {
            topic: Arc::from("t"),
            partition,
            cursor: Mutex::new(Cursor {
                delivered: Some(start),
                acked: Some(start),
                ..Cursor::default()
            }),
        })
    }

    fn fetched(
        part: &Arc<Assigned>,
        offsets: std::ops::Range<u64>,
        budget: &Arc<Semaphore>,
    ) -> Answer {
        let records = offsets
            .map(|offset| ConsumedRecord {
                topic: Arc::clone(&part.topic),
                partition: part.partition,
                offset,
                timestamp_ms: 0,
                key: None,
                value: None,
                headers: Vec::new(),
            })
            .collect::<Vec<_>>();
        Answer::Records(Fetched {
            assigned: Arc::clone(part),
            records: records.into_iter(),
            holding: false,
            _budget: Arc::clone(budget).try_acquire_owned().expect("budget left"),
        })
    }

    /// The application side alone, fed by hand instead of fetch tasks.
    fn consumer() -> (Consumer, mpsc::UnboundedSender<Answer>) {
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let (commands, _) = mpsc::channel(1);
        let lease = Arc::new(Lease::new());
        lease.renew(Instant::now(), Duration::from_secs(3600));
        let consumer = Consumer {
            answers,
            current: None,
            commands,
            status: Arc::default(),
            lease,
            group: "g".into(),
            _coordinator: AbortOnDrop(tokio::spawn(async {})),
        };
        (consumer, answers_tx)
    }

    fn offsets_now(consumer: &mut Consumer) -> Vec<(u32, u64)> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut out = Vec::new();
        while let Poll::Ready(Some(item)) = Pin::new(&mut *consumer).poll_next(&mut cx) {
            let record = item.expect("a record");
            out.push((record.partition, record.offset));
        }
        out
    }

    #[tokio::test]
    async fn records_of_a_revoked_partition_are_never_handed_out() {
        let (mut consumer, answers) = consumer();
        let budget = Arc::new(Semaphore::new(10));
        let (p0, p1) = (assigned(0, 0), assigned(1, 5));
        answers.send(fetched(&p0, 0..3, &budget)).expect("open");
        answers.send(fetched(&p1, 5..7, &budget)).expect("open");
        answers.send(fetched(&p0, 3..5, &budget)).expect("open");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let first = Pin::new(&mut consumer).poll_next(&mut cx);
        assert!(matches!(first, Poll::Ready(Some(Ok(ref r))) if r.offset == 0));
        // Partition 0 is taken away with records of it buffered and in the current
        // answer: none of them comes out, partition 1's do.
        p0.lock().revoked = true;
        assert_eq!(offsets_now(&mut consumer), [(1, 5), (1, 6)]);
        // Every buffered answer was used up or discarded: the budget is whole again.
        assert_eq!(budget.available_permits(), 10);
        assert_eq!(p0.lock().delivered, Some(1));
    }

    /// Once the lease from the last answered heartbeat has run out, buffered records
    /// are no longer handed out (they used to be, until a heartbeat failed), and their
    /// partitions count as taken away.
    #[tokio::test]
    async fn nothing_is_handed_out_once_the_lease_ran_out() {
        let (mut consumer, answers) = consumer();
        let budget = Arc::new(Semaphore::new(10));
        let part = assigned(0, 0);
        answers.send(fetched(&part, 0..3, &budget)).expect("open");
        answers.send(fetched(&part, 3..5, &budget)).expect("open");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let first = Pin::new(&mut consumer).poll_next(&mut cx);
        assert!(matches!(first, Poll::Ready(Some(Ok(ref r))) if r.offset == 0));
        consumer.lease.until_micros.store(0, Ordering::Release);
        assert_eq!(offsets_now(&mut consumer), []);
        assert!(part.lock().revoked);
        assert_eq!(budget.available_permits(), 10);
    }

    /// The lease runs from when the heartbeat was sent, not from its answer, and ends a
    /// margin before the session would.
    #[test]
    fn the_lease_runs_from_the_send_time() {
        let lease = Lease::new();
        let sent = lease.base + Duration::from_secs(5);
        lease.renew(sent, Duration::from_secs(10));
        assert_eq!(lease.deadline(), sent + Duration::from_secs(9));
        // An older heartbeat's answer never shortens it.
        lease.renew(lease.base, Duration::from_secs(10));
        assert_eq!(lease.deadline(), sent + Duration::from_secs(9));
    }

    #[tokio::test]
    async fn the_record_in_hand_counts_once_the_next_is_asked_for() {
        let (mut consumer, answers) = consumer();
        let budget = Arc::new(Semaphore::new(10));
        let part = assigned(0, 10);
        answers.send(fetched(&part, 10..12, &budget)).expect("open");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut next = || match Pin::new(&mut consumer).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(record))) => Some(record.offset),
            Poll::Pending => None,
            other => panic!("{other:?}"),
        };
        assert_eq!(next(), Some(10));
        assert_eq!(part.lock().committable(true), Some(10));
        assert_eq!(next(), Some(11));
        assert_eq!(part.lock().committable(true), Some(11));
        // Asking again (nothing buffered) releases record 11.
        assert_eq!(next(), None);
        assert_eq!(part.lock().committable(true), Some(12));
        // Without auto-commit only explicit commits count.
        assert_eq!(part.lock().committable(false), Some(10));
    }

    #[test]
    fn owned_lists_group_by_topic() {
        let tp = |topic: &str, partition| TopicPartition {
            topic: topic.into(),
            partition,
        };
        let owned = [tp("a", 0), tp("a", 2), tp("b", 1)];
        let lists = owned_lists(owned.iter());
        assert_eq!(
            lists,
            vec![
                v1::TopicPartitions {
                    topic: "a".into(),
                    partitions: vec![0, 2]
                },
                v1::TopicPartitions {
                    topic: "b".into(),
                    partitions: vec![1]
                },
            ]
        );
    }

    #[test]
    fn config_validation() {
        let ok = ConsumerGroupConfig::default();
        assert!(ok.validate().is_ok());
        let short = ConsumerGroupConfig {
            session_timeout: Duration::from_millis(500),
            ..ConsumerGroupConfig::default()
        };
        assert!(matches!(
            short.validate(),
            Err(Error::InvalidArgument { .. })
        ));
        let zero = ConsumerGroupConfig {
            auto_commit_interval: Some(Duration::ZERO),
            ..ConsumerGroupConfig::default()
        };
        assert!(matches!(
            zero.validate(),
            Err(Error::InvalidArgument { .. })
        ));
        // Group calls never outlast half a session.
        let config = ConsumerGroupConfig {
            session_timeout: Duration::from_secs(2),
            ..ConsumerGroupConfig::default()
        };
        assert_eq!(config.rpc_timeout(), Duration::from_secs(1));
    }
}
