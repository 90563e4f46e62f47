//! The command line: one `enum Command`, one file per subcommand.

mod admin_key;
mod audit;
mod backup;
mod client;
mod dev;
mod exchange;
mod init;
mod kill;
mod kills;
mod migrate;
mod policy;
mod release;
mod revoke;
mod serve;
mod signing_key;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "latchkey",
    version,
    about = "Ephemeral credential broker: CI OIDC tokens in, short-lived scoped credentials out"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a development broker: embedded store, built-in issuer, example policies.
    Dev(dev::Args),
    /// Run the broker from a configuration file.
    Serve(serve::Args),
    /// Write a starter configuration, example policy, sealing key and admin key.
    Init(init::Args),
    /// Apply the store's pending migrations.
    Migrate(migrate::Args),
    /// Check, test and explain policies without a server.
    Policy(policy::Args),
    /// Manage admin keys.
    AdminKey(admin_key::Args),
    /// Trade this CI job's OIDC token for a capability's credentials.
    Exchange(exchange::Args),
    /// Give an exchange's credentials back before they expire.
    Release(release::Args),
    /// Kill-switch: refuse an identity new credentials and revoke what it holds (role security).
    Kill(kill::Args),
    /// List kill rules, show one with its revocation progress, or lift one.
    Kills(kills::Args),
    /// Revoke one credential now (role security).
    Revoke(revoke::Args),
    /// Audit: list credentials, exchanges and events; sign and verify checkpoints; explain.
    Audit(audit::Args),
    /// List the jwt signing keys, or rotate to a new one (role admin).
    SigningKey(signing_key::Args),
    /// Copy a SQLite store to a new file while the broker runs.
    Backup(backup::Args),
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Dev(a) => dev::run(a).await,
            Command::Serve(a) => serve::run(a).await,
            Command::Init(a) => init::run(a),
            Command::Migrate(a) => migrate::run(a).await,
            Command::Policy(a) => policy::run(a),
            Command::AdminKey(a) => admin_key::run(a),
            Command::Exchange(a) => exchange::run(a).await,
            Command::Release(a) => release::run(a).await,
            Command::Kill(a) => kill::run(a).await,
            Command::Kills(a) => kills::run(a).await,
            Command::Revoke(a) => revoke::run(a).await,
            Command::Audit(a) => audit::run(a).await,
            Command::SigningKey(a) => signing_key::run(a).await,
            Command::Backup(a) => backup::run(a).await,
        }
    }
}

/// `--config`, else `./latchkey.toml` when it exists.
fn find_config(explicit: Option<&Path>) -> anyhow::Result<Option<Config>> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => {
            let default = PathBuf::from("latchkey.toml");
            if !default.exists() {
                return Ok(None);
            }
            default
        }
    };
    Ok(Some(Config::load(&path)?))
}
