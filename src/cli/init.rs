//! `latchkey init DIR`: a starter configuration, an example policy, a sealing key, an admin key.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory to write into (created if missing).
    dir: PathBuf,
}

/// The example policy shipped in `policies/`, so the starter and the examples never drift.
const EXAMPLE_POLICY: &str = include_str!("../../policies/pr-review.toml");

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    let config_path = dir.join("latchkey.toml");
    if config_path.exists() {
        bail!("{} already exists; init never overwrites", config_path.display());
    }
    std::fs::create_dir_all(dir.join("policies")).with_context(|| format!("creating {}", dir.display()))?;
    crate::seal::generate_key_file(&dir.join("latchkey.key"))?;
    let checkpoint_key = crate::checkpoint::generate_key_file(&dir.join("checkpoint.key"))?;
    let (admin_key, admin_hash) = crate::app::new_admin_key();
    write_new(&config_path, &starter_config(&admin_hash))?;
    write_new(&dir.join("policies/pr-review.toml"), EXAMPLE_POLICY)?;
    println!("wrote {}", config_path.display());
    println!("wrote {}", dir.join("latchkey.key").display());
    println!("wrote {}", dir.join("checkpoint.key").display());
    println!("wrote {}", dir.join("policies/pr-review.toml").display());
    println!();
    println!("admin key (role admin, shown once; the config keeps only its SHA-256):");
    println!("  {admin_key}");
    println!();
    println!(
        "audit checkpoint public key (Ed25519, key id {}); keep a copy away from the server:",
        checkpoint_key.key_id()
    );
    println!("  {}", checkpoint_key.public_key().to_base64());
    println!();
    println!("next: edit latchkey.toml (audience, issuers, required_claims), then");
    println!("  latchkey serve --config {} --check", config_path.display());
    println!("  latchkey migrate --config {}", config_path.display());
    println!("  latchkey serve --config {}", config_path.display());
    Ok(ExitCode::SUCCESS)
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn starter_config(admin_hash: &str) -> String {
    format!(
        r#"# latchkey configuration. Every table rejects unknown keys; see docs/ for each setting.

[server]
listen = "0.0.0.0:8443"
# tls_cert_file = "tls.crt"              # plain HTTP only when no certificate is given
# tls_key_file = "tls.key"
admin_listen = "127.0.0.1:9090"          # /metrics, /healthz, /readyz
audience = "https://latchkey.example.com" # required in every subject token's aud

[store]
url = "sqlite://latchkey.db"

[sealing]
key_file = "latchkey.key"
previous_key_files = []

[policies]
dir = "policies"

[audit]
checkpoint_key_file = "checkpoint.key"  # signs checkpoints of the audit chain; not in the store
checkpoint_interval = "5m"
# stream = "stdout"                     # or a file path: every audit event as a JSON line

[[issuer]]
id = "github-actions"
kind = "github"
url = "https://token.actions.githubusercontent.com"
algorithms = ["RS256"]
max_token_age = "10m"
single_use = true
# Pin your organisation here so that no policy can forget it (its numeric id, not its name):
required_claims = {{ repository_owner_id = ["1234567"] }}

# Backends: configure the ones your policies use (docs/BACKENDS.md). The jwt backend is on by default.
#
# [[backends.github]]
# id = "default"
# app_id = 12345
# private_key_file = "github-app.pem"
# api_url = "https://api.github.com"     # GitHub Enterprise Server: https://HOST/api/v3
#
# [backends.aws]                         # the broker's own credentials: the standard AWS chain
# region = "us-east-1"
# role_path = "/latchkey/"
#
# [backends.vault]
# address = "https://vault.example.com:8200"
# token_role = "latchkey"
# token_file = "vault-token"             # or [backends.vault.approle]

[[admin_key]]
name = "initial-admin"
role = "admin"
sha256 = "{admin_hash}"
"#
    )
}
