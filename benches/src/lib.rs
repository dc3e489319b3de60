//! `strata-bench`: the load generator of Strata.
//!
//! N producers (each on its own thread), M consumers per consumer set (standalone
//! partition consumers, or a consumer group per set), P partitions, a
//! message size, a batch size and linger, a fixed or max rate, a duration or a message
//! count, and a durability policy; against a Strata broker it starts itself (or one at
//! `--broker`), the `--null` target (no broker: the generator's own ceiling), or, behind
//! the `nats` and `redis` features, NATS JetStream and Redis Streams with the same
//! traffic shape. It reports throughput per second and overall, publish → ack and
//! end-to-end latency percentiles from HdrHistogram (from the intended send time in
//! fixed-rate runs, so coordinated omission does not hide stalls), whether every
//! acknowledged message reached every consumer set exactly once, and a same-run disk
//! baseline so every MB/s can be read as a share of the disk, and (fixed-rate runs) a
//! same-run transport floor so every latency can be read against one bare round trip.
//!
//! Code map:
//! - [`options`]: flags, the named standard workloads, the resolved [`Plan`].
//! - `generator`: the per-producer message loop and its pacing.
//! - `payload`: the run's clock and the 16-byte message header (send time, id).
//! - `stats`: tallies, latency recorders, the exactly-once bitmap.
//! - `run`: one run from start to [`Report`]; the backend interface.
//! - `strata`, `null`, `nats`, `redis`: the targets; `strata` starts its own broker with
//!   `strata-spawn` unless `--broker` names one.
//! - [`scale`]: what many partitions cost an idle broker (the `partitions` workload).
//! - [`disk`]: the disk baseline. [`floor`]: the transport floor, round trips of the
//!   target's cheapest call. [`report`]: table, JSON and Markdown output.

pub mod disk;
mod error;
pub mod floor;
mod generator;
pub mod machine;
#[cfg(feature = "nats")]
mod nats;
mod null;
pub mod options;
mod payload;
#[cfg(feature = "redis")]
mod redis;
pub mod report;
mod run;
pub mod scale;
mod stats;
mod strata;

pub use error::{Error, Result};
pub use options::{ConsumerMode, Options, Plan, TargetKind, WorkloadName};
pub use report::Report;
pub use run::{run, Outcome};
pub use stats::Percentiles;
