//! What keeps the broker from being fully ready: faults that writers report and health
//! checks read (gRPC health, `/readyz`, metrics).
//!
//! A [`Fault`] belongs to one component that can fail-stop: a partition's writer, the
//! committed-offsets writer. It is set once, by that component's own thread, when a
//! write or fsync fails and the component starts refusing writes; it stays set until
//! the broker restarts and recovery runs, or its topic is deleted. Setting it, or
//! deleting a topic, bumps a broker-wide counter on a watch channel
//! ([`Faults::changed`]), so health reporters react at once instead of polling.

use std::sync::{Arc, OnceLock};

use tokio::sync::watch;

/// The broker-wide source of fault notifications; hands out [`Fault`]s.
#[derive(Debug, Clone)]
pub struct Faults {
    changes: Arc<watch::Sender<u64>>,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            changes: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Faults {
    /// A new, unset fault of one component.
    pub fn fault(&self) -> Arc<Fault> {
        Arc::new(Fault {
            reason: OnceLock::new(),
            changes: Arc::clone(&self.changes),
        })
    }

    /// A receiver that sees a new value whenever a fault is set or goes away.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Tells the health reporters to look again: a component with a fault went away
    /// (its topic was deleted).
    pub fn removed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

/// One component's fault: unset while it works; once set, why it stopped.
#[derive(Debug)]
pub struct Fault {
    reason: OnceLock<String>,
    changes: Arc<watch::Sender<u64>>,
}

impl Fault {
    /// Records why the component stopped; later calls keep the first reason.
    pub fn set(&self, reason: String) {
        if self.reason.set(reason).is_ok() {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Why the component stopped, if it did.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }
}

/// Something that keeps the broker from being fully ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A partition refuses writes after a failed write or fsync.
    PartitionFailed {
        /// `topic/partition`.
        partition: String,
        /// The failure.
        reason: String,
    },
    /// The committed-offsets log refuses commits after a failed write.
    OffsetsFailed {
        /// The failure.
        reason: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::PartitionFailed { partition, reason } => write!(
                f,
                "partition {partition} refuses writes: {reason}; restart the broker to \
                 recover it (check the disk first)"
            ),
            Problem::OffsetsFailed { reason } => write!(
                f,
                "consumer group commits are refused: {reason}; restart the broker to \
                 recover the offsets log (check the disk first)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_keeps_its_first_reason_and_notifies_once() {
        let faults = Faults::default();
        let mut changed = faults.changed();
        let fault = faults.fault();
        assert_eq!(fault.reason(), None);
        fault.set("disk on fire".into());
        fault.set("later".into());
        assert_eq!(fault.reason(), Some("disk on fire"));
        assert!(changed.has_changed().expect("open"));
        assert_eq!(*changed.borrow_and_update(), 1);
    }
}
