//! The built-in development OIDC issuer of `latchkey dev`.
//!
//! It mints GitHub-Actions-style subject tokens signed with an in-memory ES256 key whose JWKS
//! the verifier is given directly. Its `iss` is the dev server's own loopback URL, so its
//! tokens can never be mistaken for a real platform's. Only `latchkey dev` mounts it.

use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::app::AppState;

struct Inner {
    url: String,
    audience: String,
    kid: String,
    pair: EcdsaKeyPair,
    jwk: Value,
    rng: SystemRandom,
}

/// The development issuer: its URL, key and token minting.
#[derive(Clone)]
pub struct DevIssuer(Arc<Inner>);

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer").field("url", &self.0.url).field("kid", &self.0.kid).finish()
    }
}

impl DevIssuer {
    pub fn new(url: &str, audience: &str) -> DevIssuer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("P-256 key generation");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("fresh P-256 key");
        let point = pair.public_key().as_ref();
        let kid = format!("dev-{}", &hex::encode(&point[1..9]));
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        });
        DevIssuer(Arc::new(Inner { url: url.to_owned(), audience: audience.to_owned(), kid, pair, jwk, rng }))
    }

    pub fn url(&self) -> &str {
        &self.0.url
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.0.jwk] })
    }

    /// A subject token with GitHub-Actions-style defaults; `overrides` replace them and a
    /// `null` removes a claim. `sub` follows `repository` and `ref` unless given.
    pub fn mint(&self, overrides: &Map<String, Value>, now: DateTime<Utc>) -> String {
        let run_id = (now.timestamp_millis() % 10_000_000_000).to_string();
        let mut claims = json!({
            "iss": self.0.url,
            "aud": self.0.audience,
            "iat": now.timestamp(),
            "nbf": now.timestamp(),
            "exp": now.timestamp() + 300,
            "jti": uuid::Uuid::new_v4().to_string(),
            "repository": "acme/widgets",
            "repository_owner": "acme",
            "repository_owner_id": "1234567",
            "repository_id": "7654321",
            "repository_visibility": "private",
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "sha": "0123456789abcdef0123456789abcdef01234567",
            "workflow": "CI",
            "workflow_ref": "acme/widgets/.github/workflows/ci.yml@refs/heads/main",
            "job_workflow_ref": "acme/widgets/.github/workflows/ci.yml@refs/heads/main",
            "event_name": "push",
            "actor": "octocat",
            "actor_id": "583231",
            "run_id": run_id,
            "run_number": "1",
            "run_attempt": "1",
            "runner_environment": "github-hosted",
        });
        let map = claims.as_object_mut().expect("an object");
        for (k, v) in overrides {
            if v.is_null() {
                map.remove(k);
            } else {
                map.insert(k.clone(), v.clone());
            }
        }
        if !overrides.contains_key("sub") {
            let repo = map.get("repository").and_then(Value::as_str).unwrap_or("").to_owned();
            let git_ref = map.get("ref").and_then(Value::as_str).unwrap_or("").to_owned();
            map.insert("sub".into(), json!(format!("repo:{repo}:ref:{git_ref}")));
        }
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": self.0.kid });
        let mut token = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let sig = self.0.pair.sign(&self.0.rng, token.as_bytes()).expect("ECDSA signing");
        token.push('.');
        token.push_str(&B64.encode(sig.as_ref()));
        token
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    #[serde(default)]
    claims: Map<String, Value>,
}

pub(super) fn router(app: AppState, dev: DevIssuer) -> Router {
    Router::new()
        .route("/dev/token", post(mint))
        .route("/dev/oidc/.well-known/jwks.json", get(jwks))
        .with_state((app, dev))
}

async fn mint(State((app, dev)): State<(AppState, DevIssuer)>, Json(req): Json<DevTokenRequest>) -> Response {
    Json(json!({ "token": dev.mint(&req.claims, app.clock.now()) })).into_response()
}

async fn jwks(State((_, dev)): State<(AppState, DevIssuer)>) -> Response {
    Json(dev.jwks()).into_response()
}
