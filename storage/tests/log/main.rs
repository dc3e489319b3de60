//! The storage engine's integration tests, one test binary (one link) with a module per
//! kind: a reference model (proptest), recovery from damaged files, and a SIGKILLed
//! appender.

mod common;

mod crash;
mod faults;
mod model;
mod recovery;
