//! latchkey's integration tests: one test binary, one module per area, to keep link time down.

mod peer_smoke;
mod support;
