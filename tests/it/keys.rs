//! Key rotation without downtime (the sealing key, the jwt signing key, GitHub App keys, admin
//! keys) and backup and restore of the ledger, through HTTP, the CLI and restarts.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use latchkey::app::ManualClock;
use latchkey::ledger::{Reseal, SealedKind};
use latchkey::seal::Sealer;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::github::{APP_ID, GithubDouble};
use crate::support::test_app::{
    ADMIN_KEY, AUDITOR_KEY, SECURITY_KEY, SERVICE_KEY, TestApp, policy_head, repo_path, sha256_hex,
};

fn pr_claims() -> Value {
    json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" })
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap();
    serde_json::from_slice::<Value>(&header).unwrap()["kid"].as_str().unwrap().to_owned()
}

async fn jwks_kids(t: &TestApp) -> Vec<String> {
    let jwks = t.get("/.well-known/jwks.json", None).await.body;
    jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap().to_owned()).collect()
}

/// Verifies a latchkey JWT with the broker's JWKS as a service would: by its `kid`.
async fn verifies_with_jwks(t: &TestApp, token: &str) -> bool {
    let jwks = t.get("/.well-known/jwks.json", None).await.body;
    let Some(jwk) = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid_of(token)) else {
        return false;
    };
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["https://review.internal.example"]);
    jsonwebtoken::decode::<Value>(token, &key, &validation).is_ok()
}

async fn jwt_exchange(t: &TestApp) -> String {
    let a = t.exchange(&t.token(pr_claims()), "pr-review").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.body["access_token"].as_str().unwrap().to_owned()
}

async fn metric(t: &TestApp, name: &str) -> Option<f64> {
    let text = t.get("/metrics", None).await.text;
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

async fn cli(t: &TestApp, key: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
    c.args(args).env("LATCHKEY_URL", &t.url).env("RUST_LOG", "warn").env_remove("LATCHKEY_ADMIN_KEY");
    c.current_dir(t.dir.path());
    if let Some(k) = key {
        c.env("LATCHKEY_ADMIN_KEY", k);
    }
    let out = c.output().await.unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn a_rotated_jwt_key_signs_after_its_delay_and_the_old_one_stays_published_until_its_tokens_expired() {
    let t = TestApp::builder().no_background().start().await;
    let before = jwt_exchange(&t).await;
    let old_kid = kid_of(&before);
    assert_eq!(jwks_kids(&t).await, [old_kid.as_str()]);

    // Only an admin rotates; an auditor may look.
    let refused = t.post_json("/v1/signing-keys/rotate", Some(SECURITY_KEY), &json!({})).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text);
    let r = t.post_json("/v1/signing-keys/rotate", Some(ADMIN_KEY), &json!({})).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let new_kid = r.body["key"]["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    assert_eq!(r.body["key"]["state"], "next", "published first, signing later: {}", r.text);
    assert!(!r.text.contains("\"d\""), "no private key in the answer: {}", r.text);
    let rotated = t.events("signing_key.rotated").await;
    assert_eq!(rotated.len(), 1);
    assert_eq!(rotated[0]["actor"], "admin-key:test-admin");
    assert_eq!(rotated[0]["detail"]["previous_kid"], json!(old_kid));

    // Both keys are published at once; the old one still signs until every cached JWKS lists
    // the new one.
    assert_eq!(jwks_kids(&t).await, [old_kid.as_str(), new_kid.as_str()]);
    assert_eq!(kid_of(&jwt_exchange(&t).await), old_kid);
    t.clock.advance(latchkey::backend::jwt::ACTIVATION_DELAY + chrono::Duration::seconds(1));
    let after = jwt_exchange(&t).await;
    assert_eq!(kid_of(&after), new_kid, "the new key signs from its signs_from on");

    // A token signed before the rotation still verifies with the JWKS, and introspects.
    assert!(verifies_with_jwks(&t, &before).await);
    assert!(verifies_with_jwks(&t, &after).await);
    let i = t.post_form("/v1/introspect", Some(SERVICE_KEY), &[("token", before.as_str())]).await;
    assert_eq!(i.body["active"], true, "{}", i.text);
    let list = t.get("/v1/signing-keys", Some(AUDITOR_KEY)).await;
    assert_eq!(list.status, StatusCode::OK);
    let states: Vec<_> = list.body["items"].as_array().unwrap().iter().map(|k| k["state"].clone()).collect();
    assert_eq!(states, [json!("retiring"), json!("signing")], "{}", list.text);

    // Until every token the old key signed has expired: the longest TTL, 12 h, and a margin.
    t.clock.advance(chrono::Duration::hours(12));
    assert_eq!(jwks_kids(&t).await, [old_kid.as_str(), new_kid.as_str()]);
    t.clock.advance(chrono::Duration::minutes(6));
    assert_eq!(jwks_kids(&t).await, [new_kid.as_str()], "the old kid is gone once its tokens expired");

    // The rotation is in the ledger: after a restart the new key signs and the old one stays gone.
    let t = t.restart().await;
    assert_eq!(jwks_kids(&t).await, [new_kid.as_str()]);
    assert_eq!(kid_of(&jwt_exchange(&t).await), new_kid);
}

#[tokio::test]
async fn a_replica_picks_up_a_key_another_replica_created_and_the_cli_rotates_and_lists() {
    let t = TestApp::builder().no_background().start().await;
    let old_kid = kid_of(&jwt_exchange(&t).await);
    // Another replica on the same store rotates (here: a second key set on the same ledger).
    t.clock.advance(chrono::Duration::seconds(1));
    let now = latchkey::app::Clock::now(&*t.clock);
    let sealer = Sealer::from_bytes(&[9; 32]);
    let other =
        latchkey::backend::jwt::JwtBackend::load_or_create(&*t.app.ledger, &sealer, "https://latchkey.test", now)
            .await
            .unwrap();
    let view = other.rotate(&*t.app.ledger, &sealer, now, "admin-key:other", None).await.unwrap();
    assert_eq!(jwks_kids(&t).await, [old_kid.as_str()], "not read yet");
    // This replica's periodic refresh reads it: published now, signing after the delay.
    latchkey::keys::refresh_signing_keys(&t.app).await.unwrap();
    assert_eq!(jwks_kids(&t).await, [old_kid.as_str(), view.kid.as_str()]);
    t.clock.advance(latchkey::backend::jwt::ACTIVATION_DELAY);
    assert_eq!(kid_of(&jwt_exchange(&t).await), view.kid);

    // The CLI: an auditor lists, only an admin rotates.
    let (ok, out) = cli(&t, Some(AUDITOR_KEY), &["signing-key"]).await;
    assert!(ok && out.starts_with("KID") && out.contains(&view.kid) && out.contains("signing"), "{out}");
    let (ok, out) = cli(&t, Some(AUDITOR_KEY), &["signing-key", "rotate"]).await;
    assert!(!ok && out.contains("admin"), "{out}");
    let (ok, out) = cli(&t, Some(ADMIN_KEY), &["signing-key", "rotate", "--json"]).await;
    assert!(ok, "{out}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["key"]["state"], "next");
    assert_eq!(answer["items"].as_array().unwrap().len(), 3);
}

/// `[sealing]` naming `current` and `previous` key files in the test folder.
fn sealing(current: &str, previous: &[&str]) -> String {
    let previous: Vec<String> = previous.iter().map(|p| format!("\"{p}\"")).collect();
    format!("\n[sealing]\nkey_file = \"{current}\"\nprevious_key_files = [{}]\n", previous.join(", "))
}

fn set_sealing(dir: &Path, text: &str) {
    let path = dir.join("latchkey.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    let start = config.find("\n[sealing]").unwrap();
    let end = config[start + 1..].find("\n[").map_or(config.len(), |i| start + 1 + i);
    std::fs::write(&path, format!("{}{text}{}", &config[..start], &config[end..])).unwrap();
}

/// The key id of every sealed blob in the store, read straight from it.
async fn stored_key_ids(t: &TestApp) -> Vec<String> {
    let rows = t
        .store()
        .query(
            "SELECT handle FROM credentials WHERE handle IS NOT NULL UNION ALL SELECT sealed_private FROM signing_keys",
        )
        .await;
    rows.iter()
        .map(|r| Sealer::key_id_of(&hex::decode(r[0].as_str().expect("bytes, as hex")).unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn a_new_sealing_key_reseals_every_blob_so_the_old_key_can_go() {
    let clock = ManualClock::new(Utc::now());
    let gh = GithubDouble::start(clock.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (dir.path().join("a.key"), dir.path().join("b.key"));
    latchkey::seal::generate_key_file(&key_a).unwrap();
    latchkey::seal::generate_key_file(&key_b).unwrap();
    let (id_a, id_b) = (Sealer::load(&key_a, &[]).unwrap().key_id(), Sealer::load(&key_b, &[]).unwrap().key_id());
    let mut builder = TestApp::builder().clock(clock).no_background().sealing_from_config();
    if let Some(gh) = &gh {
        let policy = format!(
            "{}[[grant]]\nname = \"code\"\nbackend = \"github\"\nowner = \"acme\"\nrepositories = [\"widgets\"]\n\
             permissions = {{ contents = \"read\" }}\n",
            policy_head("pr-reviewer", "15m")
        );
        builder = builder.config(&gh.config("default")).policy("code.toml", &policy);
    } else {
        eprintln!("the GitHub part is skipped: no GitHub OpenAPI description");
    }
    // The test folder is made by the builder: the keys go in after, through absolute paths.
    let a = key_a.display().to_string();
    let b = key_b.display().to_string();
    let t = builder.config(&sealing(&a, &[])).start().await;

    let gh_credential = match &gh {
        Some(_) => {
            let r = t.exchange(&t.token(json!({})), "code").await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            Some((r.body["credentials"][0]["id"].as_str().unwrap().to_owned(), r.body["access_token"].clone()))
        }
        None => None,
    };
    let kid = kid_of(&jwt_exchange(&t).await);
    let blobs = if gh.is_some() { 2 } else { 1 };
    assert_eq!(stored_key_ids(&t).await, vec![id_a.clone(); blobs]);

    // Rotate: B current, A previous. Start-up runs the re-seal pass.
    set_sealing(t.dir.path(), &sealing(&b, &[&a]));
    let t = t.restart().await;
    assert_eq!(stored_key_ids(&t).await, vec![id_b.clone(); blobs], "every blob is under B now");
    let events = t.events("sealing.resealed").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0]["detail"],
        json!({ "key_id": id_b, "credentials": blobs - 1, "signing_keys": 1, "skipped": 0 })
    );
    assert_eq!(metric(&t, "latchkey_sealed_blobs_not_current").await, Some(0.0));
    // Idempotent: another pass (another replica, the next minute) changes and records nothing.
    let again = latchkey::keys::reseal(&t.app).await.unwrap();
    assert_eq!((again.resealed.changed(), again.remaining), (0, 0));
    assert_eq!(t.events("sealing.resealed").await.len(), 1);
    // Compare-and-set: a re-seal of a blob that changed since it was read is skipped.
    let stale = Reseal { kind: SealedKind::SigningKey, id: kid.clone(), old: vec![1, 2, 3], new: vec![4, 5, 6] };
    let count = t.app.ledger.reseal(vec![stale], &id_b, Utc::now()).await.unwrap();
    assert_eq!((count.changed(), count.skipped), (0, 1));
    assert_eq!(t.events("sealing.resealed").await.len(), 1, "nothing changed, nothing recorded");

    // Drop A: everything still opens. The jwt key signs; the GitHub token can be revoked.
    set_sealing(t.dir.path(), &sealing(&b, &[]));
    let t = t.restart().await;
    assert_eq!(kid_of(&jwt_exchange(&t).await), kid, "the same signing key, opened with B");
    if let (Some(gh), Some((id, token))) = (&gh, gh_credential) {
        let r = t.post_json(&format!("/v1/credentials/{id}/revoke"), Some(SECURITY_KEY), &json!({})).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        latchkey::worker::run_jobs(&t.app).await.unwrap();
        let issued = gh.token(token.as_str().unwrap()).unwrap();
        assert!(issued.revoked, "revoked at GitHub with the handle re-sealed under B");
        gh.assert_conforms();
    }
    let out = serde_json::to_string(&t.audit().await).unwrap();
    assert!(!out.contains(&std::fs::read_to_string(&key_a).unwrap().trim().to_owned()));
}

#[tokio::test]
async fn a_github_app_signs_with_its_new_key_and_falls_back_to_the_previous_one_while_github_refuses_it() {
    let clock = ManualClock::new(Utc::now());
    let Some(gh) = GithubDouble::start(clock.clone()).await else { return };
    // The new key is configured before its public half is uploaded to the app: GitHub still
    // knows only the old one.
    let config = format!(
        "[[backends.github]]\nid = \"default\"\napp_id = {APP_ID}\nprivate_key_file = \"{}\"\n\
         previous_private_key_files = [\"{}\"]\napi_url = \"{}\"\n",
        repo_path("tests/fixtures/github-app-other.pem").display(),
        repo_path("tests/fixtures/github-app-pkcs1.pem").display(),
        gh.url
    );
    let policy = format!(
        "{}[[grant]]\nname = \"code\"\nbackend = \"github\"\nowner = \"acme\"\nrepositories = [\"widgets\"]\n\
         permissions = {{ contents = \"read\" }}\n",
        policy_head("pr-reviewer", "15m")
    );
    let t = TestApp::builder().clock(clock).no_background().config(&config).policy("code.toml", &policy).start().await;
    let r = t.exchange(&t.token(json!({})), "code").await;
    assert_eq!(r.status, StatusCode::OK, "the previous key still works: {}", r.text);
    assert!(gh.log().iter().any(|l| l.ends_with(" 401")), "the new key was tried first: {:?}", gh.log());
    let used = "latchkey_github_app_previous_key_used_total{app=\"default\"}";
    let fallbacks = metric(&t, used).await.unwrap_or(0.0);
    assert!(fallbacks >= 1.0, "counted: {fallbacks}");

    // The new key is uploaded: once the cached app JWT is due, the first key signs and works.
    gh.set_app_key(APP_ID, "github-app-other.pub.pem", false);
    t.clock.advance(chrono::Duration::minutes(8));
    let seen = gh.log().len();
    let r = t.exchange(&t.token(json!({})), "code").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(!gh.log()[seen..].iter().any(|l| l.ends_with(" 401")), "{:?}", gh.log());
    assert_eq!(metric(&t, used).await.unwrap_or(0.0), fallbacks, "no fallback any more");

    // The old key is removed from the app: the previous key is no longer needed, and a broker
    // with only the old key is refused.
    gh.set_app_key(APP_ID, "github-app-other.pub.pem", true);
    t.clock.advance(chrono::Duration::minutes(8));
    let r = t.exchange(&t.token(json!({})), "code").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    gh.assert_conforms();
    let text = t.get("/metrics", None).await.text;
    assert!(!text.contains("PRIVATE KEY"));
}

#[tokio::test]
async fn an_admin_key_is_rotated_by_adding_the_new_one_then_removing_the_old_one() {
    let t = TestApp::builder().no_background().start().await;
    let path = t.dir.path().join("latchkey.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let new_key = "lk_test_rotated_admin";
    let new_entry =
        format!("\n[[admin_key]]\nname = \"test-admin-2\"\nrole = \"admin\"\nsha256 = \"{}\"\n", sha256_hex(new_key));
    // 1. Add the new key and reload: old and new both work.
    std::fs::write(&path, format!("{original}{new_entry}")).unwrap();
    assert!(latchkey::worker::reload_admin_keys(&t.app).await);
    for key in [ADMIN_KEY, new_key] {
        assert_eq!(t.get("/v1/signing-keys", Some(key)).await.status, StatusCode::OK, "{key}");
    }
    // 2. Remove the old key and reload: the old one is refused, the new one works.
    let without_old = original.replace(
        &format!("[[admin_key]]\nname = \"test-admin\"\nrole = \"admin\"\nsha256 = \"{}\"\n", sha256_hex(ADMIN_KEY)),
        "",
    );
    assert_ne!(without_old, original);
    std::fs::write(&path, format!("{without_old}{new_entry}")).unwrap();
    assert!(latchkey::worker::reload_admin_keys(&t.app).await);
    assert_eq!(t.get("/v1/signing-keys", Some(ADMIN_KEY)).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(t.get("/v1/signing-keys", Some(new_key)).await.status, StatusCode::OK);
    let reloads = t.get("/v1/audit?event=admin.keys_reloaded", Some(new_key)).await;
    assert_eq!(reloads.body["items"].as_array().unwrap().len(), 2, "{}", reloads.text);
}

#[tokio::test]
async fn a_sqlite_backup_taken_under_writes_restores_into_a_broker_whose_chain_verifies() {
    let t = TestApp::builder().checkpoint_key().start().await;
    for _ in 0..3 {
        jwt_exchange(&t).await;
    }
    let c = t.post_json("/v1/audit/checkpoints", Some(ADMIN_KEY), &json!({})).await;
    assert!(c.status.is_success(), "{}", c.text);
    // Writes go on while the copy is taken.
    let writer = {
        let (url, client, tokens) =
            (t.url.clone(), t.client.clone(), (0..40).map(|_| t.token(pr_claims())).collect::<Vec<_>>());
        tokio::spawn(async move {
            for token in tokens {
                let form = [
                    ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                    ("subject_token", token.as_str()),
                    ("scope", "pr-review"),
                ];
                let r = client.post(format!("{url}/v1/token")).form(&form).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
            }
        })
    };
    let (ok, out) = cli(&t, None, &["backup", "--config", "latchkey.toml", "--to", "backup.db"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("backed up") && out.contains("audit verify --store sqlite://"), "{out}");
    writer.await.unwrap();
    let (ok, out) = cli(&t, None, &["backup", "--config", "latchkey.toml", "--to", "backup.db"]).await;
    assert!(!ok && out.contains("never overwrites"), "{out}");

    // Restore = copy the file into a new place and start a broker on it.
    let restored = tempfile::tempdir().unwrap();
    std::fs::copy(t.dir.path().join("backup.db"), restored.path().join("latchkey.db")).unwrap();
    let store = format!("sqlite://{}", restored.path().join("latchkey.db").display());
    let key = ["--key-file", "checkpoint.key"];
    let (ok, out) = cli(&t, None, &[&["audit", "verify", "--store", &store][..], &key].concat()).await;
    assert!(ok && out.contains("audit chain OK") && out.contains("1 checkpoint(s) agree"), "{out}");
    let copied_config = std::fs::read_to_string(t.dir.path().join("latchkey.toml")).unwrap();
    let policies = t.dir.path().join("policies").display().to_string();
    let config = copied_config.replace("dir = \"policies\"", &format!("dir = \"{policies}\""));
    std::fs::write(restored.path().join("latchkey.toml"), config).unwrap();
    std::fs::copy(t.dir.path().join("checkpoint.key"), restored.path().join("checkpoint.key")).unwrap();
    let config = latchkey::config::Config::load(&restored.path().join("latchkey.toml")).unwrap();
    let app = latchkey::server::build(
        config,
        latchkey::server::Options {
            clock: t.clock.clone(),
            migrate: false,
            dev_issuer: None,
            sealer: Some(Sealer::from_bytes(&[9; 32])),
            backends: Vec::new(),
        },
    )
    .await
    .unwrap();
    let running = latchkey::server::start(app, None, false).await.unwrap();
    let listed = t
        .client
        .get(format!("{}/v1/credentials?limit=1000", running.url()))
        .bearer_auth(AUDITOR_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    let body: Value = listed.json().await.unwrap();
    let n = body["items"].as_array().unwrap().len();
    assert!(n >= 3, "the restored ledger answers listings: {n} credentials");
    let verify =
        t.client.get(format!("{}/v1/audit/verify", running.url())).bearer_auth(AUDITOR_KEY).send().await.unwrap();
    assert_eq!(verify.status(), StatusCode::OK, "{}", verify.text().await.unwrap());
    running.shutdown().await;
    let (ok, out) = cli(&t, None, &[&["audit", "verify", "--store", &store][..], &key].concat()).await;
    assert!(ok && out.contains("audit chain OK"), "still whole after the broker wrote to it: {out}");
}

#[tokio::test]
async fn a_postgres_store_dumped_with_pg_dump_restores_into_another_schema_whose_chain_verifies() {
    let Some(base) = crate::support::peers::peer_var("LATCHKEY_TEST_PG_URL", "PostgreSQL") else { return };
    use sqlx::Connection;
    let (from, to) = (format!("lk_{}", uuid::Uuid::new_v4().simple()), format!("lk_{}", uuid::Uuid::new_v4().simple()));
    let mut conn = sqlx::PgConnection::connect(&base).await.expect("the PostgreSQL peer answers");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {from}"))).execute(&mut conn).await.unwrap();
    let from_url = format!("{base}?options[search_path]={from}");
    let settings = latchkey::ledger::postgres::Settings::default();
    {
        let ledger = latchkey::ledger::open(&from_url, true, &settings).await.unwrap();
        let sealer = Sealer::from_bytes(&[9; 32]);
        latchkey::backend::jwt::JwtBackend::load_or_create(&*ledger, &sealer, "https://latchkey.test", Utc::now())
            .await
            .unwrap();
        for i in 0..20 {
            let mut e = latchkey::audit::AuditEvent::new("test.event", Utc::now());
            e.reason = Some(format!("event {i}"));
            ledger.append_event(e).await.unwrap();
        }
    }
    // pg_dump the schema, restore it under another name with psql.
    let dump = std::process::Command::new("pg_dump")
        .args(["--no-owner", "--no-privileges", "--schema", &from, &base])
        .output()
        .expect("pg_dump runs");
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let sql = String::from_utf8(dump.stdout).unwrap().replace(&from, &to);
    let restore = {
        use std::io::Write;
        let mut child = std::process::Command::new("psql")
            .args(["--quiet", "--set", "ON_ERROR_STOP=1", &base])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql runs");
        child.stdin.take().unwrap().write_all(sql.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(restore.status.success(), "{}", String::from_utf8_lossy(&restore.stderr));

    let to_url = format!("{base}?options[search_path]={to}");
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("checkpoint.key");
    latchkey::checkpoint::generate_key_file(&key_file).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["audit", "verify", "--store", &to_url, "--key-file"])
        .arg(&key_file)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("audit chain OK"), "{text}");
    // The restored store serves: a ledger opens on it (schema checked) and reads what was copied.
    let restored = latchkey::ledger::open(&to_url, false, &settings).await.unwrap();
    assert_eq!(restored.audit_head().await.unwrap().0, 21);
    assert_eq!(restored.signing_keys().await.unwrap().len(), 1);
    // The PostgreSQL store re-seals compare-and-set too: the second of two racing replicas
    // finds the blob changed and writes nothing.
    let blob = restored.sealed_blobs(None, 10).await.unwrap().remove(0);
    assert_eq!(blob.kind, SealedKind::SigningKey);
    let rotated = Sealer::from_bytes(&[7; 32]);
    let opened = Sealer::from_bytes(&[9; 32]).open(&latchkey::backend::jwt::key_aad(&blob.id), &blob.blob).unwrap();
    let new = rotated.seal(&latchkey::backend::jwt::key_aad(&blob.id), &opened);
    let reseal = Reseal { kind: blob.kind, id: blob.id.clone(), old: blob.blob.clone(), new: new.clone() };
    let first = restored.reseal(vec![reseal.clone()], &rotated.key_id(), Utc::now()).await.unwrap();
    let second = restored.reseal(vec![reseal], &rotated.key_id(), Utc::now()).await.unwrap();
    assert_eq!((first.signing_keys, first.skipped, second.changed(), second.skipped), (1, 0, 0, 1));
    assert_eq!(restored.sealed_blobs(None, 10).await.unwrap()[0].blob, new);
    assert_eq!(restored.audit_head().await.unwrap().0, 22, "one sealing.resealed event");
    // And `latchkey backup` points PostgreSQL users at pg_dump.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["backup", "--store", &to_url, "--to", "/nonexistent/x"])
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("pg_dump"));
    for schema in [from, to] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&mut conn).await.unwrap();
    }
}

fn jti_of(token: &str) -> String {
    use base64::Engine;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap();
    serde_json::from_slice::<Value>(&claims).unwrap()["jti"].as_str().unwrap().to_owned()
}

async fn introspects_active(t: &TestApp, url: &str, token: &str) -> bool {
    let r = t.client.post(format!("{url}/v1/introspect")).bearer_auth(SERVICE_KEY).form(&[("token", token)]);
    let a = crate::support::test_app::answer(r.send().await.unwrap()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.body["active"] == json!(true)
}

async fn credential_state(t: &TestApp, id: &str) -> String {
    let state = t.store().scalar(&format!("SELECT state FROM credentials WHERE id = '{id}'")).await;
    state.as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_leaked_jwt_key_is_retired_at_once_and_a_replacement_signs_at_once() {
    let t = TestApp::builder().no_background().start().await;
    let leaked = jwt_exchange(&t).await;
    let kid = kid_of(&leaked);
    let other = jwt_exchange(&t).await;
    assert!(introspects_active(&t, &t.url, &leaked).await);
    // A replica that read the keys before the retirement (a second key set on the same ledger).
    let now = latchkey::app::Clock::now(&*t.clock);
    let replica = latchkey::backend::jwt::JwtBackend::load_or_create(
        &*t.app.ledger,
        &Sealer::from_bytes(&[9; 32]),
        "https://latchkey.test",
        now,
    )
    .await
    .unwrap();

    // Only an admin retires, a reason is required, an unknown kid is 404; none of these changes
    // anything.
    let path = format!("/v1/signing-keys/{kid}/retire");
    let refused = t.post_json(&path, Some(SECURITY_KEY), &json!({ "reason": "leaked" })).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text);
    let unknown = t.post_json("/v1/signing-keys/nokey/retire", Some(ADMIN_KEY), &json!({ "reason": "x" })).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text);
    let empty = t.post_json(&path, Some(ADMIN_KEY), &json!({ "reason": " " })).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST, "{}", empty.text);
    assert_eq!(jwks_kids(&t).await, [kid.as_str()]);
    assert!(t.events("signing_key.retired").await.is_empty());

    // Retired: the only key signed, so a new one is made in the same action and signs at once.
    let r = t.post_json(&path, Some(ADMIN_KEY), &json!({ "reason": "printed in a build log" })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(!r.text.contains("\"d\""), "no private key in the answer: {}", r.text);
    let retired = &r.body["retired"];
    assert_eq!(retired["kid"], json!(kid));
    assert_eq!(retired["credentials_revoked"], 2, "{}", r.text);
    let new_kid = retired["replacement"]["kid"].as_str().unwrap().to_owned();
    assert_eq!(retired["replacement"]["state"], "signing", "{}", r.text);
    let states: Vec<_> = r.body["items"].as_array().unwrap().iter().map(|k| k["kid"].clone()).collect();
    assert_eq!(states, [json!(new_kid)], "the leaked key is no longer listed: {}", r.text);

    // Out of the JWKS, inactive at introspection, and the next token is signed by the new key,
    // here at once: no clock moved.
    assert_eq!(jwks_kids(&t).await, [new_kid.as_str()]);
    assert!(!verifies_with_jwks(&t, &leaked).await);
    assert!(!introspects_active(&t, &t.url, &leaked).await);
    assert!(!introspects_active(&t, &t.url, &other).await);
    let next = jwt_exchange(&t).await;
    assert_eq!(kid_of(&next), new_kid);
    assert!(verifies_with_jwks(&t, &next).await);
    assert!(introspects_active(&t, &t.url, &next).await);

    // The ledger says so, for every replica: both credentials revoked, each with its event.
    for token in [&leaked, &other] {
        assert_eq!(credential_state(&t, &jti_of(token)).await, "revoked");
    }
    let events = t.events("signing_key.retired").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["actor"], "admin-key:test-admin");
    assert_eq!(events[0]["reason"], "printed in a build log");
    assert_eq!(events[0]["detail"]["kid"], json!(kid));
    assert_eq!(events[0]["detail"]["replacement_kid"], json!(new_kid));
    assert_eq!(events[0]["detail"]["credentials_revoked"], 2);
    let revoked = t.events("credential.revoked").await;
    let ids: Vec<_> = revoked.iter().map(|e| e["credential_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, [jti_of(&leaked), jti_of(&other)]);
    assert!(revoked.iter().all(|e| e["detail"]["signing_key_retired"] == json!(kid) && e["backend"] == "jwt"));

    // Another replica publishes and signs with the leaked key until its next refresh, no longer.
    assert!(replica.jwks(now)["keys"].as_array().unwrap().iter().any(|k| k["kid"] == json!(kid)));
    replica.refresh(&*t.app.ledger, &Sealer::from_bytes(&[9; 32]), now).await.unwrap();
    let kids: Vec<_> = replica.jwks(now)["keys"].as_array().unwrap().iter().map(|k| k["kid"].clone()).collect();
    assert_eq!(kids, [json!(new_kid)]);
    assert!(replica.verify(&leaked, now).is_none());

    // Once only; and it stays retired across a restart.
    let again = t.post_json(&path, Some(ADMIN_KEY), &json!({ "reason": "again" })).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text);
    let t = t.restart().await;
    assert_eq!(jwks_kids(&t).await, [new_kid.as_str()]);
    assert_eq!(kid_of(&jwt_exchange(&t).await), new_kid);
    assert!(!introspects_active(&t, &t.url, &leaked).await);
}

#[tokio::test]
async fn retiring_a_key_that_does_not_sign_leaves_the_signing_key_alone() {
    let t = TestApp::builder().no_background().start().await;
    let first = jwt_exchange(&t).await;
    let signing = kid_of(&first);
    let r = t.post_json("/v1/signing-keys/rotate", Some(ADMIN_KEY), &json!({})).await;
    let next = r.body["key"]["kid"].as_str().unwrap().to_owned();
    assert_eq!(jwks_kids(&t).await, [signing.as_str(), next.as_str()]);
    // The next key leaked before it ever signed: it goes, the signing key signs on, and no
    // credential is touched (it signed none).
    let token = jwt_exchange(&t).await;
    let r = t.post_json(&format!("/v1/signing-keys/{next}/retire"), Some(ADMIN_KEY), &json!({ "reason": "r" })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["retired"]["replacement"], Value::Null, "{}", r.text);
    assert_eq!(r.body["retired"]["credentials_revoked"], 0);
    assert_eq!(jwks_kids(&t).await, [signing.as_str()]);
    assert!(introspects_active(&t, &t.url, &token).await);
    // Nor does it ever sign later.
    t.clock.advance(latchkey::backend::jwt::ACTIVATION_DELAY + chrono::Duration::seconds(1));
    let later = jwt_exchange(&t).await;
    assert_eq!(kid_of(&later), signing);

    // A key superseded by a rotation leaked: it goes with the tokens it signed; the tokens of
    // the key that took over stay good.
    let r = t.post_json("/v1/signing-keys/rotate", Some(ADMIN_KEY), &json!({})).await;
    let newer = r.body["key"]["kid"].as_str().unwrap().to_owned();
    let old_token = jwt_exchange(&t).await;
    t.clock.advance(latchkey::backend::jwt::ACTIVATION_DELAY + chrono::Duration::seconds(1));
    let new_token = jwt_exchange(&t).await;
    assert_eq!((kid_of(&old_token), kid_of(&new_token)), (signing.clone(), newer.clone()));
    let r =
        t.post_json(&format!("/v1/signing-keys/{signing}/retire"), Some(ADMIN_KEY), &json!({ "reason": "r" })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["retired"]["replacement"], Value::Null, "{}", r.text);
    assert_eq!(r.body["retired"]["credentials_revoked"], 4, "the four live tokens it signed: {}", r.text);
    assert_eq!(jwks_kids(&t).await, [newer.as_str()]);
    for token in [&first, &token, &later, &old_token] {
        assert!(!introspects_active(&t, &t.url, token).await);
        assert_eq!(credential_state(&t, &jti_of(token)).await, "revoked");
    }
    assert!(introspects_active(&t, &t.url, &new_token).await);
    assert_eq!(credential_state(&t, &jti_of(&new_token)).await, "active");
    assert_eq!(kid_of(&jwt_exchange(&t).await), newer);
}

#[tokio::test]
async fn the_cli_retires_a_signing_key_and_refuses_an_unknown_one_or_a_low_role() {
    let t = TestApp::builder().no_background().start().await;
    let kid = kid_of(&jwt_exchange(&t).await);
    let (ok, out) = cli(&t, Some(SECURITY_KEY), &["signing-key", "retire", &kid, "--reason", "leak"]).await;
    assert!(!ok && out.contains("admin"), "{out}");
    let (ok, out) = cli(&t, Some(ADMIN_KEY), &["signing-key", "retire", "no-such-kid", "--reason", "leak"]).await;
    assert!(!ok && out.contains("404") && out.contains("no signing key"), "{out}");
    // A base64url thumbprint may begin with `-`: it is still the key id, never an option.
    let (ok, out) = cli(&t, Some(ADMIN_KEY), &["signing-key", "retire", "-nQ2x_no-such-kid", "--reason", "leak"]).await;
    assert!(!ok && out.contains("404") && out.contains("no signing key"), "{out}");
    let (ok, out) = cli(&t, Some(ADMIN_KEY), &["signing-key", "retire", "../rotate", "--reason", "leak"]).await;
    assert!(!ok && out.contains("not a signing key id"), "{out}");
    assert_eq!(jwks_kids(&t).await, [kid.as_str()], "nothing changed");

    let (ok, out) = cli(&t, Some(ADMIN_KEY), &["signing-key", "retire", &kid, "--reason", "leak"]).await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("signing key {kid} retired")) && out.contains("1 credential(s) revoked"), "{out}");
    let new_kid = jwks_kids(&t).await.remove(0);
    assert_ne!(new_kid, kid);
    assert!(out.contains(&format!("new signing key {new_kid} signs now")), "{out}");
    assert_eq!(kid_of(&jwt_exchange(&t).await), new_kid);
    let (ok, out) = cli(&t, Some(ADMIN_KEY), &["signing-key", "retire", &kid, "--reason", "leak", "--json"]).await;
    assert!(!ok && out.contains("already retired"), "{out}");
}

/// A second broker on `a`'s store, with no background loops, and its address; `None` (the test
/// skips) unless the store is PostgreSQL, the only one two processes can share.
async fn second_replica(a: &TestApp) -> Option<(latchkey::app::AppState, latchkey::server::Running)> {
    if crate::support::store::kind() != crate::support::store::Kind::Postgres {
        eprintln!("skipped: two replicas need the PostgreSQL store (LATCHKEY_TEST_STORE=postgres runs it)");
        return None;
    }
    let config = latchkey::config::Config::load(&a.dir.path().join("latchkey.toml")).unwrap();
    let b = latchkey::server::build(
        config,
        latchkey::server::Options {
            clock: a.clock.clone(),
            migrate: false,
            dev_issuer: None,
            sealer: Some(Sealer::from_bytes(&[9; 32])),
            backends: Vec::new(),
        },
    )
    .await
    .unwrap();
    let running = latchkey::server::start(b.clone(), None, false).await.unwrap();
    Some((b, running))
}

/// A `jwt` exchange at the broker at `url`, with a token of `a`'s issuer; the token it got.
async fn jwt_exchange_at(a: &TestApp, url: &str) -> String {
    let token = a.token(pr_claims());
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("subject_token", token.as_str()),
        ("scope", "pr-review"),
    ];
    let r = a.client.post(format!("{url}/v1/token")).form(&form).send().await.unwrap();
    let answer = crate::support::test_app::answer(r).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    answer.body["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_second_replica_stops_signing_with_a_retired_key_at_its_next_refresh() {
    let a = TestApp::builder().no_background().start().await;
    let Some((b, running)) = second_replica(&a).await else { return };
    let b_url = running.url();
    let exchange_at_b = async || jwt_exchange_at(&a, &b_url).await;
    let kid = kid_of(&jwt_exchange(&a).await);
    let from_b = exchange_at_b().await;
    assert_eq!(kid_of(&from_b), kid, "one key, shared by the replicas");

    let r = a.post_json(&format!("/v1/signing-keys/{kid}/retire"), Some(ADMIN_KEY), &json!({ "reason": "leak" })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let new_kid = r.body["retired"]["replacement"]["kid"].as_str().unwrap().to_owned();
    // The credential B issued is revoked in the store: B's introspection says so at once.
    assert!(!introspects_active(&a, &b_url, &from_b).await);
    // Until its refresh (every 10 s), B still has the old key set; then it drops the leaked key
    // and signs with the replacement.
    assert_eq!(kid_of(&exchange_at_b().await), kid);
    latchkey::keys::refresh_signing_keys(&b).await.unwrap();
    let after = exchange_at_b().await;
    assert_eq!(kid_of(&after), new_kid);
    let jwks: Value =
        a.client.get(format!("{b_url}/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    let kids: Vec<_> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].clone()).collect();
    assert_eq!(kids, [json!(new_kid)]);
    assert!(introspects_active(&a, &b_url, &after).await);
    assert!(introspects_active(&a, &a.url, &after).await, "A verifies what B signed with the replacement");
    running.shutdown().await;
}

/// The replica that retires a key announces it: every other replica re-reads its keys at once,
/// not at its next refresh (every 10 s), and stops signing with the retired key.
#[tokio::test]
async fn a_retirement_reaches_every_replica_at_once() {
    let a = TestApp::builder().no_background().start().await;
    let Some((b, running)) = second_replica(&a).await else { return };
    let b_url = running.url();
    // B's own key loop: it reads the keys when it starts, then every 10 s or when told to.
    let follower = tokio::spawn(latchkey::worker::follow_signing_keys(b.clone()));
    let kid = kid_of(&jwt_exchange_at(&a, &b_url).await);

    let r = a.post_json(&format!("/v1/signing-keys/{kid}/retire"), Some(ADMIN_KEY), &json!({ "reason": "leak" })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let new_kid = r.body["retired"]["replacement"]["kid"].as_str().unwrap().to_owned();
    let retired = Instant::now();
    loop {
        let jwks: Value =
            a.client.get(format!("{b_url}/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
        let kids: Vec<_> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].clone()).collect();
        if kids == [json!(new_kid)] {
            break;
        }
        assert!(
            retired.elapsed() < Duration::from_secs(3),
            "B still publishes {kids:?} 3 s after the retirement of {kid}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(kid_of(&jwt_exchange_at(&a, &b_url).await), new_kid);
    follower.abort();
    running.shutdown().await;
}

#[tokio::test]
async fn the_reseal_pass_reads_the_blobs_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (dir.path().join("a.key"), dir.path().join("b.key"));
    latchkey::seal::generate_key_file(&key_a).unwrap();
    latchkey::seal::generate_key_file(&key_b).unwrap();
    let id_b = Sealer::load(&key_b, &[]).unwrap().key_id();
    let (a, b) = (key_a.display().to_string(), key_b.display().to_string());
    // B is current from the start; the blobs below are sealed under A as an older broker did.
    let t = TestApp::builder().no_background().sealing_from_config().config(&sealing(&b, &[&a])).start().await;
    let under_a = Sealer::load(&key_a, std::slice::from_ref(&key_b)).unwrap();
    for _ in 0..5 {
        let c = t.record_crashed_intent(latchkey::policy::BackendKind::Github).await;
        let handle = latchkey::ledger::Handle {
            sealed: Some(under_a.seal(c.id.as_bytes(), b"ghs_handle")),
            fingerprint: "fp".into(),
            expires_at: c.expires_at,
        };
        t.app.ledger.record_handle(c.id, &handle).await.unwrap();
    }
    let now = latchkey::app::Clock::now(&*t.clock);
    let older = latchkey::backend::jwt::JwtBackend::load_or_create(&*t.app.ledger, &under_a, "https://x.test", now)
        .await
        .unwrap();
    for _ in 0..3 {
        older.rotate(&*t.app.ledger, &under_a, now, "admin-key:older", None).await.unwrap();
    }

    // Paged by (kind, id): 5 handles and 4 keys in pages of 2, one page crossing from handles
    // to keys, every blob exactly once.
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = t.app.ledger.sealed_blobs(after.as_ref(), 2).await.unwrap();
        after = page.last().map(latchkey::ledger::SealedBlob::cursor);
        let last = page.len() < 2;
        pages.push(page.iter().map(|b| (b.kind, b.id.clone())).collect::<Vec<_>>());
        if last {
            break;
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 2, 2, 2, 1], "{pages:?}");
    let walked: Vec<_> = pages.concat();
    let mut sorted = walked.clone();
    sorted.sort_by(|x, y| (x.0 == SealedKind::SigningKey, &x.1).cmp(&(y.0 == SealedKind::SigningKey, &y.1)));
    sorted.dedup();
    assert_eq!(walked, sorted, "in order, no repeats");
    let kinds: Vec<_> = walked.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds.iter().filter(|k| **k == SealedKind::CredentialHandle).count(), 5);
    assert_eq!(kinds.iter().filter(|k| **k == SealedKind::SigningKey).count(), 4);

    // The pass, in pages of 2: everything under A is re-sealed under B, and counted as done.
    let report = latchkey::keys::reseal_in_pages(&t.app, 2).await.unwrap();
    assert_eq!((report.resealed.credentials, report.resealed.signing_keys), (5, 3), "{report:?}");
    assert_eq!((report.remaining, report.unreadable), (0, 0), "{report:?}");
    assert_eq!(stored_key_ids(&t).await, vec![id_b.clone(); 9]);
    assert_eq!(metric(&t, "latchkey_sealed_blobs_not_current").await, Some(0.0));
    let events = t.events("sealing.resealed").await;
    let total = |field: &str| events.iter().map(|e| e["detail"][field].as_u64().unwrap()).sum::<u64>();
    assert_eq!((total("credentials"), total("signing_keys")), (5, 3), "{events:?}");
    // The keys re-sealed under B still open and sign.
    latchkey::keys::refresh_signing_keys(&t.app).await.unwrap();
    assert_eq!(jwks_kids(&t).await.len(), 4);
    jwt_exchange(&t).await;
}

#[tokio::test]
async fn retiring_the_signing_key_never_brings_back_the_key_it_superseded() {
    let t = TestApp::builder().no_background().start().await;
    let old = kid_of(&jwt_exchange(&t).await);
    let r = t.post_json("/v1/signing-keys/rotate", Some(ADMIN_KEY), &json!({})).await;
    let leaked = r.body["key"]["kid"].as_str().unwrap().to_owned();
    t.clock.advance(latchkey::backend::jwt::ACTIVATION_DELAY + chrono::Duration::seconds(1));
    assert_eq!(kid_of(&jwt_exchange(&t).await), leaked);
    // The old key is still published (its tokens may be live) but was rotated away from: it
    // must not sign again. A replacement signs instead.
    let r = t.post_json(&format!("/v1/signing-keys/{leaked}/retire"), Some(ADMIN_KEY), &json!({ "reason": "r" })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let new_kid = r.body["retired"]["replacement"]["kid"].as_str().unwrap().to_owned();
    assert_eq!(jwks_kids(&t).await, [old.as_str(), new_kid.as_str()]);
    let states: Vec<_> = r.body["items"].as_array().unwrap().iter().map(|k| k["state"].clone()).collect();
    assert_eq!(states, [json!("retiring"), json!("signing")], "{}", r.text);
    assert_eq!(kid_of(&jwt_exchange(&t).await), new_kid);
    // The old key still leaves the JWKS when its tokens have expired.
    t.clock.advance(latchkey::backend::jwt::RETENTION);
    latchkey::keys::refresh_signing_keys(&t.app).await.unwrap();
    assert_eq!(jwks_kids(&t).await, [new_kid.as_str()]);
    assert_eq!(kid_of(&jwt_exchange(&t).await), new_kid);
}
