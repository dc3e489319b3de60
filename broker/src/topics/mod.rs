//! Topics: their settings, names and persistence ([`settings`]), and their partitions,
//! each a storage log with one writer that runs group commit ([`partition`]). The
//! registry of open topics is [`crate::broker::Broker`].
//!
//! Nothing here knows a wire protocol: every listener (gRPC today) calls into this.

pub mod partition;
pub mod settings;
pub mod writers;
