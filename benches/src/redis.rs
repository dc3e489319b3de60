//! Redis Streams as a peer target (feature `redis`).
//!
//! P partitions are P stream keys. A producer's generator hands messages in chunks to
//! an async publisher, which sends them as pipelines of `XADD key * v <payload>` (at
//! most 1,000 commands and `--batch-bytes` of payload each, keys taken in turn per
//! message), one pipeline in flight; every message of a pipeline is acknowledged by its
//! reply. At most `--max-pending` (default 20,000) messages wait. Each consumer reads
//! its partitions' keys with `XREAD COUNT 1000 BLOCK 100` from the first entry on its
//! own connection (a standalone reader, like Strata's partition consumers).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::floor::{self, Floor};
use crate::generator::{generate, GeneratorPlan, Offer};
use crate::options::Plan;
use crate::report::TargetInfo;
use crate::run::{Acks, ChunkSender, ConsumerOutcome, Consumption, ProducerOutcome, Shared};

/// Messages a producer may have waiting or in flight by default.
const PENDING_DEFAULT: usize = 20_000;
/// Most commands in one pipeline.
const PIPELINE_COMMANDS_MAX: usize = 1_000;
/// Entries one XREAD asks for per key.
const READ_COUNT: usize = 1_000;
/// How long one XREAD blocks when there is nothing to read.
const READ_BLOCK_MS: u64 = 100;
/// A reply may take this long (large pipelines under load) before the call fails.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Redis stream keys for the run.
pub struct RedisTarget {
    address: String,
    version: String,
    client: redis::Client,
    keys: Vec<String>,
    durability: String,
    durability_detail: String,
    window: usize,
    pipeline_bytes_max: usize,
}

fn peer_error(message: impl std::fmt::Display) -> Error {
    Error::Peer {
        backend: "redis",
        message: message.to_string(),
    }
}

impl RedisTarget {
    /// Connects, reads the persistence settings, and clears the run's keys;
    /// [`Error::Unreachable`] if the server is not there.
    pub async fn open(plan: &Plan, address: &str) -> Result<RedisTarget> {
        let unreachable = |e: redis::RedisError| Error::Unreachable {
            backend: "redis",
            address: address.to_string(),
            message: e.to_string(),
        };
        let client = redis::Client::open(address).map_err(unreachable)?;
        let mut conn = connect(&client).await.map_err(unreachable)?;
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .map_err(peer_error)?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_string();
        let setting = |name: &'static str| {
            let mut conn = conn.clone();
            async move {
                let pair: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut conn)
                    .await
                    .map_err(peer_error)?;
                Ok::<_, Error>(pair.get(1).cloned().unwrap_or_default())
            }
        };
        let appendonly = setting("appendonly").await?;
        let appendfsync = setting("appendfsync").await?;
        let save = setting("save").await?;
        let (durability, durability_detail) = describe_durability(&appendonly, &appendfsync, &save);
        let keys: Vec<String> = (0..plan.partitions)
            .map(|p| format!("strata-bench:{}:{}:{p}", std::process::id(), plan.workload))
            .collect();
        redis::cmd("DEL")
            .arg(&keys)
            .query_async::<()>(&mut conn)
            .await
            .map_err(peer_error)?;
        Ok(RedisTarget {
            address: address.to_string(),
            version,
            client,
            keys,
            durability,
            durability_detail,
            window: plan.max_pending.unwrap_or(PENDING_DEFAULT).max(1),
            pipeline_bytes_max: plan.batch_bytes,
        })
    }

    /// What the report says about this target.
    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            name: "redis".into(),
            version: Some(self.version.clone()),
            address: Some(self.address.clone()),
            durability: self.durability.clone(),
            durability_detail: self.durability_detail.clone(),
            notes: vec![format!(
                "partitions are stream keys; XADD pipelines of up to {} commands, one in \
                 flight, up to {} messages waiting per producer; consumers use XREAD",
                PIPELINE_COMMANDS_MAX,
                crate::report::thousands(self.window as f64)
            )],
        }
    }

    pub(crate) async fn start_producer(
        &self,
        shared: &Arc<Shared>,
        plan: GeneratorPlan,
    ) -> Result<JoinHandle<ProducerOutcome>> {
        let mut conn = connect(&self.client).await.map_err(peer_error)?;
        let (mut handoff, mut messages) = ChunkSender::<(Bytes, u64)>::channel(self.window);
        let clock = shared.clock;
        let sent = shared.meters.sent.register();
        let generator = tokio::task::spawn_blocking(move || {
            let sent = generate(&plan, clock, &sent, |offer| match offer {
                Offer::Message { value, sent_ns } => handoff.push((value.copy_out(), sent_ns)),
                Offer::Idle => handoff.flush(),
            });
            let _ = handoff.flush();
            sent
        });
        let keys = self.keys.clone();
        let pipeline_bytes_max = self.pipeline_bytes_max;
        let mut acks = Acks::new(shared);
        Ok(tokio::spawn(async move {
            let mut next_key = 0;
            let mut waiting: Vec<(Bytes, u64)> = Vec::new();
            let mut closed = false;
            while !(closed && waiting.is_empty()) {
                // Take what has arrived, up to one pipeline's worth; wait only when
                // there is nothing at all.
                while !closed && waiting.len() < PIPELINE_COMMANDS_MAX {
                    let chunk = if waiting.is_empty() {
                        messages.recv().await
                    } else {
                        match messages.try_recv() {
                            Ok(chunk) => Some(chunk),
                            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
                        }
                    };
                    match chunk {
                        Some(chunk) => waiting.extend(chunk),
                        None => closed = true,
                    }
                }
                let mut pipe = redis::pipe();
                let mut bytes = 0;
                let mut commands = 0;
                for (value, _) in &waiting {
                    if commands == PIPELINE_COMMANDS_MAX
                        || (commands > 0 && bytes + value.len() > pipeline_bytes_max)
                    {
                        break;
                    }
                    pipe.cmd("XADD")
                        .arg(&keys[next_key])
                        .arg("*")
                        .arg("v")
                        .arg(value.as_ref());
                    next_key = (next_key + 1) % keys.len();
                    bytes += value.len();
                    commands += 1;
                }
                if commands == 0 {
                    continue;
                }
                let result = pipe.query_async::<Value>(&mut conn).await;
                let mut waited = true;
                for (_, sent_ns) in waiting.drain(..commands) {
                    match &result {
                        Ok(_) => acks.ok(sent_ns, std::mem::take(&mut waited)),
                        Err(e) => acks.failed(1, e),
                    }
                }
            }
            let sent = generator.await.unwrap_or(0);
            ProducerOutcome {
                sent,
                acks: acks.finish(),
            }
        }))
    }

    /// The transport floor: lone `PING`s on a connection of their own.
    pub(crate) async fn floor(&self, calls: u32) -> Result<Option<Floor>> {
        let conn = connect(&self.client).await.map_err(peer_error)?;
        floor::measure("PING", calls, || {
            let mut conn = conn.clone();
            async move {
                let _: String = redis::cmd("PING")
                    .query_async(&mut conn)
                    .await
                    .map_err(peer_error)?;
                Ok(())
            }
        })
        .await
    }

    pub(crate) async fn start_consumer(
        &self,
        shared: &Arc<Shared>,
        set: u32,
        partitions: Vec<u32>,
    ) -> Result<JoinHandle<ConsumerOutcome>> {
        let mut conn = connect(&self.client).await.map_err(peer_error)?;
        let keys: Vec<String> = partitions
            .iter()
            .map(|&p| self.keys[p as usize].clone())
            .collect();
        let mut consumption = Consumption::new(shared, set);
        let shared = Arc::clone(shared);
        Ok(tokio::spawn(async move {
            let mut last_ids: Vec<Vec<u8>> = vec![b"0-0".to_vec(); keys.len()];
            let stop = shared.stop_signal();
            tokio::pin!(stop);
            let error = loop {
                let mut read = redis::cmd("XREAD");
                read.arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(READ_BLOCK_MS)
                    .arg("STREAMS")
                    .arg(&keys)
                    .arg(&last_ids);
                let reply = tokio::select! {
                    biased;
                    _ = &mut stop => break None,
                    reply = read.query_async::<Value>(&mut conn) => reply,
                };
                match reply {
                    Ok(reply) => {
                        if let Err(e) = read_entries(reply, &keys, &mut last_ids, &mut consumption)
                        {
                            break Some(e);
                        }
                    }
                    Err(e) => break Some(e.to_string()),
                }
            };
            consumption.finish(error)
        }))
    }

    /// Deletes the run's keys.
    pub async fn close(self) {
        if let Ok(mut conn) = connect(&self.client).await {
            let _ = redis::cmd("DEL")
                .arg(&self.keys)
                .query_async::<()>(&mut conn)
                .await;
        }
    }
}

async fn connect(client: &redis::Client) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The durability label and sentence for Redis's persistence settings.
fn describe_durability(appendonly: &str, appendfsync: &str, save: &str) -> (String, String) {
    let snapshots = if save.trim().is_empty() {
        "no RDB snapshots".to_string()
    } else {
        format!("RDB snapshots on `save {save}`")
    };
    if appendonly == "yes" {
        (
            format!("AOF, appendfsync {appendfsync}"),
            format!(
                "acknowledged once in memory and the AOF write buffer; the AOF is fsynced \
                 per `appendfsync {appendfsync}` (everysec: once a second); {snapshots}"
            ),
        )
    } else if save.trim().is_empty() {
        (
            "memory only".into(),
            "acknowledged once in memory; appendonly no and no RDB snapshots: nothing is \
             written to disk"
                .into(),
        )
    } else {
        (
            "memory, RDB snapshots".into(),
            format!("acknowledged once in memory; appendonly no; {snapshots}"),
        )
    }
}

/// Feeds the entries of an XREAD reply (RESP2: `[[key, [[id, [field, value, ...]],
/// ...]], ...]`, or nil when nothing came) to the consumption and advances the ids.
fn read_entries(
    reply: Value,
    keys: &[String],
    last_ids: &mut [Vec<u8>],
    consumption: &mut Consumption,
) -> std::result::Result<(), String> {
    let streams = match reply {
        Value::Nil => return Ok(()),
        Value::Array(streams) => streams,
        other => return Err(format!("unexpected XREAD reply {other:?}")),
    };
    let mut waited = true;
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            return Err("an XREAD stream is not an array".into());
        };
        let (Some(Value::Array(entries)), Some(Value::BulkString(key))) =
            (parts.pop(), parts.pop())
        else {
            return Err("an XREAD stream is not [key, entries]".into());
        };
        let Some(index) = keys.iter().position(|k| k.as_bytes() == key.as_slice()) else {
            return Err(format!(
                "XREAD answered for a key not asked for: {}",
                String::from_utf8_lossy(&key)
            ));
        };
        for entry in entries {
            let Value::Array(mut entry) = entry else {
                return Err("an XREAD entry is not an array".into());
            };
            let (Some(Value::Array(fields)), Some(Value::BulkString(id))) =
                (entry.pop(), entry.pop())
            else {
                return Err("an XREAD entry is not [id, fields]".into());
            };
            match fields.get(1) {
                Some(Value::BulkString(value)) => {
                    consumption.message(value, std::mem::take(&mut waited));
                }
                _ => return Err("an XREAD entry has no value field".into()),
            }
            last_ids[index] = id;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_labels() {
        assert_eq!(describe_durability("no", "everysec", "").0, "memory only");
        assert_eq!(
            describe_durability("yes", "everysec", "").0,
            "AOF, appendfsync everysec"
        );
        assert_eq!(
            describe_durability("no", "everysec", "3600 1").0,
            "memory, RDB snapshots"
        );
    }
}
