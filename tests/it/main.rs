//! latchkey's integration tests: one test binary, one module per area, to keep link time down.

mod cli;
mod exchange;
mod lifecycle;
mod peer_exchange;
mod peer_smoke;
mod support;
