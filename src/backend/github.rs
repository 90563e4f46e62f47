//! The `github` backend: GitHub App installation tokens, scoped to the repositories and
//! permissions a policy grants, revoked at the policy TTL.
//!
//! The path of one mint: the app's JWT (RS256, `iss` = app id, reused until close to its end) →
//! the installation (pinned by the grant, or looked up by owner and cached, misses briefly) →
//! `POST /app/installations/{id}/access_tokens` with exactly the repositories and permissions the
//! decision allows. GitHub fixes a token's life at one hour; a shorter policy TTL ends by
//! `DELETE /installation/token`, authenticated with the token itself, which is why the token is
//! the revocation handle (sealed by the broker, erased once the credential ends).
//!
//! Every answer of GitHub's that is not a success becomes a [`GithubError`] whose text never holds
//! a token: error bodies are reduced to GitHub's `message` field, which never echoes credentials.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Backend, BackendError, MintRequest, Minted, SecretFields, fingerprint};
use crate::config::GithubAppConfig;
use crate::ledger::CredentialRow;
use crate::metrics::GithubAppLabels;
use crate::policy::{BackendKind, GithubGrant, GithubRepositories, GrantSpec};

pub const ISSUED_TOKEN_TYPE: &str = "urn:latchkey:token-type:github-installation";

/// GitHub refuses app JWTs that live longer than ten minutes; `iat` is backdated for clock skew.
const JWT_BACKDATE: i64 = 60;
const JWT_LIFETIME: i64 = 9 * 60;
/// A cached app JWT is replaced this long before it ends, so a request never carries a stale one.
const JWT_REFRESH_MARGIN: i64 = 120;
/// How long an owner → installation answer is trusted, and how long a "not installed" answer is.
const INSTALLATION_TTL: i64 = 10 * 60;
const MISS_TTL: i64 = 30;
/// 5xx answers are retried this many times in all, with a doubling pause from `RETRY_PAUSE`.
const ATTEMPTS: u32 = 3;
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// A rate-limited mint waits for `Retry-After` up to this long; longer waits fail the exchange.
const MAX_INLINE_WAIT: Duration = Duration::from_secs(3);
const API_VERSION: &str = "2022-11-28";
/// GitHub's fixed life of an installation token.
const GITHUB_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("private key of GitHub app {app}: {message}")]
    Key { app: String, message: String },
    #[error("GitHub app {app}: api_url {url:?} is not a usable URL")]
    ApiUrl { app: String, url: String },
    /// No answer: connection refused, timeout, TLS.
    #[error("GitHub did not answer {operation}: {message}")]
    Unreachable { operation: &'static str, message: String },
    /// GitHub refused the app itself (401): a wrong app id or key, or a revoked app.
    #[error("GitHub refused the app's credentials for {operation} ({status}): {message}")]
    AppRejected { operation: &'static str, status: u16, message: String },
    /// The request cannot succeed as the policy asks: not installed on the owner, a repository
    /// or permission the installation does not have (403/404/422).
    #[error("GitHub refused {operation} ({status}): {message}")]
    Refused { operation: &'static str, status: u16, message: String },
    /// The installation found for the owner belongs to another account id.
    #[error("installation {installation} belongs to account id {found}, not the owner id {expected}")]
    OwnerMismatch { installation: u64, found: u64, expected: u64 },
    /// The app is not installed on the grant's owner.
    #[error("GitHub app {app} is not installed on {owner}")]
    NotInstalled { app: String, owner: String },
    #[error("GitHub rate limit on {operation}; retry after {}s", retry_after.as_secs())]
    RateLimited { operation: &'static str, retry_after: Duration },
    /// 5xx after the retries, or an answer that does not parse.
    #[error("GitHub failed {operation} ({status}): {message}")]
    Failed { operation: &'static str, status: u16, message: String },
    /// GitHub granted more than was asked: the token was revoked at once.
    #[error("GitHub granted {0} beyond the request; the token was revoked")]
    Wider(String),
}

impl From<GithubError> for BackendError {
    fn from(e: GithubError) -> Self {
        let backend = BackendKind::Github;
        match e {
            GithubError::Refused { .. } | GithubError::OwnerMismatch { .. } | GithubError::NotInstalled { .. } => {
                BackendError::Refused { backend, message: e.to_string() }
            }
            GithubError::RateLimited { retry_after, .. } => {
                BackendError::Throttled { backend, message: e.to_string(), retry_after }
            }
            _ => BackendError::Unavailable { backend, message: e.to_string() },
        }
    }
}

/// One configured GitHub App.
struct App {
    id: String,
    app_id: u64,
    /// `private_key_file`, then `previous_private_key_files`: the first signs; the others are
    /// tried when GitHub refuses it, during a key rotation.
    keys: Vec<RsaKeyPair>,
    /// Without a trailing slash: `https://api.github.com`, or GHES's `https://host/api/v3`.
    api_url: String,
    /// The current app JWT, the index of the key that signed it, and when it ends. A fresh JWT
    /// is always signed with the first key again, so a rotation finished at GitHub is noticed
    /// within one JWT's life.
    jwt: Mutex<Option<(usize, SecretString, DateTime<Utc>)>>,
}

/// An owner's installation as GitHub reported it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Installation {
    id: u64,
    account_id: u64,
}

/// `Some` = installed, `None` = not installed (a brief negative cache).
type CachedInstallation = (Option<Installation>, DateTime<Utc>);

pub struct GithubBackend {
    /// The first is the default for grants that name no `app`.
    apps: Vec<App>,
    http: reqwest::Client,
    rng: SystemRandom,
    /// (app id, lowercase owner login) → installation, until the time given.
    installations: Mutex<HashMap<(String, String), CachedInstallation>>,
    /// Counts app JWTs GitHub accepted only with a previous key, per app.
    previous_key_used: Family<GithubAppLabels, Counter>,
}

impl std::fmt::Debug for GithubBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let apps: Vec<(&str, u64, &str)> =
            self.apps.iter().map(|a| (a.id.as_str(), a.app_id, a.api_url.as_str())).collect();
        f.debug_struct("GithubBackend").field("apps", &apps).finish_non_exhaustive()
    }
}

impl GithubBackend {
    /// Reads each app's private key (PEM, PKCS#1 or PKCS#8). `resolve` turns a configured path
    /// into a real one (relative paths are relative to the config file).
    pub fn new(
        configs: &[GithubAppConfig],
        resolve: impl Fn(&std::path::Path) -> std::path::PathBuf,
        timeout: Duration,
    ) -> Result<GithubBackend, GithubError> {
        let mut apps = Vec::with_capacity(configs.len());
        for c in configs {
            let key_err = |message: String| GithubError::Key { app: c.id.clone(), message };
            let mut keys = Vec::with_capacity(1 + c.previous_private_key_files.len());
            for file in std::iter::once(&c.private_key_file).chain(&c.previous_private_key_files) {
                let path = resolve(file);
                let pem = std::fs::read(&path).map_err(|e| key_err(format!("cannot read {}: {e}", path.display())))?;
                keys.push(parse_private_key(&pem).map_err(|m| key_err(format!("{}: {m}", path.display())))?);
            }
            let api_url = c.api_url.trim_end_matches('/').to_owned();
            if url::Url::parse(&api_url).is_err() {
                return Err(GithubError::ApiUrl { app: c.id.clone(), url: c.api_url.clone() });
            }
            apps.push(App { id: c.id.clone(), app_id: c.app_id, keys, api_url, jwt: Mutex::new(None) });
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect would carry the app JWT or a token to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("latchkey/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GithubError::Unreachable { operation: "client setup", message: e.to_string() })?;
        Ok(GithubBackend {
            apps,
            http,
            rng: SystemRandom::new(),
            installations: Mutex::new(HashMap::new()),
            previous_key_used: Family::default(),
        })
    }

    /// Counts the app JWTs that only a previous key got accepted into this metric family.
    pub fn with_metrics(mut self, metrics: &crate::metrics::Metrics) -> Self {
        self.previous_key_used = metrics.github_previous_key_used.clone();
        self
    }

    fn app(&self, name: Option<&str>) -> Result<&App, GithubError> {
        let found = match name {
            Some(n) => self.apps.iter().find(|a| a.id == n),
            None => self.apps.first(),
        };
        found.ok_or_else(|| GithubError::Key {
            app: name.unwrap_or("default").to_owned(),
            message: "no such app is configured".into(),
        })
    }

    /// The app's JWT and the index of the key that signed it, signed anew (with the first key)
    /// when the cached one is close to its end.
    fn app_jwt(&self, app: &App, now: DateTime<Utc>) -> Result<(usize, SecretString), GithubError> {
        let mut cached = app.jwt.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((index, jwt, exp)) = cached.as_ref()
            && (*exp - now).num_seconds() > JWT_REFRESH_MARGIN
        {
            return Ok((*index, jwt.clone()));
        }
        let (jwt, exp) = self.sign_app_jwt(app, 0, now)?;
        *cached = Some((0, jwt.clone(), exp));
        Ok((0, jwt))
    }

    /// After GitHub refused the JWT signed with key `refused`: a JWT signed with the next key,
    /// cached in its place, or `None` when no key is left (the cache is then cleared, so the
    /// next call starts from the first key again).
    fn next_app_jwt(
        &self,
        app: &App,
        refused: usize,
        now: DateTime<Utc>,
    ) -> Result<Option<(usize, SecretString)>, GithubError> {
        let mut cached = app.jwt.lock().unwrap_or_else(|p| p.into_inner());
        let next = refused + 1;
        if next >= app.keys.len() {
            *cached = None;
            return Ok(None);
        }
        let (jwt, exp) = self.sign_app_jwt(app, next, now)?;
        *cached = Some((next, jwt.clone(), exp));
        Ok(Some((next, jwt)))
    }

    fn sign_app_jwt(
        &self,
        app: &App,
        index: usize,
        now: DateTime<Utc>,
    ) -> Result<(SecretString, DateTime<Utc>), GithubError> {
        let key = &app.keys[index];
        let iat = now.timestamp() - JWT_BACKDATE;
        let exp = now.timestamp() + JWT_LIFETIME;
        let header = B64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = B64.encode(json!({ "iat": iat, "exp": exp, "iss": app.app_id.to_string() }).to_string());
        let signing_input = format!("{header}.{claims}");
        let mut signature = vec![0; key.public_modulus_len()];
        key.sign(&RSA_PKCS1_SHA256, &self.rng, signing_input.as_bytes(), &mut signature)
            .map_err(|_| GithubError::Key { app: app.id.clone(), message: "signing failed".into() })?;
        let jwt = SecretString::from(format!("{signing_input}.{}", B64.encode(signature)));
        Ok((jwt, DateTime::from_timestamp(exp, 0).unwrap_or(now)))
    }

    /// Sends a request authenticated as the app. A 401 means GitHub does not accept the key
    /// that signed the JWT: during a key rotation the previous keys are tried in turn, and an
    /// answer only a previous key got is logged and counted, so that the operator finishes the
    /// rotation (uploads the new key to the app) before removing the old one.
    #[allow(clippy::too_many_arguments)]
    async fn send_as_app(
        &self,
        app: &App,
        operation: &'static str,
        method: Method,
        url: &str,
        body: Option<&Value>,
        inline_wait: bool,
        now: DateTime<Utc>,
    ) -> Result<Answer, GithubError> {
        let (mut index, jwt) = self.app_jwt(app, now)?;
        let mut answer = self.send(operation, method.clone(), url, jwt.expose_secret(), body, inline_wait).await?;
        while answer.status == StatusCode::UNAUTHORIZED {
            let Some((next, jwt)) = self.next_app_jwt(app, index, now)? else { break };
            tracing::warn!(
                github.app = %app.id, github.operation = operation, github.key = next,
                "GitHub refused the app JWT; trying the app's previous private key"
            );
            index = next;
            answer = self.send(operation, method.clone(), url, jwt.expose_secret(), body, inline_wait).await?;
        }
        if index > 0 && answer.status != StatusCode::UNAUTHORIZED {
            self.previous_key_used.get_or_create(&GithubAppLabels { app: app.id.clone() }).inc();
            tracing::warn!(
                github.app = %app.id, github.key = index,
                "GitHub accepted the app only with a previous private key: upload private_key_file's public key \
                 to the app (or fix private_key_file) before removing previous_private_key_files"
            );
        }
        Ok(answer)
    }

    /// The installation a grant mints through, with the owner's account id checked.
    async fn installation(
        &self,
        app: &App,
        grant: &GithubGrant,
        expected_owner_id: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<u64, GithubError> {
        if let Some(id) = grant.installation_id {
            return Ok(id);
        }
        let owner = grant.owner.as_deref().unwrap_or_default();
        let key = (app.id.clone(), owner.to_ascii_lowercase());
        let cached = {
            let cache = self.installations.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(&key).filter(|(_, until)| *until > now).map(|(found, _)| *found)
        };
        let found = match cached {
            Some(found) => found,
            None => {
                let found = self.lookup_installation(app, owner, now).await?;
                let ttl = if found.is_some() { INSTALLATION_TTL } else { MISS_TTL };
                let mut cache = self.installations.lock().unwrap_or_else(|p| p.into_inner());
                cache.insert(key, (found, now + chrono::Duration::seconds(ttl)));
                found
            }
        };
        let Some(installation) = found else {
            return Err(GithubError::NotInstalled { app: app.id.clone(), owner: owner.to_owned() });
        };
        if let Some(expected) = expected_owner_id
            && installation.account_id != expected
        {
            return Err(GithubError::OwnerMismatch {
                installation: installation.id,
                found: installation.account_id,
                expected,
            });
        }
        Ok(installation.id)
    }

    fn forget_installation(&self, app: &App, owner: &str) {
        let mut cache = self.installations.lock().unwrap_or_else(|p| p.into_inner());
        cache.remove(&(app.id.clone(), owner.to_ascii_lowercase()));
    }

    /// `GET /orgs/{owner}/installation`, then `/users/{owner}/installation`: a login may be either.
    async fn lookup_installation(
        &self,
        app: &App,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Installation>, GithubError> {
        #[derive(Deserialize)]
        struct Account {
            id: u64,
        }
        #[derive(Deserialize)]
        struct Found {
            id: u64,
            account: Option<Account>,
        }
        for (operation, kind) in [("get-org-installation", "orgs"), ("get-user-installation", "users")] {
            let url = format!("{}/{kind}/{}/installation", app.api_url, encode_segment(owner));
            let answer = self.send_as_app(app, operation, Method::GET, &url, None, false, now).await?;
            match answer.status {
                StatusCode::OK => {
                    let found: Found = parse(operation, &answer)?;
                    let account_id = found.account.map(|a| a.id).ok_or_else(|| GithubError::Failed {
                        operation,
                        status: 200,
                        message: "the installation names no account".into(),
                    })?;
                    return Ok(Some(Installation { id: found.id, account_id }));
                }
                StatusCode::NOT_FOUND => continue,
                _ => return Err(classify(operation, &answer)),
            }
        }
        Ok(None)
    }

    /// Sends one request, retrying 5xx answers and short rate-limit waits. `inline_wait` lets a
    /// rate-limited call sleep for `Retry-After` (bounded) and try again.
    async fn send(
        &self,
        operation: &'static str,
        method: Method,
        url: &str,
        bearer: &str,
        body: Option<&Value>,
        inline_wait: bool,
    ) -> Result<Answer, GithubError> {
        let mut pause = RETRY_PAUSE;
        let mut waited = false;
        for attempt in 1..=ATTEMPTS {
            let mut request = self
                .http
                .request(method.clone(), url)
                .bearer_auth(bearer)
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", API_VERSION);
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| GithubError::Unreachable {
                operation,
                // reqwest's message names the URL, never the Authorization header.
                message: without_url(&e),
            })?;
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = response.bytes().await.map_err(|e| GithubError::Unreachable {
                operation,
                message: format!("reading the answer: {}", without_url(&e)),
            })?;
            let answer = Answer { status, headers, body: bytes.to_vec() };
            if let Some(retry_after) = rate_limited(&answer) {
                if inline_wait && !waited && retry_after <= MAX_INLINE_WAIT {
                    waited = true;
                    tokio::time::sleep(retry_after).await;
                    continue;
                }
                return Err(GithubError::RateLimited { operation, retry_after });
            }
            if status.is_server_error() && attempt < ATTEMPTS {
                tracing::warn!(github.operation = operation, status = status.as_u16(), attempt, "GitHub 5xx; retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
                continue;
            }
            return Ok(answer);
        }
        Err(GithubError::Failed { operation, status: 0, message: "gave up after waiting for the rate limit".into() })
    }
}

/// An HTTP answer, read whole.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

fn parse<T: for<'de> Deserialize<'de>>(operation: &'static str, answer: &Answer) -> Result<T, GithubError> {
    // serde_json's message can quote the value it choked on, which may be a token: keep only
    // where it failed.
    serde_json::from_slice(&answer.body).map_err(|e| GithubError::Failed {
        operation,
        status: answer.status.as_u16(),
        message: format!("unexpected answer ({:?} error at line {}, column {})", e.classify(), e.line(), e.column()),
    })
}

/// GitHub's `message` (and the first validation error's detail), cut short; nothing else of the
/// body is repeated.
fn github_message(answer: &Answer) -> String {
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let mut message = body.get("message").and_then(Value::as_str).unwrap_or("no message").to_owned();
    if let Some(detail) = body.pointer("/errors/0/message").and_then(Value::as_str) {
        message = format!("{message}: {detail}");
    }
    message.chars().take(300).collect()
}

fn classify(operation: &'static str, answer: &Answer) -> GithubError {
    let status = answer.status.as_u16();
    let message = github_message(answer);
    match answer.status {
        StatusCode::UNAUTHORIZED => GithubError::AppRejected { operation, status, message },
        StatusCode::FORBIDDEN | StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY => {
            GithubError::Refused { operation, status, message }
        }
        _ => GithubError::Failed { operation, status, message },
    }
}

/// GitHub signals a primary rate limit with `x-ratelimit-remaining: 0` and a secondary one with
/// `retry-after`, both on 403 or 429. Returns how long to wait.
fn rate_limited(answer: &Answer) -> Option<Duration> {
    if !matches!(answer.status, StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS) {
        return None;
    }
    let header = |name: &str| answer.headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(seconds) = header(RETRY_AFTER.as_str()).and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_secs(seconds));
    }
    if header("x-ratelimit-remaining") == Some("0") {
        let reset = header("x-ratelimit-reset").and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        let wait = (reset - Utc::now().timestamp()).clamp(1, 3600);
        return Some(Duration::from_secs(wait.unsigned_abs()));
    }
    if answer.status == StatusCode::TOO_MANY_REQUESTS {
        return Some(Duration::from_secs(60));
    }
    None
}

/// reqwest errors print the URL; owner logins are not secret, but keep messages short and free of
/// anything a future URL might carry.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "bad answer body"
    } else {
        "request failed"
    };
    kind.to_owned()
}

/// A login or repository name as one URL path segment.
fn encode_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// PEM, PKCS#1 (`BEGIN RSA PRIVATE KEY`, what GitHub hands out) or PKCS#8.
fn parse_private_key(pem: &[u8]) -> Result<RsaKeyPair, String> {
    match PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("not a PEM private key: {e}"))? {
        PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der()),
        PrivateKeyDer::Pkcs8(der) => RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()),
        _ => return Err("not an RSA key (GitHub app keys are RSA)".into()),
    }
    .map_err(|e| format!("not a usable RSA key: {e}"))
}

/// The installation token GitHub returns.
#[derive(Deserialize)]
struct TokenAnswer {
    token: SecretString,
    expires_at: DateTime<Utc>,
    #[serde(default)]
    permissions: BTreeMap<String, String>,
    #[serde(default)]
    repositories: Option<Vec<RepositoryAnswer>>,
}

#[derive(Deserialize)]
struct RepositoryAnswer {
    name: String,
}

/// The body of `POST /app/installations/{id}/access_tokens`.
fn token_request(grant: &GithubGrant) -> Value {
    let mut body = Map::new();
    match &grant.repositories {
        GithubRepositories::All => {}
        GithubRepositories::Names(names) => {
            body.insert("repositories".into(), json!(names));
        }
        GithubRepositories::Ids(ids) => {
            body.insert("repository_ids".into(), json!(ids));
        }
    }
    body.insert("permissions".into(), json!(grant.permissions));
    Value::Object(body)
}

/// A permission GitHub granted that the request did not ask for (or asked for at a lower level).
fn wider_than_asked(asked: &BTreeMap<String, String>, granted: &BTreeMap<String, String>) -> Option<String> {
    let rank = |level: &str| match level {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 4,
    };
    granted
        .iter()
        .find(|(name, level)| asked.get(*name).is_none_or(|want| rank(level) > rank(want)))
        .map(|(name, level)| format!("permission {name}={level}"))
}

/// The owner's numeric id to check the installation against: the grant's `owner_id`, or the
/// verified `repository_owner_id` claim when the grant's owner is the token's own owner.
fn expected_owner_id(grant: &GithubGrant, claims: &crate::oidc::Claims) -> Option<u64> {
    if grant.owner_id.is_some() {
        return grant.owner_id;
    }
    let owner = grant.owner.as_deref()?;
    let claim_owner = claims.claims.get("repository_owner").and_then(Value::as_str)?;
    if !claim_owner.eq_ignore_ascii_case(owner) {
        return None;
    }
    let id = claims.claims.get("repository_owner_id")?;
    id.as_u64().or_else(|| id.as_str().and_then(|s| s.parse().ok()))
}

#[async_trait]
impl Backend for GithubBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Github
    }

    async fn mint(&self, request: MintRequest<'_>) -> Result<Minted, BackendError> {
        let GrantSpec::Github(grant) = &request.grant.spec else {
            return Err(BackendError::Refused { backend: BackendKind::Github, message: "not a github grant".into() });
        };
        let app = self.app(grant.app.as_deref())?;
        let owner_id = expected_owner_id(grant, request.claims);
        let body = token_request(grant);
        let operation = "create-installation-access-token";
        // A cached installation may have been removed and re-added: on 404, look it up again once.
        let mut answer = None;
        for fresh_lookup in [false, true] {
            let installation = self.installation(app, grant, owner_id, request.now).await?;
            let url = format!("{}/app/installations/{installation}/access_tokens", app.api_url);
            let a = self.send_as_app(app, operation, Method::POST, &url, Some(&body), true, request.now).await?;
            if a.status == StatusCode::NOT_FOUND && grant.installation_id.is_none() && !fresh_lookup {
                self.forget_installation(app, grant.owner.as_deref().unwrap_or_default());
                continue;
            }
            answer = Some(a);
            break;
        }
        let Some(answer) = answer else {
            return Err(GithubError::Failed { operation, status: 404, message: "installation not found".into() }.into());
        };
        if answer.status != StatusCode::CREATED && answer.status != StatusCode::OK {
            return Err(classify(operation, &answer).into());
        }
        let issued: TokenAnswer = parse(operation, &answer)?;
        let token = issued.token;
        if let Some(wider) = wider_than_asked(&grant.permissions, &issued.permissions) {
            // Never hand out more than the policy allows, even if GitHub would.
            let _ = self.revoke_token(&token).await;
            return Err(GithubError::Wider(wider).into());
        }
        let repositories: Vec<String> = match (&issued.repositories, &grant.repositories) {
            (Some(repos), _) => repos.iter().map(|r| r.name.clone()).collect(),
            (None, GithubRepositories::Names(names)) => names.clone(),
            (None, _) => Vec::new(),
        };
        let mut secret = Map::new();
        secret.insert("token".into(), Value::String(token.expose_secret().to_owned()));
        secret.insert("repositories".into(), json!(repositories));
        secret.insert("permissions".into(), json!(issued.permissions));
        Ok(Minted {
            secret: SecretFields(secret),
            fingerprint: fingerprint(token.expose_secret().as_bytes()),
            handle: Some(SecretBox::new(Box::new(token.expose_secret().as_bytes().to_vec()))),
            access_token: token,
            issued_token_type: ISSUED_TOKEN_TYPE,
            token_type: "Bearer",
            // The policy TTL, unless GitHub's hour ends first.
            expires_at: request.expires_at.min(issued.expires_at),
        })
    }

    async fn revoke(&self, _credential: &CredentialRow, handle: Option<&[u8]>) -> Result<(), BackendError> {
        let Some(handle) = handle else {
            // Minted but never recorded (a crash between GitHub's answer and the ledger write):
            // revoking needs the token itself; GitHub ends it at its fixed hour.
            return Err(BackendError::Unrecorded { backend: BackendKind::Github, lives_for: GITHUB_TOKEN_LIFETIME });
        };
        let token = std::str::from_utf8(handle).map_err(|_| BackendError::BadHandle {
            backend: BackendKind::Github,
            message: "the handle is not a token".into(),
        })?;
        Ok(self.revoke_token(&SecretString::from(token.to_owned())).await?)
    }
}

impl GithubBackend {
    /// `DELETE /installation/token` with the token itself. 401 means already revoked or expired,
    /// which is what revocation wants. The token names its own installation, so any app's API
    /// URL that issued it works; the default app's is used, unless only one is configured.
    async fn revoke_token(&self, token: &SecretString) -> Result<(), GithubError> {
        let operation = "revoke-installation-access-token";
        let mut last = None;
        // Apps may live on different hosts (github.com and a GHES): try each distinct API URL.
        let mut urls: Vec<&str> = self.apps.iter().map(|a| a.api_url.as_str()).collect();
        urls.dedup();
        for api_url in urls {
            let url = format!("{api_url}/installation/token");
            let answer = self.send(operation, Method::DELETE, &url, token.expose_secret(), None, false).await?;
            match answer.status {
                StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::UNAUTHORIZED => return Ok(()),
                _ => last = Some(classify(operation, &answer)),
            }
        }
        Err(last.unwrap_or(GithubError::Failed { operation, status: 0, message: "no GitHub app is configured".into() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_key_encodings_load_and_other_keys_are_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for file in ["github-app-pkcs1.pem", "github-app-pkcs8.pem"] {
            let pem = std::fs::read(dir.join(file)).unwrap_or_default();
            assert!(parse_private_key(&pem).is_ok(), "{file}");
        }
        assert!(parse_private_key(b"not a key").is_err());
        let ec = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
        assert!(parse_private_key(ec.as_bytes()).is_err());
    }

    #[test]
    fn an_unparsable_answer_never_quotes_its_content() {
        let answer = Answer {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: br#"{"token": 123, "expires_at": "ghs_secretvalue"}"#.to_vec(),
        };
        let e = parse::<TokenAnswer>("op", &answer).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("unexpected answer") && !e.contains("secretvalue"), "{e}");
    }

    #[test]
    fn a_wider_grant_is_caught() {
        let asked: BTreeMap<String, String> = [("contents".into(), "read".into())].into();
        let same = asked.clone();
        let higher: BTreeMap<String, String> = [("contents".into(), "write".into())].into();
        let extra: BTreeMap<String, String> =
            [("contents".into(), "read".into()), ("issues".into(), "read".into())].into();
        assert_eq!(wider_than_asked(&asked, &same), None);
        assert_eq!(wider_than_asked(&asked, &BTreeMap::new()), None, "less is fine");
        assert!(wider_than_asked(&asked, &higher).is_some());
        assert!(wider_than_asked(&asked, &extra).is_some());
    }

    #[test]
    fn errors_map_to_what_the_caller_should_see() {
        let refused = GithubError::Refused { operation: "x", status: 422, message: "m".into() };
        assert!(matches!(BackendError::from(refused), BackendError::Refused { .. }));
        let app = GithubError::AppRejected { operation: "x", status: 401, message: "m".into() };
        assert!(matches!(BackendError::from(app), BackendError::Unavailable { .. }));
        let limited = GithubError::RateLimited { operation: "x", retry_after: Duration::from_secs(5) };
        assert!(matches!(BackendError::from(limited), BackendError::Throttled { .. }));
    }
}
