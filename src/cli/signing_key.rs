//! `latchkey signing-key [rotate]`: the `jwt` backend's signing keys, listed (role auditor) or
//! rotated (role admin).

use std::process::ExitCode;

use serde_json::{Value, json};

use super::client::{AdminClient, ServerArgs, cell, print_json, print_table};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Make a new signing key: published at once, signing once every replica and every
    /// verifier's cached JWKS know it; the old key stays published until its tokens expired.
    Rotate,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.server)?;
    let answer = match args.command {
        None => client.get("/v1/signing-keys").await?.1,
        Some(Command::Rotate) => {
            let (_, answer) = client.post("/v1/signing-keys/rotate", &json!({})).await?;
            if !args.server.json {
                println!(
                    "new signing key {}: published now, signs from {}",
                    cell(&answer["key"]["kid"]),
                    cell(&answer["key"]["signs_from"])
                );
            }
            answer
        }
    };
    if args.server.json {
        print_json(&answer)?;
    } else {
        print_keys(&answer["items"]);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_keys(items: &Value) {
    let mut rows = vec![["KID", "STATE", "CREATED", "SIGNS FROM", "PUBLISHED UNTIL"].map(str::to_owned).to_vec()];
    for k in items.as_array().into_iter().flatten() {
        rows.push(vec![
            cell(&k["kid"]),
            cell(&k["state"]),
            cell(&k["created_at"]),
            cell(&k["signs_from"]),
            cell(&k["published_until"]),
        ]);
    }
    print_table(&rows);
}
