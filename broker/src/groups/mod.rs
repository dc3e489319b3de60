//! Consumer groups, one model for every listener: the operations listeners offer
//! ([`api`]), membership and rebalancing
//! ([`coordinator`]), the balanced, sticky assignment ([`assign`]), and the durable
//! committed offsets ([`offsets`]).
//!
//! Nothing here knows a wire protocol: listeners translate their requests into these
//! calls and the errors back.

pub mod api;
pub mod assign;
pub mod coordinator;
pub mod offsets;
