//! `latchkey admin-key new`: a new admin key and the line the config keeps.

use std::process::ExitCode;

use crate::config::Role;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a new key (shown once) and its `[[admin_key]]` entry.
    New {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Service,
    Auditor,
    Security,
    Admin,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Service => Role::Service,
            RoleArg::Auditor => Role::Auditor,
            RoleArg::Security => Role::Security,
            RoleArg::Admin => Role::Admin,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Command::New { name, role } = args.command;
    let role = Role::from(role);
    let (key, hash) = crate::app::new_admin_key();
    println!("key: {key}");
    println!();
    println!("# Add to latchkey.toml; the key itself is not stored anywhere:");
    println!("[[admin_key]]");
    println!("name = {}", toml::Value::String(name));
    println!("role = \"{}\"", role.as_str());
    println!("sha256 = \"{hash}\"");
    Ok(ExitCode::SUCCESS)
}
