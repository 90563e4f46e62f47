//! A GitHub API double: no GitHub server can run here, so this one behaves as GitHub documents
//! the five operations latchkey uses, and checks itself against GitHub's own OpenAPI description.
//!
//! It verifies the app JWT (signature with the app's public key, `iss`, lifetime at most ten
//! minutes), issues installation tokens that expire after an hour and carry exactly the
//! repositories and permissions asked for (422 for anything the installation lacks), revokes a
//! token on `DELETE /installation/token` so that it then gets 401, and can be told to answer 403
//! with rate-limit headers, to fail with 5xx, or to hang. Every request body it receives and every
//! answer it gives is validated against the description; a mismatch is a test failure
//! ([`GithubDouble::assert_conforms`]) and also makes the double answer 500, so that it cannot
//! pass unnoticed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use latchkey::app::Clock;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Value, json};

use super::openapi::GithubOpenApi;
use super::test_app::repo_path;

/// The apps the double knows; their private keys are `tests/fixtures/github-app-pkcs1.pem` and
/// `github-app-other.pem`.
pub const APP_ID: u64 = 424242;
pub const OTHER_APP_ID: u64 = 434343;

/// An installation of the app on one account.
#[derive(Debug, Clone)]
pub struct Installation {
    pub id: u64,
    pub owner: String,
    pub owner_id: u64,
    /// `Organization` or `User`.
    pub owner_type: &'static str,
    pub repositories: Vec<(u64, String)>,
    pub permissions: BTreeMap<String, String>,
}

impl Installation {
    /// `acme` (id 1234567, an organization) with `widgets`, `gadgets` and `secrets`, and
    /// contents/pull_requests/issues write, metadata read.
    pub fn acme() -> Installation {
        Installation {
            id: 5555555,
            owner: "acme".into(),
            owner_id: 1234567,
            owner_type: "Organization",
            repositories: vec![(101, "widgets".into()), (102, "gadgets".into()), (103, "secrets".into())],
            permissions: [("contents", "write"), ("pull_requests", "write"), ("issues", "write"), ("metadata", "read")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }
}

/// A token the double issued.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub installation: u64,
    /// The app whose JWT asked for it.
    pub app_id: u64,
    pub repositories: Vec<String>,
    pub permissions: BTreeMap<String, String>,
    pub expires_at: DateTime<Utc>,
    pub revoked: bool,
}

/// What the double does instead of answering normally.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// 403 with `retry-after` (a secondary rate limit), for the next `times` requests.
    RateLimited {
        retry_after: u64,
        times: u32,
    },
    /// 502 for the next `times` requests.
    ServerError {
        times: u32,
    },
    /// Never answers.
    Hang,
}

struct DoubleState {
    spec: Arc<GithubOpenApi>,
    clock: Arc<dyn Clock>,
    /// App id → the public key its JWTs verify with.
    apps: Vec<(u64, jsonwebtoken::DecodingKey)>,
    /// Distinct app JWTs seen, in order.
    jwts: Vec<String>,
    installations: Vec<Installation>,
    tokens: HashMap<String, IssuedToken>,
    fault: Fault,
    /// `operation status`, in order.
    log: Vec<String>,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<DoubleState>>;

pub struct GithubDouble {
    pub url: String,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GithubDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GithubDouble {
    /// Starts the double on a free port; `None` (the test skips) without GitHub's description.
    pub async fn start(clock: Arc<dyn Clock>) -> Option<GithubDouble> {
        let spec = GithubOpenApi::get()?;
        let key = |file: &str| {
            let pem = std::fs::read(repo_path(&format!("tests/fixtures/{file}"))).unwrap();
            jsonwebtoken::DecodingKey::from_rsa_pem(&pem).unwrap()
        };
        let state = Arc::new(Mutex::new(DoubleState {
            spec,
            clock,
            apps: vec![(APP_ID, key("github-app.pub.pem")), (OTHER_APP_ID, key("github-app-other.pub.pem"))],
            jwts: Vec::new(),
            installations: vec![Installation::acme()],
            tokens: HashMap::new(),
            fault: Fault::None,
            log: Vec::new(),
            violations: Vec::new(),
        }));
        let router = Router::new()
            .route("/orgs/{owner}/installation", get(org_installation))
            .route("/users/{owner}/installation", get(user_installation))
            .route("/app/installations/{id}/access_tokens", post(create_token))
            .route("/installation/token", delete(revoke_token))
            .route("/installation/repositories", get(list_repositories))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Some(GithubDouble { url, state, task })
    }

    /// `[[backends.github]]` for app [`APP_ID`] of this double, configured as `id`.
    pub fn config(&self, id: &str) -> String {
        self.app_config(id, APP_ID, "github-app-pkcs1.pem")
    }

    /// `[[backends.github]]` for any app id and key file under `tests/fixtures`.
    pub fn app_config(&self, id: &str, app_id: u64, key_file: &str) -> String {
        format!(
            "[[backends.github]]\nid = \"{id}\"\napp_id = {app_id}\nprivate_key_file = \"{}\"\napi_url = \"{}\"\n",
            repo_path(&format!("tests/fixtures/{key_file}")).display(),
            self.url
        )
    }

    /// How many distinct app JWTs the double has seen.
    pub fn app_jwts_seen(&self) -> usize {
        self.state.lock().unwrap().jwts.len()
    }

    /// Makes the double accept app JWTs of `app_id` signed with the key whose public half is
    /// `tests/fixtures/{public_key_file}` too (an app has up to two keys during a rotation);
    /// with `only`, that key alone.
    pub fn set_app_key(&self, app_id: u64, public_key_file: &str, only: bool) {
        let pem = std::fs::read(repo_path(&format!("tests/fixtures/{public_key_file}"))).unwrap();
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(&pem).unwrap();
        let mut s = self.state.lock().unwrap();
        if only {
            s.apps.retain(|(id, _)| *id != app_id);
        }
        // First: the double takes the first app whose key verifies the JWT.
        s.apps.insert(0, (app_id, key));
    }

    pub fn install(&self, installation: Installation) {
        let mut s = self.state.lock().unwrap();
        s.installations.retain(|i| i.id != installation.id);
        s.installations.push(installation);
    }

    pub fn uninstall(&self, id: u64) {
        self.state.lock().unwrap().installations.retain(|i| i.id != id);
    }

    pub fn set_fault(&self, fault: Fault) {
        self.state.lock().unwrap().fault = fault;
    }

    /// What the double knows of a token it issued.
    pub fn token(&self, token: &str) -> Option<IssuedToken> {
        self.state.lock().unwrap().tokens.get(token).cloned()
    }

    /// Tokens that still work: issued, not revoked, not past their hour.
    pub fn live_tokens(&self) -> usize {
        let s = self.state.lock().unwrap();
        let now = s.clock.now();
        s.tokens.values().filter(|t| !t.revoked && t.expires_at > now).count()
    }

    /// `operation status` lines, in order.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    /// Fails the test if any request or answer disagreed with GitHub's description.
    pub fn assert_conforms(&self) {
        let s = self.state.lock().unwrap();
        assert!(
            s.violations.is_empty(),
            "traffic that GitHub's OpenAPI description does not allow:\n{:#?}",
            s.violations
        );
        assert!(!s.log.is_empty(), "the double saw no traffic");
    }
}

/// Ends a handler: checks the answer against the description and records it.
fn answer(state: &mut DoubleState, operation: &str, status: StatusCode, body: Option<Value>) -> Response {
    if let Err(e) = state.spec.check_response(operation, status.as_u16(), body.as_ref()) {
        state.violations.push(format!("answer: {e}"));
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("the double broke GitHub's contract: {e}")).into_response();
    }
    state.log.push(format!("{operation} {}", status.as_u16()));
    match body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    }
}

fn error(state: &mut DoubleState, operation: &str, status: StatusCode, message: &str) -> Response {
    let body = json!({
        "message": message,
        "documentation_url": "https://docs.github.com/rest/apps/apps",
        "status": status.as_u16().to_string(),
    });
    answer(state, operation, status, Some(body))
}

/// The fault in force, if any, as an answer. `None` = answer normally.
async fn fault(shared: &Shared, operation: &str) -> Option<Response> {
    let fault = {
        let mut s = shared.lock().unwrap();
        let f = s.fault;
        match &mut s.fault {
            Fault::RateLimited { times, .. } | Fault::ServerError { times } => {
                *times = times.saturating_sub(1);
                if *times == 0 {
                    s.fault = Fault::None;
                }
            }
            _ => {}
        }
        f
    };
    match fault {
        Fault::None => None,
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            None
        }
        Fault::RateLimited { retry_after, .. } => {
            let mut s = shared.lock().unwrap();
            let mut r = error(&mut s, operation, StatusCode::FORBIDDEN, "You have exceeded a secondary rate limit.");
            r.headers_mut().insert("retry-after", retry_after.to_string().parse().unwrap());
            r.headers_mut().insert("x-ratelimit-remaining", "4000".parse().unwrap());
            Some(r)
        }
        Fault::ServerError { .. } => {
            let mut s = shared.lock().unwrap();
            s.log.push(format!("{operation} 502"));
            Some((StatusCode::BAD_GATEWAY, "Server Error").into_response())
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("token ")).map(str::to_owned)
}

/// GitHub's checks on an app JWT: signature by a known app's key, `iss` = that app's id, not
/// expired, at most ten minutes of life, not issued in the future. Returns the app id.
fn check_app_jwt(state: &mut DoubleState, headers: &HeaderMap) -> Result<u64, &'static str> {
    let jwt = bearer(headers).ok_or("Requires authentication")?;
    let header = jsonwebtoken::decode_header(&jwt).map_err(|_| "A JSON web token could not be decoded")?;
    if header.alg != jsonwebtoken::Algorithm::RS256 {
        return Err("A JSON web token could not be decoded");
    }
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let (app_id, claims) = state
        .apps
        .iter()
        .find_map(|(id, key)| jsonwebtoken::decode::<Value>(&jwt, key, &validation).ok().map(|d| (*id, d.claims)))
        .ok_or("A JSON web token could not be decoded")?;
    let now = state.clock.now().timestamp();
    let iss = claims["iss"].as_str().map(str::to_owned).or_else(|| claims["iss"].as_u64().map(|n| n.to_string()));
    if iss != Some(app_id.to_string()) {
        return Err("Integration not found");
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_i64(), claims["exp"].as_i64()) else {
        return Err("'Issued at' and 'Expiration time' claims are required");
    };
    if exp <= now {
        return Err("'Expiration time' claim ('exp') is too far in the past");
    }
    if exp - iat > 600 || exp > now + 600 {
        return Err("'Expiration time' claim ('exp') is too far in the future");
    }
    if iat > now + 30 {
        return Err("'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued");
    }
    if !state.jwts.contains(&jwt) {
        state.jwts.push(jwt);
    }
    Ok(app_id)
}

/// GitHub's installation object, built on its own example.
fn installation_json(state: &DoubleState, i: &Installation) -> Value {
    let mut v = state.spec.example("installation");
    v["id"] = json!(i.id);
    v["app_id"] = json!(APP_ID);
    v["target_id"] = json!(i.owner_id);
    v["target_type"] = json!(i.owner_type);
    v["account"]["login"] = json!(i.owner);
    v["account"]["id"] = json!(i.owner_id);
    v["account"]["type"] = json!(i.owner_type);
    v["permissions"] = json!(i.permissions);
    v["access_tokens_url"] = json!(format!("https://api.github.com/app/installations/{}/access_tokens", i.id));
    v
}

/// GitHub's repository object, built on its own example.
fn repository_json(state: &DoubleState, i: &Installation, id: u64, name: &str) -> Value {
    let mut v = state.spec.example("installation-token")["repositories"][0].clone();
    v["id"] = json!(id);
    v["name"] = json!(name);
    v["full_name"] = json!(format!("{}/{name}", i.owner));
    v["owner"]["login"] = json!(i.owner);
    v["owner"]["id"] = json!(i.owner_id);
    v
}

async fn org_installation(State(shared): State<Shared>, Path(owner): Path<String>, headers: HeaderMap) -> Response {
    find_installation(shared, owner, headers, "apps/get-org-installation", "Organization").await
}

async fn user_installation(State(shared): State<Shared>, Path(owner): Path<String>, headers: HeaderMap) -> Response {
    find_installation(shared, owner, headers, "apps/get-user-installation", "User").await
}

async fn find_installation(
    shared: Shared,
    owner: String,
    headers: HeaderMap,
    operation: &str,
    owner_type: &str,
) -> Response {
    if let Some(r) = fault(&shared, operation).await {
        return r;
    }
    let mut s = shared.lock().unwrap();
    if let Err(message) = check_app_jwt(&mut s, &headers) {
        return error(&mut s, operation, StatusCode::UNAUTHORIZED, message);
    }
    let found =
        s.installations.iter().find(|i| i.owner.eq_ignore_ascii_case(&owner) && i.owner_type == owner_type).cloned();
    match found {
        Some(i) => {
            let body = installation_json(&s, &i);
            answer(&mut s, operation, StatusCode::OK, Some(body))
        }
        None => error(&mut s, operation, StatusCode::NOT_FOUND, "Not Found"),
    }
}

fn rank(level: &str) -> u8 {
    match level {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 9,
    }
}

async fn create_token(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let operation = "apps/create-installation-access-token";
    if let Some(r) = fault(&shared, operation).await {
        return r;
    }
    let mut s = shared.lock().unwrap();
    let request: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(&body).ok() };
    if let Err(e) = s.spec.check_request(operation, request.as_ref()) {
        s.violations.push(format!("request: {e}"));
        return error(&mut s, operation, StatusCode::UNPROCESSABLE_ENTITY, "Invalid request.");
    }
    let app_id = match check_app_jwt(&mut s, &headers) {
        Ok(id) => id,
        Err(message) => return error(&mut s, operation, StatusCode::UNAUTHORIZED, message),
    };
    let Some(installation) = id.parse::<u64>().ok().and_then(|id| s.installations.iter().find(|i| i.id == id).cloned())
    else {
        return error(&mut s, operation, StatusCode::NOT_FOUND, "Not Found");
    };
    let request = request.unwrap_or_else(|| json!({}));
    // Repositories: by name or id; absent = all of the installation's.
    let names = request["repositories"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>());
    let ids = request["repository_ids"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>());
    let wanted: Option<Vec<(u64, String)>> = match (names, ids) {
        (Some(names), _) => names
            .iter()
            .map(|n| installation.repositories.iter().find(|(_, r)| r.eq_ignore_ascii_case(n)).cloned())
            .collect(),
        (None, Some(ids)) => {
            ids.iter().map(|id| installation.repositories.iter().find(|(r, _)| r == id).cloned()).collect()
        }
        (None, None) => Some(installation.repositories.clone()),
    };
    let selected = request.get("repositories").is_some() || request.get("repository_ids").is_some();
    let Some(repositories) = wanted else {
        return error(
            &mut s,
            operation,
            StatusCode::UNPROCESSABLE_ENTITY,
            "There is at least one repository that does not exist or is not accessible to the parent installation.",
        );
    };
    if repositories.len() > 500 {
        return error(&mut s, operation, StatusCode::UNPROCESSABLE_ENTITY, "Too many repositories.");
    }
    let permissions: BTreeMap<String, String> = match request["permissions"].as_object() {
        Some(p) => p.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect(),
        None => installation.permissions.clone(),
    };
    let lacking = permissions
        .iter()
        .any(|(name, level)| installation.permissions.get(name).is_none_or(|has| rank(level) > rank(has)));
    if lacking {
        return error(
            &mut s,
            operation,
            StatusCode::UNPROCESSABLE_ENTITY,
            "The permissions requested are not granted to this installation.",
        );
    }
    // Stateless installation tokens are long: `ghs_` and about 516 more characters.
    let token: String =
        format!("ghs_{}", rand::rng().sample_iter(&Alphanumeric).take(516).map(char::from).collect::<String>());
    let expires_at = s.clock.now() + chrono::Duration::hours(1);
    s.tokens.insert(
        token.clone(),
        IssuedToken {
            installation: installation.id,
            app_id,
            repositories: repositories.iter().map(|(_, n)| n.clone()).collect(),
            permissions: permissions.clone(),
            expires_at,
            revoked: false,
        },
    );
    let mut body = json!({
        "token": token,
        "expires_at": expires_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        "permissions": permissions,
        "repository_selection": if selected { "selected" } else { "all" },
    });
    if selected {
        body["repositories"] =
            repositories.iter().map(|(id, name)| repository_json(&s, &installation, *id, name)).collect();
    }
    answer(&mut s, operation, StatusCode::CREATED, Some(body))
}

/// The token a request carries, if it is one the double issued and it still works.
fn live_token(s: &DoubleState, headers: &HeaderMap) -> Option<(String, IssuedToken)> {
    let token = bearer(headers)?;
    let issued = s.tokens.get(&token)?;
    (!issued.revoked && issued.expires_at > s.clock.now()).then(|| (token, issued.clone()))
}

async fn revoke_token(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let operation = "apps/revoke-installation-access-token";
    if let Some(r) = fault(&shared, operation).await {
        return r;
    }
    let mut s = shared.lock().unwrap();
    let Some((token, _)) = live_token(&s, &headers) else {
        return error(&mut s, operation, StatusCode::UNAUTHORIZED, "Bad credentials");
    };
    if let Some(t) = s.tokens.get_mut(&token) {
        t.revoked = true;
    }
    answer(&mut s, operation, StatusCode::NO_CONTENT, None)
}

async fn list_repositories(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let operation = "apps/list-repos-accessible-to-installation";
    if let Some(r) = fault(&shared, operation).await {
        return r;
    }
    let mut s = shared.lock().unwrap();
    let Some((_, issued)) = live_token(&s, &headers) else {
        return error(&mut s, operation, StatusCode::UNAUTHORIZED, "Bad credentials");
    };
    let Some(installation) = s.installations.iter().find(|i| i.id == issued.installation).cloned() else {
        return error(&mut s, operation, StatusCode::UNAUTHORIZED, "Bad credentials");
    };
    let repositories: Vec<Value> = installation
        .repositories
        .iter()
        .filter(|(_, name)| issued.repositories.contains(name))
        .map(|(id, name)| repository_json(&s, &installation, *id, name))
        .collect();
    let body =
        json!({ "total_count": repositories.len(), "repositories": repositories, "repository_selection": "selected" });
    answer(&mut s, operation, StatusCode::OK, Some(body))
}
