//! latchkey: an ephemeral credential broker.
//!
//! A CI job trades the OIDC token its platform gives it for short-lived credentials scoped to a
//! named capability, if a policy allows it. See `docs/ARCHITECTURE.md` for the walk-through.

pub mod app;
pub mod audit;
pub mod backend;
pub mod broker;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod fuzzing;
pub mod http;
pub mod keys;
pub mod kill;
pub mod killswitch;
pub mod ledger;
pub mod metrics;
pub mod oidc;
pub mod policy;
pub mod records;
pub mod release;
pub mod seal;
pub mod server;
pub mod stream;
pub mod worker;
