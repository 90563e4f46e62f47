//! `latchkey revoke ID`: revoke one credential now.

use std::process::ExitCode;

use serde_json::json;

use super::client::{AdminClient, ServerArgs, print_json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The credential id (from the exchange answer, `GET /v1/credentials` or the audit trail).
    id: uuid::Uuid,
    /// Why: recorded in the audit trail.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.server)?;
    let mut body = json!({});
    if let Some(r) = &args.reason {
        body["reason"] = json!(r);
    }
    let (_, answer) = client.post(&format!("/v1/credentials/{}/revoke", args.id), &body).await?;
    if args.server.json {
        print_json(&answer)?;
    } else {
        println!(
            "credential {}: {} (state {})",
            args.id,
            answer["message"].as_str().unwrap_or_default(),
            answer["state"].as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
