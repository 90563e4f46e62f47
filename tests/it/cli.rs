//! The `latchkey` binary, run as a user would.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use reqwest::StatusCode;
use serde_json::json;

use crate::support::test_app::{answer, repo_path};

fn latchkey(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_latchkey")).args(args).current_dir(cwd).env("RUST_LOG", "warn").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn init_writes_a_config_that_checks_and_serve_refuses_without_its_sealing_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = latchkey(&["init", "site"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    let site = dir.path().join("site");
    for f in ["latchkey.toml", "latchkey.key", "policies/pr-review.toml"] {
        assert!(site.join(f).exists(), "{f} missing");
    }
    assert!(text(&out).contains("lk_"), "the admin key is printed once");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(site.join("latchkey.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = latchkey(&["init", "site"], dir.path());
    assert!(!again.status.success(), "init overwrote an existing config");

    let check = latchkey(&["serve", "--config", "site/latchkey.toml", "--check"], dir.path());
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("configuration OK"));

    std::fs::remove_file(site.join("latchkey.key")).unwrap();
    for args in
        [&["serve", "--config", "site/latchkey.toml", "--check"][..], &["serve", "--config", "site/latchkey.toml"]]
    {
        let out = latchkey(args, dir.path());
        assert!(!out.status.success());
        assert!(text(&out).contains("sealing key"), "{}", text(&out));
    }
}

#[test]
fn serve_check_names_an_unknown_config_key() {
    let dir = tempfile::tempdir().unwrap();
    assert!(latchkey(&["init", "."], dir.path()).status.success());
    let path = dir.path().join("latchkey.toml");
    let config = std::fs::read_to_string(&path).unwrap().replace("[store]", "[store]\nurll = \"x\"");
    std::fs::write(&path, config).unwrap();
    let out = latchkey(&["serve", "--check"], dir.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("urll"), "{}", text(&out));
}

#[test]
fn policy_check_and_test_pass_on_the_example_policies() {
    let root = repo_path("");
    let out = latchkey(&["policy", "check", "--dir", "policies"], &root);
    assert!(out.status.success(), "{}", text(&out));
    let out = latchkey(&["policy", "test", "--dir", "policies"], &root);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn policy_check_fails_on_an_unknown_key_and_on_an_unpinned_owner() {
    let dir = tempfile::tempdir().unwrap();
    let policy = |extra: &str, pin: &str| {
        format!(
            "description = \"x\"\nagent = \"a\"\nissuer = \"github-actions\"\nttl = \"15m\"\n{extra}\n[match]\n{pin}repository = \"acme/widgets\"\n[[grant]]\nbackend = \"jwt\"\naudience = \"x\"\n"
        )
    };
    std::fs::write(dir.path().join("typo.toml"), policy("descripton = \"y\"", "repository_owner_id = \"1\"\n"))
        .unwrap();
    let out = latchkey(&["policy", "check", "--dir", "."], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("descripton"), "{}", text(&out));

    std::fs::remove_file(dir.path().join("typo.toml")).unwrap();
    std::fs::write(dir.path().join("unpinned.toml"), policy("", "")).unwrap();
    let out = latchkey(&["policy", "check", "--dir", "."], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("unpinned.toml"), "{}", text(&out));
}

#[test]
fn policy_explain_prints_the_trace_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let claims = dir.path().join("claims.json");
    std::fs::write(
        &claims,
        json!({
            "repository": "acme/widgets-evil", "repository_owner_id": "1234567", "event_name": "pull_request",
            "ref": "refs/pull/1/merge", "actor": "octocat", "runner_environment": "github-hosted",
        })
        .to_string(),
    )
    .unwrap();
    let policies = repo_path("policies");
    let out = latchkey(
        &[
            "policy",
            "explain",
            "--dir",
            policies.to_str().unwrap(),
            "--capability",
            "pr-review",
            "--claims",
            claims.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("decision:   deny"), "{t}");
    assert!(t.contains("FAIL  match.repository"), "{t}");
    assert!(t.contains("acme/widgets-evil"), "{t}");
}

#[test]
fn admin_key_new_prints_a_key_and_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let out = latchkey(&["admin-key", "new", "--name", "oncall", "--role", "security"], dir.path());
    assert!(out.status.success());
    let t = text(&out);
    let key = t.lines().find_map(|l| l.strip_prefix("key: ")).unwrap();
    let hash = crate::support::test_app::sha256_hex(key);
    assert!(t.contains(&format!("sha256 = \"{hash}\"")), "{t}");
    assert!(t.contains("role = \"security\""));
}

/// The README's quick start: `latchkey dev`, a dev token, an exchange, a denial.
#[tokio::test]
async fn dev_mode_exchanges_a_dev_token_and_denies_another_repository() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["dev", "--listen", "127.0.0.1:0", "--policies", repo_path("policies").to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut banner = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            banner.push_str(&line);
            banner.push('\n');
            if line.starts_with("Press Ctrl-C") {
                let _ = tx.send(banner.clone());
            }
        }
    });
    let banner = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("latchkey dev printed its banner");
    let url = banner.lines().find_map(|l| l.strip_prefix("latchkey dev is running at ")).unwrap().trim().to_owned();
    let admin_key =
        banner.lines().find_map(|l| l.trim().strip_prefix("export LATCHKEY_ADMIN_KEY=")).unwrap().to_owned();

    let mint = |claims: serde_json::Value| {
        let out = Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args(["dev", "token", "--url", &url, "--claims", &claims.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let client = reqwest::Client::new();
    let exchange = |token: String| {
        client.post(format!("{url}/v1/token")).form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange".to_string()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt".to_string()),
            ("subject_token", token),
            ("scope", "pr-review".to_string()),
        ])
    };
    let ok = answer(
        exchange(mint(json!({"repository": "acme/widgets", "event_name": "pull_request", "ref": "refs/pull/7/merge"})))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let denied = answer(exchange(mint(json!({"repository": "acme/widgets-evil"}))).send().await.unwrap()).await;
    let audit =
        answer(client.get(format!("{url}/v1/audit?limit=100")).bearer_auth(&admin_key).send().await.unwrap()).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert_eq!(ok.body["credentials"][0]["backend"], "jwt");
    assert_eq!(denied.status, StatusCode::FORBIDDEN, "{}", denied.text);
    assert_eq!(audit.status, StatusCode::OK);
    assert!(audit.text.contains("exchange.denied"), "{}", audit.text);
}

#[test]
fn serve_refuses_an_unmigrated_store_until_migrate_runs() {
    let dir = tempfile::tempdir().unwrap();
    assert!(latchkey(&["init", "."], dir.path()).status.success());
    // Listen on a free port so that a serve that wrongly starts cannot collide with anything.
    let path = dir.path().join("latchkey.toml");
    let config = std::fs::read_to_string(&path)
        .unwrap()
        .replace("0.0.0.0:8443", "127.0.0.1:0")
        .replace("127.0.0.1:9090", "127.0.0.1:0");
    std::fs::write(&path, config).unwrap();
    let out = latchkey(&["serve"], dir.path());
    assert!(!out.status.success());
    assert!(text(&out).contains("latchkey migrate"), "{}", text(&out));
    let out = latchkey(&["migrate"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(latchkey(&["migrate"], dir.path()).status.success(), "migrate is idempotent");
}
