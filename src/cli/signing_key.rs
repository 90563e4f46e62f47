//! `latchkey signing-key [rotate | retire KID --reason …]`: the `jwt` backend's signing keys,
//! listed (role auditor), rotated or retired (role admin).

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
    /// Retire a leaked key now: it leaves the JWKS and verifies nothing more, the live jwt
    /// credentials it signed are revoked, and if nothing else would sign, a new key is made
    /// that signs at once (its tokens fail at verifiers until their cached JWKS is renewed,
    /// 5 minutes at most).
    Retire {
        /// The key id, as `latchkey signing-key` lists it. A thumbprint may begin with `-`; it is
        /// taken as the id all the same.
        #[arg(allow_hyphen_values = true)]
        kid: String,
        /// Why: recorded in the audit trail, with every credential the retirement revokes.
        #[arg(long)]
        reason: String,
    },
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
        Some(Command::Retire { kid, reason }) => {
            // A kid is a base64url thumbprint: anything else is no key, and must not reach the
            // URL as a path.
            if kid.is_empty() || !kid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                anyhow::bail!("{kid:?} is not a signing key id (`latchkey signing-key` lists them)");
            }
            let (_, answer) =
                client.post(&format!("/v1/signing-keys/{kid}/retire"), &json!({ "reason": reason })).await?;
            if !args.server.json {
                let retired = &answer["retired"];
                println!(
                    "signing key {} retired at {}: {} credential(s) revoked, {} pending one(s) barred",
                    cell(&retired["kid"]),
                    cell(&retired["retired_at"]),
                    cell(&retired["credentials_revoked"]),
                    cell(&retired["credentials_marked"])
                );
                if retired["replacement"].is_object() {
                    println!(
                        "new signing key {} signs now; verifiers that cached the JWKS before it may refuse its \
                         tokens for up to 5 minutes",
                        cell(&retired["replacement"]["kid"])
                    );
                }
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
