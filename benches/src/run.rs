//! One run: open the target, start consumers and producers, report progress once a
//! second, wait until the consumers have everything, and assemble the [`Report`].
//!
//! Backends differ only in how a producer hands messages over and how a consumer gets
//! them ([`Backend`]); counting, latency recording, the exactly-once check and the
//! report are shared ([`Acks`], [`Consumption`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::disk;
use crate::error::{Error, Result};
use crate::floor::Floor;
use crate::generator::{GeneratorPlan, SinkClosed, Took};
use crate::machine::Machine;
use crate::options::{Amount, Mode, Options, Plan, TargetKind};
use crate::payload::{read_header, Clock};
use crate::report::{
    format_latency, thousands, ConsumeResult, ProduceResult, Report, Second, SetResult, TargetInfo,
    Throughput,
};
use crate::scale::ScaleResult;
use crate::stats::{
    latency_histogram, LatencyRecorder, Percentiles, Seen, SharedHistogram, Tallies, Tally,
};
use crate::{null, strata};

/// What a run produced: a report, or the note that its target was not there.
#[derive(Debug)]
pub enum Outcome {
    /// The run happened.
    Report(Box<Report>),
    /// A peer broker was not reachable; nothing ran. Not an error: comparisons must not
    /// fail where a peer is absent.
    Skipped {
        /// The target.
        target: TargetKind,
        /// Why.
        reason: String,
    },
}

/// Runs the benchmark the options describe.
pub async fn run(options: &Options) -> Result<Outcome> {
    let plan = Plan::from_options(options)?;
    let mut machine = Machine::now();
    let parent = match &options.data_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&parent).map_err(Error::io(format!(
        "create the data directory {}",
        parent.display()
    )))?;
    let disk = if plan.disk_baseline_bytes > 0 {
        if !options.quiet {
            eprintln!(
                "strata-bench: disk baseline, {} MiB in {}",
                plan.disk_baseline_bytes >> 20,
                parent.display()
            );
        }
        let full = plan.mode == Mode::DiskOnly;
        Some(disk::measure(&parent, plan.disk_baseline_bytes, full)?)
    } else {
        None
    };
    if plan.mode == Mode::DiskOnly {
        machine.finish();
        return Ok(Outcome::Report(Box::new(Report::new(
            plan,
            TargetInfo::disk_only(),
            machine,
            disk,
            Measured::default(),
        ))));
    }

    let clock = Clock::start();
    let (stop, stopped) = watch::channel(false);
    let shared = Arc::new(Shared {
        clock,
        meters: Meters::new(plan.consumer_sets),
        plan: plan.clone(),
        stopped,
    });
    let backend = match Backend::open(&plan, options, &parent).await {
        Ok(backend) => backend,
        Err(Error::Unreachable {
            backend,
            address,
            message,
        }) => {
            return Ok(Outcome::Skipped {
                target: plan.target,
                reason: format!("{backend} not reachable at {address}: {message}"),
            })
        }
        Err(e) => return Err(e),
    };
    if !options.quiet {
        eprintln!(
            "strata-bench: {} against {}: {}",
            plan.workload,
            backend.info().describe(),
            plan.shape()
        );
    }
    let scale = match (&backend, plan.idle_s) {
        (Backend::Strata(target), Some(idle)) => {
            match target
                .scale(&plan, Duration::from_secs_f64(idle), options.quiet)
                .await
            {
                Ok(scale) => Some(scale),
                Err(e) => {
                    backend.close().await;
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    if plan.floor_calls > 0 && !options.quiet {
        eprintln!(
            "strata-bench: transport floor, {} calls",
            thousands(f64::from(plan.floor_calls))
        );
    }
    let floor = match backend.floor(plan.floor_calls).await {
        Ok(floor) => floor,
        Err(e) => {
            backend.close().await;
            return Err(e);
        }
    };
    let measured = drive(&backend, &shared, stop, options.quiet)
        .await
        .map(|measured| Measured {
            scale,
            floor,
            ..measured
        });
    let info = backend.info();
    backend.close().await;
    let measured = measured?;
    machine.finish();
    Ok(Outcome::Report(Box::new(Report::new(
        plan, info, machine, disk, measured,
    ))))
}

/// What every task of a run shares.
pub(crate) struct Shared {
    pub clock: Clock,
    pub plan: Plan,
    pub meters: Meters,
    /// Turns true when consumers should stop.
    pub stopped: watch::Receiver<bool>,
}

impl Shared {
    /// Resolves when the run tells consumers to stop.
    pub async fn stop_signal(&self) {
        let mut stopped = self.stopped.clone();
        // An error means the run is gone, which also means stop.
        let _ = stopped.wait_for(|s| *s).await;
    }
}

/// Counters and latency histograms the reporter reads.
pub(crate) struct Meters {
    pub sent: Tallies,
    pub acked: Tallies,
    /// Distinct messages received, per consumer set.
    pub consumed: Vec<Tallies>,
    pub ack_latency: SharedHistogram,
    pub e2e_latency: SharedHistogram,
}

impl Meters {
    fn new(sets: u32) -> Meters {
        Meters {
            sent: Tallies::default(),
            acked: Tallies::default(),
            consumed: (0..sets).map(|_| Tallies::default()).collect(),
            ack_latency: SharedHistogram::default(),
            e2e_latency: SharedHistogram::default(),
        }
    }

    fn consumed(&self) -> u64 {
        self.consumed.iter().map(Tallies::sum).sum()
    }
}

/// The acknowledgement side of one producer: counts and publish → ack latency.
pub(crate) struct Acks {
    stamp: Stamp,
    recorder: LatencyRecorder,
    tally: Arc<Tally>,
    acked: u64,
    failed: u64,
    first_error: Option<String>,
    last_ns: u64,
}

/// What a producer's acknowledgements came to.
#[derive(Debug, Default)]
pub(crate) struct AckOutcome {
    pub acked: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Clock reading of the last acknowledgement.
    pub last_ns: u64,
}

impl Acks {
    pub fn new(shared: &Shared) -> Acks {
        Acks {
            stamp: Stamp::new(shared.clock),
            recorder: LatencyRecorder::new(shared.meters.ack_latency.clone()),
            tally: shared.meters.acked.register(),
            acked: 0,
            failed: 0,
            first_error: None,
            last_ns: 0,
        }
    }

    /// A message sent at `sent_ns` was acknowledged now; `waited` says whether the
    /// acknowledgement had to be waited for (else it was ready when looked at).
    #[inline]
    pub fn ok(&mut self, sent_ns: u64, waited: bool) {
        let now_ns = self.stamp.now_ns(waited);
        self.ok_at(sent_ns, now_ns);
    }

    /// A message sent at `sent_ns` was acknowledged at `now_ns`.
    #[inline]
    pub fn ok_at(&mut self, sent_ns: u64, now_ns: u64) {
        self.recorder.record(sent_ns, now_ns);
        self.acked += 1;
        self.tally.set(self.acked);
        self.last_ns = now_ns;
    }

    /// `messages` failed to be acknowledged.
    pub fn failed(&mut self, messages: u64, error: impl std::fmt::Display) {
        self.failed += messages;
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }

    pub fn finish(mut self) -> AckOutcome {
        self.recorder.flush();
        AckOutcome {
            acked: self.acked,
            failed: self.failed,
            first_error: self.first_error.take(),
            last_ns: self.last_ns,
        }
    }
}

/// What one producer did.
#[derive(Debug, Default)]
pub(crate) struct ProducerOutcome {
    pub sent: u64,
    pub acks: AckOutcome,
}

/// The receiving side of one consumer: end-to-end latency, counts, and which ids it saw.
pub(crate) struct Consumption {
    stamp: Stamp,
    set: u32,
    producers: u32,
    /// `None` in replay runs, where the time since sending is not a latency.
    e2e: Option<LatencyRecorder>,
    seen: Seen,
    tally: Arc<Tally>,
    received: u64,
    malformed: u64,
    last_ns: u64,
}

/// What one consumer received.
#[derive(Debug)]
pub(crate) struct ConsumerOutcome {
    pub set: u32,
    pub seen: Seen,
    pub received: u64,
    pub malformed: u64,
    /// Clock reading of the last receipt.
    pub last_ns: u64,
    pub error: Option<String>,
}

impl Consumption {
    pub fn new(shared: &Shared, set: u32) -> Consumption {
        let e2e = (shared.plan.mode == Mode::Live)
            .then(|| LatencyRecorder::new(shared.meters.e2e_latency.clone()));
        Consumption {
            stamp: Stamp::new(shared.clock),
            set,
            producers: shared.plan.producers,
            e2e,
            seen: Seen::default(),
            tally: shared.meters.consumed[set as usize].register(),
            received: 0,
            malformed: 0,
            last_ns: 0,
        }
    }

    /// A message arrived now; `waited` says whether the consumer had to wait for it
    /// (else it was ready when asked for, having arrived with earlier ones).
    #[inline]
    pub fn message(&mut self, value: &[u8], waited: bool) {
        let now_ns = self.stamp.now_ns(waited);
        self.received += 1;
        self.last_ns = now_ns;
        let Some((sent_ns, producer, sequence)) = read_header(value) else {
            self.malformed += 1;
            return;
        };
        if !self.seen.mark(producer, sequence, self.producers) {
            self.malformed += 1;
            return;
        }
        if let Some(e2e) = &mut self.e2e {
            e2e.record(sent_ns, now_ns);
        }
        self.tally.set(self.seen.unique());
    }

    pub fn finish(mut self, error: Option<String>) -> ConsumerOutcome {
        if let Some(e2e) = &mut self.e2e {
            e2e.flush();
        }
        ConsumerOutcome {
            set: self.set,
            seen: std::mem::take(&mut self.seen),
            received: self.received,
            malformed: self.malformed,
            last_ns: self.last_ns,
            error,
        }
    }
}

/// Clock readings for events that come in bursts (the records of one fetch answer, the
/// acknowledgements of one batch). An event that had to be waited for reads the clock;
/// one that was ready at once reuses the last reading, up to [`STAMP_REUSE_MAX`] times
/// in a row, so a burst costs few clock reads and its stamps are late by at most the
/// time to process that many events (microseconds).
pub(crate) struct Stamp {
    clock: Clock,
    now_ns: u64,
    reuses_left: u32,
}

/// Events that may share one clock reading.
const STAMP_REUSE_MAX: u32 = 32;

impl Stamp {
    pub fn new(clock: Clock) -> Stamp {
        Stamp {
            clock,
            now_ns: 0,
            reuses_left: 0,
        }
    }

    /// The time of an event; `waited` says whether it had to be waited for.
    #[inline]
    pub fn now_ns(&mut self, waited: bool) -> u64 {
        if waited || self.reuses_left == 0 {
            self.now_ns = self.clock.now_ns();
            self.reuses_left = STAMP_REUSE_MAX;
        } else {
            self.reuses_left -= 1;
        }
        self.now_ns
    }
}

/// Awaits `future`; its output and whether it had to be waited for (was not ready on
/// the first poll).
pub(crate) async fn ready_or_wait<F: Future>(future: F) -> (F::Output, bool) {
    let mut future = std::pin::pin!(future);
    let mut waited = false;
    let output = std::future::poll_fn(|cx| {
        let poll = future.as_mut().poll(cx);
        waited |= poll.is_pending();
        poll
    })
    .await;
    (output, waited)
}

/// Moves items from a generator thread to an async task in chunks, so the channel costs
/// one operation per chunk rather than one per message. The channel's capacity in
/// chunks bounds what is in transit.
pub(crate) struct ChunkSender<T> {
    tx: mpsc::Sender<Vec<T>>,
    chunk: Vec<T>,
    chunk_len: usize,
}

/// Items per chunk.
pub(crate) const CHUNK_LEN: usize = 512;

impl<T> ChunkSender<T> {
    /// A sender of chunks of at most `chunk_len` items, and the receiving end, which
    /// holds at most `capacity_items` items (rounded up to whole chunks).
    pub fn channel(capacity_items: usize) -> (ChunkSender<T>, mpsc::Receiver<Vec<T>>) {
        let chunk_len = CHUNK_LEN.min(capacity_items.max(1));
        let (tx, rx) = mpsc::channel(capacity_items.div_ceil(chunk_len).max(1));
        let sender = ChunkSender {
            tx,
            chunk: Vec::with_capacity(chunk_len),
            chunk_len,
        };
        (sender, rx)
    }

    /// Adds an item; sends the chunk when full, waiting for room.
    #[inline]
    pub fn push(&mut self, item: T) -> Result<Took, SinkClosed> {
        self.chunk.push(item);
        if self.chunk.len() >= self.chunk_len {
            self.flush()
        } else {
            Ok(Took::AtOnce)
        }
    }

    /// Sends what the chunk holds, waiting for room. Call from a thread outside the
    /// runtime (a generator's).
    pub fn flush(&mut self) -> Result<Took, SinkClosed> {
        if self.chunk.is_empty() {
            return Ok(Took::AtOnce);
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(self.chunk_len));
        self.tx.blocking_send(chunk).map_err(|_| SinkClosed)?;
        Ok(Took::MayHaveWaited)
    }
}

/// The targets, behind one interface.
enum Backend {
    Strata(Box<strata::StrataTarget>),
    Null(null::NullTarget),
    #[cfg(feature = "nats")]
    Nats(crate::nats::NatsTarget),
    #[cfg(feature = "redis")]
    Redis(Box<crate::redis::RedisTarget>),
}

impl Backend {
    async fn open(plan: &Plan, options: &Options, parent: &std::path::Path) -> Result<Backend> {
        match plan.target {
            TargetKind::Strata => Ok(Backend::Strata(Box::new(
                strata::StrataTarget::open(plan, options, parent).await?,
            ))),
            TargetKind::Null => Ok(Backend::Null(null::NullTarget::new(plan))),
            #[cfg(feature = "nats")]
            TargetKind::Nats => Ok(Backend::Nats(
                crate::nats::NatsTarget::open(plan, &options.nats).await?,
            )),
            #[cfg(not(feature = "nats"))]
            TargetKind::Nats => Err(Error::NotBuilt("nats")),
            #[cfg(feature = "redis")]
            TargetKind::Redis => Ok(Backend::Redis(Box::new(
                crate::redis::RedisTarget::open(plan, &options.redis).await?,
            ))),
            #[cfg(not(feature = "redis"))]
            TargetKind::Redis => Err(Error::NotBuilt("redis")),
        }
    }

    fn info(&self) -> TargetInfo {
        match self {
            Backend::Strata(t) => t.info(),
            Backend::Null(t) => t.info(),
            #[cfg(feature = "nats")]
            Backend::Nats(t) => t.info(),
            #[cfg(feature = "redis")]
            Backend::Redis(t) => t.info(),
        }
    }

    async fn start_consumer(
        &self,
        shared: &Arc<Shared>,
        set: u32,
        partitions: Vec<u32>,
    ) -> Result<JoinHandle<ConsumerOutcome>> {
        match self {
            Backend::Strata(t) => t.start_consumer(shared, set, partitions).await,
            Backend::Null(t) => Ok(t.start_consumer(shared, set, partitions)),
            #[cfg(feature = "nats")]
            Backend::Nats(t) => t.start_consumer(shared, set, partitions).await,
            #[cfg(feature = "redis")]
            Backend::Redis(t) => t.start_consumer(shared, set, partitions).await,
        }
    }

    /// Waits until consumers that coordinate (Strata consumer groups) are ready.
    async fn settle(&self, plan: &Plan) -> Result<()> {
        match self {
            Backend::Strata(t) => t.settle(plan).await,
            _ => Ok(()),
        }
    }

    async fn start_producer(
        &self,
        shared: &Arc<Shared>,
        plan: GeneratorPlan,
    ) -> Result<JoinHandle<ProducerOutcome>> {
        match self {
            Backend::Strata(t) => t.start_producer(shared, plan).await,
            Backend::Null(t) => Ok(t.start_producer(shared, plan)),
            #[cfg(feature = "nats")]
            Backend::Nats(t) => t.start_producer(shared, plan).await,
            #[cfg(feature = "redis")]
            Backend::Redis(t) => t.start_producer(shared, plan).await,
        }
    }

    /// The transport floor: `calls` round trips of the target's cheapest call (none
    /// for the null target, nor for NATS, whose client has no lone round trip to time).
    async fn floor(&self, calls: u32) -> Result<Option<Floor>> {
        match self {
            Backend::Strata(t) => t.floor(calls).await,
            Backend::Null(_) => Ok(None),
            #[cfg(feature = "nats")]
            Backend::Nats(_) => Ok(None),
            #[cfg(feature = "redis")]
            Backend::Redis(t) => t.floor(calls).await,
        }
    }

    async fn close(self) {
        match self {
            Backend::Strata(t) => t.close().await,
            Backend::Null(_) => {}
            #[cfg(feature = "nats")]
            Backend::Nats(t) => t.close().await,
            #[cfg(feature = "redis")]
            Backend::Redis(t) => t.close().await,
        }
    }
}

/// What a run measured, before it is turned into a [`Report`].
#[derive(Debug, Default)]
pub(crate) struct Measured {
    pub produced: Option<ProduceResult>,
    pub consumed: Option<ConsumeResult>,
    pub ack_latency: Option<Percentiles>,
    pub e2e_latency: Option<Percentiles>,
    pub per_second: Vec<Second>,
    pub scale: Option<ScaleResult>,
    pub floor: Option<Floor>,
}

/// How long producers get to start before the first intended send time.
const START_LEAD_NS: u64 = 2_000_000;
/// How often the run checks whether the consumers have everything.
const DRAIN_POLL: Duration = Duration::from_millis(10);

async fn drive(
    backend: &Backend,
    shared: &Arc<Shared>,
    stop: watch::Sender<bool>,
    quiet: bool,
) -> Result<Measured> {
    let plan = &shared.plan;
    let clock = shared.clock;
    let mut consumers = Vec::new();
    if plan.mode == Mode::Live {
        start_consumers(backend, shared, &mut consumers).await?;
        backend.settle(plan).await?;
    }
    let reporter = Reporter::start(Arc::clone(shared), quiet);

    let start_ns = clock.now_ns() + START_LEAD_NS;
    let mut producers = Vec::new();
    for producer in 0..plan.producers {
        let generator = generator_plan(plan, producer, start_ns);
        producers.push(backend.start_producer(shared, generator).await?);
    }
    let mut outcomes = Vec::new();
    for producer in producers {
        outcomes.push(producer.await.unwrap_or_else(|e| ProducerOutcome {
            acks: AckOutcome {
                first_error: Some(format!("the producer task failed: {e}")),
                ..AckOutcome::default()
            },
            ..ProducerOutcome::default()
        }));
    }
    let sent: u64 = outcomes.iter().map(|o| o.sent).sum();
    let acked: u64 = outcomes.iter().map(|o| o.acks.acked).sum();
    let failed: u64 = outcomes.iter().map(|o| o.acks.failed).sum();
    let last_ack_ns = outcomes.iter().map(|o| o.acks.last_ns).max().unwrap_or(0);
    let produce_seconds = seconds(last_ack_ns.saturating_sub(start_ns));
    let produced = ProduceResult {
        sent,
        acked,
        failed,
        first_error: outcomes.iter().find_map(|o| o.acks.first_error.clone()),
        throughput: Throughput::new(acked, produce_seconds, plan.message_bytes),
    };

    let consume_start_ns = if plan.mode == Mode::Replay {
        let now = clock.now_ns();
        start_consumers(backend, shared, &mut consumers).await?;
        backend.settle(plan).await?;
        now
    } else {
        start_ns
    };
    if !consumers.is_empty() {
        wait_for_consumers(shared, acked, quiet).await;
    }
    let _ = stop.send(true);
    let mut sets: Vec<(Seen, SetResult)> = (0..plan.consumer_sets)
        .map(|set| {
            (
                Seen::default(),
                SetResult {
                    set,
                    ..SetResult::default()
                },
            )
        })
        .collect();
    let mut last_receipt_ns = 0;
    for consumer in consumers {
        let outcome = match consumer.await {
            Ok(outcome) => outcome,
            Err(e) => return Err(Error::Task(format!("consumer: {e}"))),
        };
        last_receipt_ns = last_receipt_ns.max(outcome.last_ns);
        let (seen, result) = &mut sets[outcome.set as usize];
        seen.merge(&outcome.seen);
        result.received += outcome.received;
        result.malformed += outcome.malformed;
        if result.error.is_none() {
            result.error = outcome.error;
        }
    }
    let consume_seconds = seconds(last_receipt_ns.saturating_sub(consume_start_ns));
    let consumed = (plan.consumer_sets > 0).then(|| {
        let sets: Vec<SetResult> = sets
            .into_iter()
            .map(|(seen, mut r)| {
                r.unique = seen.unique();
                r.duplicates = seen.duplicates();
                r.missing = acked.saturating_sub(seen.unique());
                r
            })
            .collect();
        let received = sets.iter().map(|s| s.received).sum();
        ConsumeResult {
            sets,
            throughput: Throughput::new(received, consume_seconds, plan.message_bytes),
        }
    });

    let (per_second, ack_total, e2e_total) = reporter.finish().await;
    Ok(Measured {
        produced: Some(produced),
        consumed,
        ack_latency: Percentiles::of(&ack_total),
        e2e_latency: Percentiles::of(&e2e_total),
        per_second,
        scale: None,
        floor: None,
    })
}

async fn start_consumers(
    backend: &Backend,
    shared: &Arc<Shared>,
    into: &mut Vec<JoinHandle<ConsumerOutcome>>,
) -> Result<()> {
    let plan = &shared.plan;
    for set in 0..plan.consumer_sets {
        for consumer in 0..plan.consumers {
            let partitions = plan.partitions_of(consumer);
            into.push(backend.start_consumer(shared, set, partitions).await?);
        }
    }
    Ok(())
}

/// Waits until every consumer set has `expected` distinct messages, or until the
/// consumers made no progress for the drain timeout.
async fn wait_for_consumers(shared: &Shared, expected: u64, quiet: bool) {
    let timeout = shared.plan.drain_timeout;
    let mut last = shared.meters.consumed();
    let mut progressed = tokio::time::Instant::now();
    loop {
        let done = shared
            .meters
            .consumed
            .iter()
            .all(|set| set.sum() >= expected);
        if done {
            return;
        }
        let now = shared.meters.consumed();
        if now != last {
            last = now;
            progressed = tokio::time::Instant::now();
        } else if progressed.elapsed() >= timeout {
            if !quiet {
                eprintln!(
                    "strata-bench: consumers made no progress for {} s; stopping them",
                    timeout.as_secs()
                );
            }
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

fn generator_plan(plan: &Plan, producer: u32, start_ns: u64) -> GeneratorPlan {
    let producers = u64::from(plan.producers);
    let share = |total: u64| total / producers + u64::from(u64::from(producer) < total % producers);
    let rate = plan.rate.map(|r| r / producers as f64);
    let (messages, deadline_ns) = match (plan.amount, rate) {
        (Amount::Messages(n), _) => (Some(share(n)), None),
        // A fixed rate for a time is a count: every intended message goes out, late or not.
        (Amount::Seconds(s), Some(_)) => {
            let total = plan.rate.map_or(0.0, |r| r * s).round() as u64;
            (Some(share(total)), None)
        }
        (Amount::Seconds(s), None) => (None, Some(start_ns + (s * 1e9) as u64)),
    };
    // Producers of a fixed-rate run take turns: producer k starts k/N of an interval late.
    let phase_ns = rate.map_or(0, |r| (1e9 / r * producer as f64 / producers as f64) as u64);
    GeneratorPlan {
        producer,
        message_bytes: plan.message_bytes,
        messages,
        deadline_ns,
        rate,
        start_ns: start_ns + phase_ns,
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Samples the meters once a second: per-second rates and p99s, printed as progress
/// lines unless quiet, and the run's total histograms.
struct Reporter {
    done: oneshot::Sender<()>,
    task: JoinHandle<(Vec<Second>, Histogram<u64>, Histogram<u64>)>,
}

impl Reporter {
    fn start(shared: Arc<Shared>, quiet: bool) -> Reporter {
        let (done, mut finished) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut seconds = Vec::new();
            let mut ack_total = latency_histogram();
            let mut e2e_total = latency_histogram();
            let mut ack_second = latency_histogram();
            let mut e2e_second = latency_histogram();
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            ticks.tick().await;
            let meters = &shared.meters;
            let size = shared.plan.message_bytes as f64;
            let (mut sent, mut acked, mut consumed) = (0, 0, 0);
            loop {
                tokio::select! {
                    _ = &mut finished => break,
                    _ = ticks.tick() => {}
                }
                meters.ack_latency.drain_into(&mut ack_second);
                meters.e2e_latency.drain_into(&mut e2e_second);
                let (s, a, c) = (meters.sent.sum(), meters.acked.sum(), meters.consumed());
                let second = Second {
                    second: seconds.len() as u32 + 1,
                    sent_per_s: (s - sent) as f64,
                    acked_per_s: (a - acked) as f64,
                    acked_mb_per_s: (a - acked) as f64 * size / 1e6,
                    consumed_per_s: (c - consumed) as f64,
                    ack_p99_us: Percentiles::of(&ack_second).map(|p| p.p99_us),
                    e2e_p99_us: Percentiles::of(&e2e_second).map(|p| p.p99_us),
                };
                (sent, acked, consumed) = (s, a, c);
                if !quiet {
                    eprintln!("{}", progress_line(&second));
                }
                seconds.push(second);
                let _ = ack_total.add(&ack_second);
                let _ = e2e_total.add(&e2e_second);
                ack_second.reset();
                e2e_second.reset();
            }
            meters.ack_latency.drain_into(&mut ack_total);
            meters.e2e_latency.drain_into(&mut e2e_total);
            (seconds, ack_total, e2e_total)
        });
        Reporter { done, task }
    }

    /// Stops sampling; the per-second series and the total histograms. Call once every
    /// recorder has flushed (every producer and consumer task has ended).
    async fn finish(self) -> (Vec<Second>, Histogram<u64>, Histogram<u64>) {
        let _ = self.done.send(());
        self.task
            .await
            .unwrap_or_else(|_| (Vec::new(), latency_histogram(), latency_histogram()))
    }
}

fn progress_line(s: &Second) -> String {
    let p99 = |v: Option<f64>| v.map_or_else(|| "-".to_string(), format_latency);
    format!(
        "[{:>4} s] sent {:>11}/s  acked {:>11}/s ({:>7.1} MB/s)  consumed {:>11}/s  p99 ack {:>9}  e2e {:>9}",
        s.second,
        thousands(s.sent_per_s),
        thousands(s.acked_per_s),
        s.acked_mb_per_s,
        thousands(s.consumed_per_s),
        p99(s.ack_p99_us),
        p99(s.e2e_p99_us),
    )
}
