//! Entry points for the fuzz targets in `fuzz/`: each takes arbitrary bytes to one parser that
//! faces hostile input, exactly as the broker runs it, and must return (never panic, never
//! overflow the stack, never run unbounded) whatever the bytes are.
//!
//! They are ordinary public functions, not behind a feature, so that the fuzz crate builds
//! against the same library the broker runs, and so that a crashing input becomes a unit test.

use std::path::Path;
use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderValue, header};
use serde_json::{Map, Value, json};

use crate::config::IssuerKind;
use crate::oidc::Claims;
use crate::policy::glob::Pattern;
use crate::policy::{BackendKind, IssuerInfo, LoadContext, Policy};

/// Takes a subject token apart as the verifier does before any key is looked at: size, shape,
/// base64url, header rules (`crit`, key-bearing headers, `alg`), the payload as a JSON object,
/// and the unverified `iss` used for routing. Returns whether the header checks passed.
pub fn jwt_header(token: &str) -> bool {
    let _ = crate::oidc::peek_issuer(token);
    crate::oidc::check_unverified(token).is_ok()
}

/// Compiles `pattern` as a `[match]` value and, when it compiles, matches it against `value`.
pub fn glob(pattern: &str, value: &str) -> Option<bool> {
    Pattern::parse(pattern).ok().map(|p| p.matches(value))
}

/// A loader context with one issuer of each kind and every backend, so that as much of a policy
/// as possible gets past the context checks and into the deeper ones.
fn context() -> &'static LoadContext {
    static CONTEXT: LazyLock<LoadContext> = LazyLock::new(|| LoadContext {
        issuers: [("github-actions", IssuerKind::Github), ("gitlab", IssuerKind::Gitlab), ("ci", IssuerKind::Generic)]
            .into_iter()
            .map(|(id, kind)| (id.to_owned(), IssuerInfo { kind, required_claims: Default::default() }))
            .collect(),
        backends: vec![BackendKind::Github, BackendKind::Aws, BackendKind::Vault, BackendKind::Jwt],
        github_apps: vec!["default".to_owned()],
        aws_role_path: None,
        vault_policies: None,
    });
    &CONTEXT
}

/// Parses and compiles `text` as the policy of capability `fuzz` through the real loader.
/// Relative files are looked up in a directory that does not exist, so nothing is read.
pub fn policy(text: &str) -> bool {
    Policy::parse("fuzz", text, Path::new("/nonexistent-latchkey-fuzz"), context()).is_ok()
}

/// Fixed claims a condition is run against: a GitHub Actions token's, plus a list and a nested
/// object so that comprehensions and selections have something to walk.
pub fn sample_claims() -> Claims {
    let claims = json!({
        "iss": "https://token.actions.githubusercontent.com",
        "sub": "repo:acme/widgets:ref:refs/heads/main",
        "aud": "https://latchkey.example.com",
        "repository": "acme/widgets",
        "repository_owner_id": "1234567",
        "ref": "refs/heads/main",
        "event_name": "push",
        "runner_environment": "github-hosted",
        "run_attempt": 1,
        "groups": ["dev", "ops", "sec"],
        "nested": { "a": { "b": [1, 2, 3] } },
    });
    let Value::Object(map) = claims else { return Claims::from_map("github-actions", IssuerKind::Github, Map::new()) };
    Claims::from_map("github-actions", IssuerKind::Github, map)
}

/// Compiles `source` as a policy condition (with the loader's caps) and evaluates it against
/// [`sample_claims`].
pub fn cel_condition(source: &str) -> Result<bool, String> {
    static CLAIMS: LazyLock<Claims> = LazyLock::new(sample_claims);
    crate::policy::evaluate_condition(source, &CLAIMS)
}

/// Parses `body` as an exchange request, as `POST /v1/token` does: as JSON when `json`, else as
/// a form. Returns whether it parsed.
pub fn exchange_request(json: bool, body: &[u8]) -> bool {
    let mut headers = HeaderMap::new();
    let content_type = if json { "application/json" } else { "application/x-www-form-urlencoded" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    crate::http::parse_exchange(&headers, &body[..body.len().min(crate::http::MAX_BODY)], "fuzz").is_ok()
}
