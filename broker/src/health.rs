//! What keeps the broker from being fully ready: faults that writers report and health
//! checks read (gRPC health, `/readyz`, metrics).
//!
//! A [`Fault`] belongs to one component that can fail-stop: a partition's writer, the
//! committed-offsets writer. It is set by that component's own thread when a write or
//! fsync fails and the component starts refusing writes. A partition's stays set until
//! the broker restarts and recovery runs, or its topic is deleted; the offsets writer
//! recovers by itself (reopening its log) and clears its own once it takes writes
//! again. Setting or clearing one, or deleting a topic, bumps a broker-wide counter on
//! a watch channel ([`Faults::changed`]), so health reporters react at once instead of
//! polling.

use std::sync::{Arc, Mutex};

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
            reason: Mutex::new(None),
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

/// One component's fault: unset while it works; while set, why it stopped.
#[derive(Debug)]
pub struct Fault {
    reason: Mutex<Option<String>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Fault {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records why the component stopped; while set, later calls keep the first reason.
    pub fn set(&self, reason: String) {
        let mut current = self.lock();
        if current.is_none() {
            *current = Some(reason);
            drop(current);
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// The component works again.
    pub fn clear(&self) {
        if self.lock().take().is_some() {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Why the component stopped, if it did and has not recovered.
    pub fn reason(&self) -> Option<String> {
        self.lock().clone()
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
    /// The committed-offsets log refuses commits after a failed write, until it
    /// recovers.
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
                "consumer group commits are refused: {reason}; the broker reopens the \
                 offsets log and takes commits again once the cause is gone (check the \
                 disk)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_keeps_its_first_reason_and_notifies_once_per_change() {
        let faults = Faults::default();
        let mut changed = faults.changed();
        let fault = faults.fault();
        assert_eq!(fault.reason(), None);
        fault.set("disk on fire".into());
        fault.set("later".into());
        assert_eq!(fault.reason().as_deref(), Some("disk on fire"));
        assert!(changed.has_changed().expect("open"));
        assert_eq!(*changed.borrow_and_update(), 1);
        fault.clear();
        fault.clear();
        assert_eq!(fault.reason(), None);
        assert_eq!(*changed.borrow_and_update(), 2, "a clear notifies once");
    }
}
