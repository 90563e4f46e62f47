//! The CI side: `POST /v1/release`, the `latchkey exchange` / `latchkey release` binary as a CI
//! job runs it (GitHub Actions through a fake runtime token service backed by the real OIDC
//! peer; GitLab and others through `--token-env`), and the GitHub action and GitLab template.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode as AxumStatus, header};
use axum::response::{IntoResponse, Response};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::peers::OidcPeer;
use crate::support::test_app::{AUDIENCE, SERVICE_KEY, TestApp, repo_path};

/// The bearer token GitHub gives a job with `id-token: write` to ask for OIDC tokens.
const REQUEST_TOKEN: &str = "ghrt_fake_request_token_5f1c";

const PEER_POLICY: &str = r#"
description = "a CI job through the peer issuer"
agent = "ci-agent"
issuer = "peer-actions"
ttl = "10m"

[match]
repository_owner_id = "1234567"
repository = "acme/widgets"

[[grant]]
backend = "jwt"
audience = "https://review.internal.example"
"#;

/// A stand-in for GitHub Actions' runtime token service (`ACTIONS_ID_TOKEN_REQUEST_URL`): checks
/// the request token as GitHub does (401 otherwise) and answers `{"value": <OIDC token>}` from the
/// real OIDC peer for the requested `audience`.
struct ActionsRuntime {
    /// `ACTIONS_ID_TOKEN_REQUEST_URL`, with GitHub's own `api-version` query.
    request_url: String,
    /// The audiences asked for, in order.
    audiences: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct RuntimeState {
    peer: OidcPeer,
    audiences: Arc<Mutex<Vec<String>>>,
}

async fn runtime_token(
    State(s): State<RuntimeState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let authorized =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {REQUEST_TOKEN}"));
    if !authorized {
        return (AxumStatus::UNAUTHORIZED, axum::Json(json!({ "message": "Bad credentials" }))).into_response();
    }
    if query.get("api-version").map(String::as_str) != Some("2.0") {
        return (AxumStatus::BAD_REQUEST, axum::Json(json!({ "message": "api-version missing" }))).into_response();
    }
    let audience = query.get("audience").cloned().unwrap_or_else(|| "https://github.com/acme".into());
    s.audiences.lock().unwrap().push(audience.clone());
    let token = s.peer.token(&audience, json!({})).await;
    axum::Json(json!({ "count": 1, "value": token })).into_response()
}

impl ActionsRuntime {
    async fn start(peer: OidcPeer) -> ActionsRuntime {
        let audiences = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/_apis/idtoken", axum::routing::get(runtime_token))
            .with_state(RuntimeState { peer, audiences: audiences.clone() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        ActionsRuntime { request_url: format!("http://{addr}/_apis/idtoken?api-version=2.0"), audiences }
    }
}

/// A broker trusting the peer issuer, with a jwt-grant policy; the test drives the job worker.
async fn peer_app(peer: &OidcPeer) -> TestApp {
    TestApp::builder()
        .policy("ci-agent.toml", PEER_POLICY)
        .config(&format!(
            "[[issuer]]\nid = \"peer-actions\"\nkind = \"github\"\nurl = \"{}\"\nalgorithms = [\"RS256\"]\nmax_token_age = \"10m\"\n",
            peer.url()
        ))
        .no_background()
        .start()
        .await
}

/// The `latchkey` binary under test; `LATCHKEY_TEST_BIN` overrides it (docs/TESTING.md), e.g.
/// with a release build, or with a copy when another build may replace `target/debug/latchkey`
/// while the tests run.
fn bin() -> std::path::PathBuf {
    std::env::var_os("LATCHKEY_TEST_BIN").map_or_else(|| env!("CARGO_BIN_EXE_latchkey").into(), Into::into)
}

/// Runs the real binary with only the given environment (and PATH), as a CI runner would.
async fn latchkey(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    let mut c = tokio::process::Command::new(bin());
    c.args(args).current_dir(cwd).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    c.env("RUST_LOG", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(std::process::Stdio::null());
    c.output().await.unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Reads a GitHub environment file (`NAME<<DELIMITER` … `DELIMITER`, or `NAME=value`).
fn github_file(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some((name, delimiter)) = line.split_once("<<") {
            let mut value = Vec::new();
            for l in lines.by_ref() {
                if l == delimiter {
                    break;
                }
                value.push(l);
            }
            out.insert(name.to_owned(), value.join("\n"));
        } else if let Some((name, value)) = line.split_once('=') {
            out.insert(name.to_owned(), value.to_owned());
        }
    }
    out
}

/// `KEY=VALUE` lines of `env` output.
fn env_dump(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

async fn introspect(t: &TestApp, token: &str) -> bool {
    let i = t.post_form("/v1/introspect", Some(SERVICE_KEY), &[("token", token)]).await;
    assert_eq!(i.status, StatusCode::OK, "{}", i.text);
    i.body["active"].as_bool().unwrap()
}

/// The GitHub Actions variables of a job with `id-token: write`, and its environment files.
struct ActionsJob {
    dir: tempfile::TempDir,
    request_url: String,
}

impl ActionsJob {
    fn new(runtime: &ActionsRuntime) -> ActionsJob {
        let dir = tempfile::tempdir().unwrap();
        for f in ["env", "output", "state"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        ActionsJob { dir, request_url: runtime.request_url.clone() }
    }

    fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GITHUB_ACTIONS", "true".into()),
            ("ACTIONS_ID_TOKEN_REQUEST_URL", self.request_url.clone()),
            ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", REQUEST_TOKEN.into()),
            ("GITHUB_ENV", self.file("env").display().to_string()),
            ("GITHUB_OUTPUT", self.file("output").display().to_string()),
            ("GITHUB_STATE", self.file("state").display().to_string()),
            ("RUNNER_TEMP", self.dir.path().display().to_string()),
        ]
    }
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test]
async fn github_format_masks_first_then_fills_the_actions_files() {
    let Some(peer) = OidcPeer::from_env() else { return };
    let t = peer_app(&peer).await;
    let runtime = ActionsRuntime::start(peer.clone()).await;
    let job = ActionsJob::new(&runtime);
    let env = job.env();
    let out = latchkey(
        &["exchange", "--capability", "ci-agent", "--url", &t.url, "--audience", AUDIENCE, "--format", "github"],
        &borrowed(&env),
        job.dir.path(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(runtime.audiences.lock().unwrap().as_slice(), [AUDIENCE], "the token is asked for the audience");

    let vars = github_file(&job.file("env"));
    let state = github_file(&job.file("state"));
    let outputs = github_file(&job.file("output"));
    let token = vars.get("LATCHKEY_TOKEN").expect("LATCHKEY_TOKEN in $GITHUB_ENV").clone();
    let release_token = state.get("release_token").expect("release_token in $GITHUB_STATE").clone();
    let exchange_id = state.get("exchange_id").expect("exchange_id in $GITHUB_STATE").clone();
    assert_eq!(outputs.get("exchange-id"), Some(&exchange_id));
    assert!(outputs.contains_key("expires-at"));
    assert!(!vars.contains_key("LATCHKEY_RELEASE_TOKEN"), "the release token stays in $GITHUB_STATE");
    assert!(introspect(&t, &token).await, "the job's token works");

    // Standard output: only masks, and the masks cover every secret.
    let printed = stdout(&out);
    assert!(printed.lines().count() >= 2, "{printed}");
    assert!(printed.lines().all(|l| l.starts_with("::add-mask::")), "stdout holds only masks: {printed}");
    assert!(printed.starts_with("::add-mask::"), "the masks come first");
    for secret in [&token, &release_token] {
        assert!(printed.lines().any(|l| l == format!("::add-mask::{secret}")), "{secret} is not masked");
        assert!(!stderr(&out).contains(secret.as_str()), "a secret reached stderr: {}", stderr(&out));
    }
    assert!(stderr(&out).contains(&exchange_id), "the summary names the exchange: {}", stderr(&out));

    // The post step's release, as the action runs it, with what the state file holds.
    let r = latchkey(
        &["release", &exchange_id, "--url", &t.url],
        &[("LATCHKEY_RELEASE_TOKEN", release_token.as_str())],
        job.dir.path(),
    )
    .await;
    assert!(r.status.success(), "{}", stderr(&r));
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(!introspect(&t, &token).await, "released credentials are inactive");
}

#[tokio::test]
async fn a_command_gets_the_credentials_but_not_the_means_to_mint_more_and_is_released_after() {
    let Some(peer) = OidcPeer::from_env() else { return };
    let t = peer_app(&peer).await;
    let runtime = ActionsRuntime::start(peer.clone()).await;
    let job = ActionsJob::new(&runtime);
    let mut env = job.env();
    env.push(("LATCHKEY_RELEASE_TOKEN", "a-release-token-from-an-earlier-step".into()));
    env.push(("LATCHKEY_ADMIN_KEY", "lk_should_not_pass".into()));
    let dump = job.file("command.env");
    let script = format!("env > '{}'; exit 3", dump.display());
    let args = ["exchange", "--capability", "ci-agent", "--url", &t.url, "--audience", AUDIENCE, "--", "sh", "-c"];
    let out = latchkey(&[&args[..], &[script.as_str()]].concat(), &borrowed(&env), job.dir.path()).await;
    assert_eq!(out.status.code(), Some(3), "the command's status is ours: {}", stderr(&out));
    assert!(stdout(&out).is_empty(), "nothing on stdout: {}", stdout(&out));

    let seen = env_dump(&dump);
    let token = seen.get("LATCHKEY_TOKEN").expect("the command has LATCHKEY_TOKEN").clone();
    for gone in [
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        "LATCHKEY_RELEASE_TOKEN",
        "LATCHKEY_ADMIN_KEY",
    ] {
        assert!(!seen.contains_key(gone), "{gone} reached the command");
    }
    let everything = std::fs::read_to_string(&dump).unwrap();
    assert!(!everything.contains(REQUEST_TOKEN), "the OIDC request token reached the command");
    assert_eq!(seen.get("GITHUB_ACTIONS").map(String::as_str), Some("true"), "the rest of the env passes");
    assert!(stderr(&out).contains("released exchange"), "{}", stderr(&out));

    // Released whatever the exit status: once the worker has run, the token is dead.
    assert!(introspect(&t, &token).await, "active until the revocation job runs");
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(!introspect(&t, &token).await, "released after the command");
    assert_eq!(t.events("exchange.released").await.len(), 1);

    // --keep: the credentials outlive the command.
    let script = format!("env > '{}'", dump.display());
    let args = [
        "exchange",
        "--capability",
        "ci-agent",
        "--url",
        &t.url,
        "--audience",
        AUDIENCE,
        "--keep",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let out = latchkey(&args, &borrowed(&env), job.dir.path()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let kept = env_dump(&dump)["LATCHKEY_TOKEN"].clone();
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(introspect(&t, &kept).await, "--keep leaves the credentials active");
    assert_eq!(t.events("exchange.released").await.len(), 1);
}

#[tokio::test]
async fn the_token_service_refuses_a_wrong_request_token_and_a_job_without_id_token_write_is_told_why() {
    let Some(peer) = OidcPeer::from_env() else { return };
    let t = peer_app(&peer).await;
    let runtime = ActionsRuntime::start(peer.clone()).await;
    let job = ActionsJob::new(&runtime);
    let mut env = job.env();
    env.retain(|(k, _)| *k != "ACTIONS_ID_TOKEN_REQUEST_TOKEN");
    env.push(("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "not-the-request-token".into()));
    let args = ["exchange", "--capability", "ci-agent", "--url", &t.url, "--format", "github"];
    let out = latchkey(&args, &borrowed(&env), job.dir.path()).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));
    assert!(runtime.audiences.lock().unwrap().is_empty());

    // GitHub sets neither variable for a job without `permissions: id-token: write`.
    env.retain(|(k, _)| !k.starts_with("ACTIONS_ID_TOKEN_REQUEST_"));
    let out = latchkey(&args, &borrowed(&env), job.dir.path()).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("id-token: write"), "{}", stderr(&out));
    assert_eq!(t.credential_count().await, 0);
}

/// The broker's own test issuer stands for GitLab's: `id_tokens:` puts the token in a variable.
fn gitlab_claims() -> Value {
    json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" })
}

#[tokio::test]
async fn gitlab_style_token_env_with_env_output_into_a_pipe_then_release() {
    let t = TestApp::builder().no_background().start().await;
    let dir = tempfile::tempdir().unwrap();
    let id_token = t.token(gitlab_claims());
    let env = [("LATCHKEY_ID_TOKEN", id_token.as_str()), ("LATCHKEY_URL", t.url.as_str())];
    let out = latchkey(
        &["exchange", "--token-env", "LATCHKEY_ID_TOKEN", "--capability", "pr-review", "--format", "env"],
        &env,
        dir.path(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let exports = stdout(&out);
    assert!(exports.lines().all(|l| l.starts_with("export ")), "{exports}");
    for name in ["LATCHKEY_TOKEN", "LATCHKEY_EXCHANGE_ID", "LATCHKEY_RELEASE_TOKEN"] {
        assert!(exports.contains(&format!("export {name}='")), "{name} missing: {exports}");
    }
    assert!(!stderr(&out).contains(&id_token), "the subject token reached stderr");

    // The template's after_script: eval in a shell, then `latchkey release` from the variables.
    let script = format!("eval \"$1\"; printf %s \"$LATCHKEY_TOKEN\" > token; '{}' release", bin().display());
    let sh = tokio::process::Command::new("sh")
        .args(["-c", &script, "sh", &exports])
        .current_dir(dir.path())
        .env("LATCHKEY_URL", &t.url)
        .output()
        .await
        .unwrap();
    assert!(sh.status.success(), "{}", stderr(&sh));
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(!introspect(&t, &token).await);
    assert_eq!(t.credential_states().await, [("revoked".to_string(), 1)]);
}

#[tokio::test]
async fn dotenv_is_written_mode_0600_and_a_denial_names_its_request_id() {
    let t = TestApp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("creds.env");
    std::fs::write(&file, "old").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let token_file = dir.path().join("id-token");
    std::fs::write(&token_file, t.token(gitlab_claims())).unwrap();
    let out = latchkey(
        &[
            "exchange",
            "--token-file",
            token_file.to_str().unwrap(),
            "--capability",
            "pr-review",
            "--url",
            &t.url,
            "--format",
            "dotenv",
            "--output",
            file.to_str().unwrap(),
            "--prefix",
            "CI_",
        ],
        &[],
        dir.path(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("CI_LATCHKEY_TOKEN='"), "{text}");
    assert!(!text.contains("old"), "the file is replaced");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // A denial: the request_id, and where an admin reads the reason.
    std::fs::write(&token_file, t.token(json!({ "repository": "acme/widgets-evil" }))).unwrap();
    let out = latchkey(
        &["exchange", "--token-file", "-", "--capability", "pr-review", "--url", &t.url, "--format", "json"],
        &[],
        dir.path(),
    )
    .await;
    // stdin is /dev/null here: an empty token is refused before any request.
    assert!(!out.status.success());
    assert!(stderr(&out).contains("empty"), "{}", stderr(&out));
    let out = latchkey(
        &["exchange", "--token-file", token_file.to_str().unwrap(), "--capability", "pr-review", "--url", &t.url],
        &[],
        dir.path(),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let denied = t.events("exchange.denied").await;
    let request_id = denied.last().unwrap()["request_id"].as_str().unwrap().to_owned();
    assert!(stderr(&out).contains(&format!("request_id {request_id}")), "{}", stderr(&out));
    assert!(stderr(&out).contains("exchange.denied"), "says where to look: {}", stderr(&out));
}

#[tokio::test]
async fn release_revokes_once_is_idempotent_and_refuses_alike_a_wrong_token_and_an_unknown_exchange() {
    let t = TestApp::builder().no_background().start().await;
    let a = t.exchange(&t.token(gitlab_claims()), "pr-review").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let exchange_id = a.body["exchange_id"].as_str().unwrap().to_owned();
    let release_token = a.body["release_token"].as_str().unwrap().to_owned();
    let access_token = a.body["access_token"].as_str().unwrap().to_owned();
    assert!(release_token.len() >= 43, "256 bits");

    // A wrong token and an unknown exchange: the same 401, the same words, nothing changed.
    let wrong =
        t.post_json("/v1/release", None, &json!({ "exchange_id": exchange_id, "release_token": "x".repeat(43) })).await;
    let unknown = t
        .post_json(
            "/v1/release",
            None,
            &json!({ "exchange_id": uuid::Uuid::now_v7().to_string(), "release_token": release_token }),
        )
        .await;
    for r in [&wrong, &unknown] {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
        assert_eq!(r.body["error"], "invalid_token");
        assert!(r.body["request_id"].is_string());
    }
    assert_eq!(wrong.body["error_description"], unknown.body["error_description"]);
    assert_eq!(
        wrong.body.as_object().unwrap().keys().collect::<Vec<_>>(),
        unknown.body.as_object().unwrap().keys().collect::<Vec<_>>()
    );
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(introspect(&t, &access_token).await, "a refused release changes nothing");
    assert!(t.events("exchange.released").await.is_empty());
    let malformed = t.post_json("/v1/release", None, &json!({ "exchange_id": "nope", "release_token": "x" })).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST, "{}", malformed.text);

    // The holder releases (form encoding); the credential's revocation is queued, then done.
    let first =
        t.post_form("/v1/release", None, &[("exchange_id", &exchange_id), ("release_token", &release_token)]).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.headers["cache-control"], "no-store");
    assert_eq!(first.body["exchange_id"], exchange_id.as_str());
    let credential = &first.body["credentials"][0];
    assert_eq!(credential["id"], a.body["credentials"][0]["id"]);
    assert_eq!(credential["name"], "jwt");
    assert_eq!(credential["backend"], "jwt");
    assert_eq!(credential["revocation"], "queued");
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(!introspect(&t, &access_token).await);
    let released = t.events("exchange.released").await;
    assert_eq!(released.len(), 1);
    assert_eq!(released[0]["exchange_id"], exchange_id.as_str());
    assert_eq!(t.events("credential.revoke_requested").await.len(), 1);

    // Again (JSON): 200, the same shape, and nothing written (reading the audit trail is itself
    // audited as `admin.call`: those do not count).
    let written = || async { t.audit().await.into_iter().filter(|e| e["event"] != "admin.call").count() };
    let events_before = written().await;
    let again =
        t.post_json("/v1/release", None, &json!({ "exchange_id": exchange_id, "release_token": release_token })).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.body["credentials"][0]["state"], "revoked");
    assert_eq!(again.body["credentials"][0]["revocation"], "none");
    assert_eq!(
        again.body["credentials"][0].as_object().unwrap().keys().collect::<Vec<_>>(),
        first.body["credentials"][0].as_object().unwrap().keys().collect::<Vec<_>>()
    );
    assert_eq!(written().await, events_before, "a repeated release writes nothing");
    assert_eq!(t.credential_states().await, [("revoked".to_string(), 1)]);

    let o = t.get("/openapi.json", None).await;
    let op = &o.body["paths"]["/v1/release"]["post"];
    assert_eq!(op["security"], json!([]), "no admin key: the release token is the proof");
    assert!(op["responses"].get("401").is_some());
    assert!(o.body["components"]["schemas"]["Released"].is_object());
}

#[test]
fn the_release_token_is_compared_in_constant_time() {
    let code = std::fs::read_to_string(repo_path("src/release.rs")).unwrap();
    assert!(code.contains("ct_eq("), "src/release.rs must compare with subtle's ct_eq");
    assert!(code.contains("Sha256::digest"), "the token is compared as its SHA-256");
}

fn yaml(path: &str) -> serde_norway::Value {
    let text = std::fs::read_to_string(repo_path(path)).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

#[test]
fn the_action_the_gitlab_template_and_the_examples_parse_and_use_the_documented_interface() {
    let action = yaml("action.yml");
    for input in ["capability", "url", "audience", "narrow", "version"] {
        assert!(action["inputs"].get(input).is_some(), "action.yml has no input {input}");
    }
    assert_eq!(action["inputs"]["capability"]["required"], serde_norway::Value::Bool(true));
    assert_eq!(action["inputs"]["url"]["required"], serde_norway::Value::Bool(true));
    let runs = &action["runs"];
    assert_eq!(runs["using"].as_str(), Some("node20"));
    for (step, file) in [("main", "dist/main.js"), ("post", "dist/post.js")] {
        assert_eq!(runs[step].as_str(), Some(file));
        assert!(repo_path(file).exists(), "{file} missing");
    }
    let main = std::fs::read_to_string(repo_path("dist/main.js")).unwrap();
    for needle in ["'exchange', '--format', 'github'", "'--capability'", "'--url'", "'--audience'", "'--narrow'"] {
        assert!(main.contains(needle), "dist/main.js does not pass {needle}");
    }
    assert!(main.contains("releases/download/v${version}/${ASSET}"));
    let post = std::fs::read_to_string(repo_path("dist/post.js")).unwrap();
    assert!(post.contains("STATE_exchange_id") && post.contains("STATE_release_token"));
    assert!(!main.contains("require('@actions") && !post.contains("require('@actions"), "no npm dependencies");

    let gitlab = yaml("ci/gitlab/latchkey.gitlab-ci.yml");
    let job = &gitlab[".latchkey"];
    assert_eq!(job["id_tokens"]["LATCHKEY_ID_TOKEN"]["aud"].as_str(), Some("$LATCHKEY_AUDIENCE"));
    let before = serde_norway::to_string(&job["before_script"]).unwrap();
    assert!(before.contains("latchkey exchange --token-env LATCHKEY_ID_TOKEN --format env"), "{before}");
    assert!(serde_norway::to_string(&job["after_script"]).unwrap().contains("release"));

    for example in ["examples/github-pr-review.yml", "examples/github-deploy-aws.yml"] {
        let y = yaml(example);
        assert_eq!(y["permissions"]["id-token"].as_str(), Some("write"), "{example}");
    }
    let pr = std::fs::read_to_string(repo_path("examples/github-pr-review.yml")).unwrap();
    assert!(pr.contains("-- agent"), "the agent runs under latchkey exchange --");
    assert!(!pr.contains("pull_request_target:"));
    let gl = yaml("examples/gitlab-vault-db.yml");
    assert_eq!(gl["migrate"]["extends"].as_str(), Some(".latchkey"));
}

/// The action itself, run by Node as the runner would: main step, then post step with the state
/// GitHub hands it.
#[tokio::test]
async fn the_action_exchanges_in_its_main_step_and_releases_in_its_post_step() {
    let Some(peer) = OidcPeer::from_env() else { return };
    if std::process::Command::new("node").arg("--version").output().is_err() {
        eprintln!("skipping: node is not installed");
        return;
    }
    let t = peer_app(&peer).await;
    let runtime = ActionsRuntime::start(peer.clone()).await;
    let job = ActionsJob::new(&runtime);
    let bin_dir = bin().parent().unwrap().to_owned();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let node = |script: &str, extra: Vec<(String, String)>| {
        let mut c = tokio::process::Command::new("node");
        c.arg(repo_path(script)).env_clear().env("PATH", &path).env("RUST_LOG", "warn");
        for (k, v) in job.env() {
            c.env(k, v);
        }
        c.env("INPUT_CAPABILITY", "ci-agent").env("INPUT_URL", &t.url).env("INPUT_AUDIENCE", AUDIENCE);
        c.env("INPUT_NARROW", "").env("INPUT_VERSION", "");
        for (k, v) in extra {
            c.env(k, v);
        }
        c.output()
    };
    let main = node("dist/main.js", vec![]).await.unwrap();
    assert!(main.status.success(), "{}{}", stdout(&main), stderr(&main));
    assert!(stdout(&main).lines().all(|l| l.starts_with("::add-mask::")), "{}", stdout(&main));
    let token = github_file(&job.file("env"))["LATCHKEY_TOKEN"].clone();
    assert!(introspect(&t, &token).await);

    let state: Vec<(String, String)> =
        github_file(&job.file("state")).into_iter().map(|(k, v)| (format!("STATE_{k}"), v)).collect();
    assert!(state.iter().any(|(k, _)| k == "STATE_release_token"));
    let post = node("dist/post.js", state).await.unwrap();
    assert!(post.status.success(), "{}{}", stdout(&post), stderr(&post));
    assert!(!stdout(&post).contains("::warning"), "{}", stdout(&post));
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(!introspect(&t, &token).await, "the post step released the exchange");
}
