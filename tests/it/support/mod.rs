//! Shared support for the integration tests: handles on the real peers that `scripts/test.sh`
//! starts (see docs/TESTING.md).

pub mod github;
pub mod openapi;
pub mod peers;
pub mod replicas;

pub mod store;
pub mod test_app;
