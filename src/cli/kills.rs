//! `latchkey kills [show ID | lift ID --reason …]`: kill rules and their revocation progress.

use std::process::ExitCode;

use serde_json::{Value, json};

use super::client::{AdminClient, ServerArgs, cell, print_json, print_report, print_table, selector_text};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// One rule: its selector, state and revocation report.
    Show { id: uuid::Uuid },
    /// Let new exchanges through again. Nothing already revoked comes back.
    Lift {
        id: uuid::Uuid,
        /// Why: recorded in the rule and the audit trail.
        #[arg(long)]
        reason: String,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(&args.server)?;
    match args.command {
        None => list(&client, args.server.json).await,
        Some(Command::Show { id }) => {
            let (_, rule) = client.get(&format!("/v1/kills/{id}")).await?;
            show(&rule, args.server.json)
        }
        Some(Command::Lift { id, reason }) => {
            let (_, rule) = client.post(&format!("/v1/kills/{id}/lift"), &json!({ "reason": reason })).await?;
            if !args.server.json {
                println!("kill rule {id} lifted: new exchanges are allowed again; nothing was un-revoked");
            }
            show(&rule, args.server.json)
        }
    }
}

/// Every rule, oldest first, following the cursors.
async fn list(client: &AdminClient, json: bool) -> anyhow::Result<ExitCode> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/kills?limit=1000".to_owned(),
            Some(c) => format!(
                "/v1/kills?limit=1000&cursor={}",
                url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()
            ),
        };
        let (_, page) = client.get(&path).await?;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    if json {
        print_json(&json!({ "items": items }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if items.is_empty() {
        println!("no kill rules");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ["ID", "STATE", "CREATED", "BY", "MATCHED", "REVOKED", "PENDING", "FAILED", "SELECTOR", "REASON"]
            .map(String::from)
            .to_vec(),
    ];
    for k in &items {
        let t = &k["report"]["totals"];
        rows.push(vec![
            cell(&k["id"]),
            cell(&k["state"]),
            cell(&k["created_at"]),
            cell(&k["created_by"]),
            cell(&t["matched"]),
            cell(&t["revoked"]),
            cell(&t["pending"]),
            cell(&t["failed"]),
            selector_text(&k["selector"]),
            cell(&k["reason"]),
        ]);
    }
    print_table(&rows);
    Ok(ExitCode::SUCCESS)
}

fn show(rule: &Value, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(rule)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        vec!["id:".to_owned(), cell(&rule["id"])],
        vec!["state:".to_owned(), cell(&rule["state"])],
        vec!["selector:".to_owned(), selector_text(&rule["selector"])],
        vec!["reason:".to_owned(), cell(&rule["reason"])],
        vec!["created:".to_owned(), format!("{} by {}", cell(&rule["created_at"]), cell(&rule["created_by"]))],
        vec![
            "expires:".to_owned(),
            if rule["expires_at"].is_null() { "never".into() } else { cell(&rule["expires_at"]) },
        ],
    ];
    if !rule["lifted_at"].is_null() {
        rows.push(vec![
            "lifted:".to_owned(),
            format!("{} by {}: {}", cell(&rule["lifted_at"]), cell(&rule["lifted_by"]), cell(&rule["lift_reason"])),
        ]);
    }
    print_table(&rows);
    println!();
    print_report(&rule["report"]);
    Ok(ExitCode::SUCCESS)
}
