//! latchkey's integration tests: one test binary, one module per area, to keep link time down.

// A panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod aws;
mod ci;
mod cli;
mod exchange;
mod faults;
mod github;
mod hostile;
mod keys;
mod kill;
mod kill_everywhere;
mod lifecycle;
mod limits;
mod peer_exchange;
mod peer_smoke;
mod postgres_replicas;
mod postgres_store;
mod support;
mod vault;
