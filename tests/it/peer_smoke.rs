//! The OIDC issuer peer does what the other tests rely on: its tokens verify against its own
//! discovery document and JWKS, carry GitHub Actions claims that callers can override, and its
//! keys rotate and retire on request.

use std::collections::BTreeSet;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::{Value, json};

use crate::support::peers::OidcPeer;

const AUDIENCE: &str = "https://latchkey.test";

async fn get_json(url: &str) -> Value {
    let response = reqwest::get(url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(response.status().is_success(), "GET {url}: {}", response.status());
    response.json().await.unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// The peer's published keys, found the way a relying party finds them: through discovery.
async fn jwks(peer: &OidcPeer) -> JwkSet {
    let discovery = get_json(&format!("{}/.well-known/openid-configuration", peer.url())).await;
    assert_eq!(discovery["issuer"], peer.url(), "the discovered issuer is the issuer URL, exactly");
    let jwks_uri = discovery["jwks_uri"].as_str().expect("discovery names a jwks_uri");
    assert!(jwks_uri.starts_with(peer.url()), "jwks_uri {jwks_uri} is on the issuer's host");
    serde_json::from_value(get_json(jwks_uri).await).expect("the JWKS parses as a JWK set")
}

async fn published_kids(peer: &OidcPeer) -> BTreeSet<String> {
    jwks(peer).await.keys.into_iter().filter_map(|jwk| jwk.common.key_id).collect()
}

fn kid_of(token: &str) -> String {
    decode_header(token).expect("a JWT header").kid.expect("the peer's tokens name their key")
}

/// Verifies `token`'s signature with the published key its `kid` names, as `alg`, and its
/// `iss`, `aud`, `exp` and `nbf`; returns the claims.
async fn verify(peer: &OidcPeer, token: &str, alg: Algorithm) -> Result<Value, String> {
    let kid = kid_of(token);
    let keys = jwks(peer).await;
    let jwk = keys.find(&kid).ok_or_else(|| format!("kid {kid} is not in the JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWK {kid}: {e}"))?;
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[peer.url()]);
    validation.set_audience(&[AUDIENCE]);
    validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
    decode::<Value>(token, &key, &validation).map(|data| data.claims).map_err(|e| e.to_string())
}

#[tokio::test]
async fn tokens_verify_and_carry_github_actions_claims() {
    let Some(peer) = OidcPeer::from_env() else { return };
    assert!(!peer.url().ends_with('/'), "the issuer URL has no trailing slash: {}", peer.url());

    let token = peer.token(AUDIENCE, json!({})).await;
    assert_eq!(decode_header(&token).expect("header").alg, Algorithm::RS256);
    let claims = verify(&peer, &token, Algorithm::RS256).await.expect("the token verifies");

    assert_eq!(claims["iss"], peer.url());
    assert_eq!(claims["aud"], AUDIENCE);
    for (name, value) in [
        ("sub", "repo:acme/widgets:ref:refs/heads/main"),
        ("repository", "acme/widgets"),
        ("repository_owner", "acme"),
        ("repository_owner_id", "1234567"),
        ("ref", "refs/heads/main"),
        ("ref_type", "branch"),
        ("event_name", "push"),
        ("runner_environment", "github-hosted"),
        ("job_workflow_ref", "acme/widgets/.github/workflows/ci.yml@refs/heads/main"),
    ] {
        assert_eq!(claims[name], value, "claim {name}");
    }
    for name in ["repository_id", "sha", "workflow", "actor", "actor_id", "run_id", "run_attempt", "jti", "iat"] {
        assert!(claims[name].is_string() || claims[name].is_number(), "claim {name} is present: {claims}");
    }
    assert!(claims.get("environment").is_none(), "no environment by default");

    let again = peer.token(AUDIENCE, json!({})).await;
    let again = verify(&peer, &again, Algorithm::RS256).await.expect("the second token verifies");
    assert_ne!(claims["jti"], again["jti"], "every token has its own jti");
}

#[tokio::test]
async fn claim_overrides_replace_remove_and_rederive() {
    let Some(peer) = OidcPeer::from_env() else { return };

    let overrides = json!({
        "environment": "production",
        "event_name": "workflow_dispatch",
        "repository_owner_id": "999",
        "actor": null,
    });
    let token = peer.token(AUDIENCE, overrides).await;
    let claims = verify(&peer, &token, Algorithm::RS256).await.expect("the token verifies");
    assert_eq!(claims["environment"], "production");
    assert_eq!(claims["event_name"], "workflow_dispatch");
    assert_eq!(claims["repository_owner_id"], "999");
    assert_eq!(claims["sub"], "repo:acme/widgets:environment:production", "sub follows environment");
    assert!(claims.get("actor").is_none(), "null removes a claim: {claims}");

    let token = peer.token(AUDIENCE, json!({"repository": "other/thing", "ref": "refs/tags/v1"})).await;
    let claims = verify(&peer, &token, Algorithm::RS256).await.expect("the token verifies");
    assert_eq!(claims["repository_owner"], "other");
    assert_eq!(claims["ref_type"], "tag");
    assert_eq!(claims["sub"], "repo:other/thing:ref:refs/tags/v1");

    let token = peer.token(AUDIENCE, json!({"sub": "custom", "exp": 1})).await;
    let error = verify(&peer, &token, Algorithm::RS256).await.expect_err("an expired token is refused");
    assert!(error.contains("xpired"), "refused as expired: {error}");
}

#[tokio::test]
async fn header_overrides_are_signed() {
    let Some(peer) = OidcPeer::from_env() else { return };
    let header = json!({"jku": "http://127.0.0.1:9/keys", "typ": null});
    let token = peer.token_with_header(AUDIENCE, json!({}), header).await;
    let decoded = decode_header(&token).expect("header");
    assert_eq!(decoded.jku.as_deref(), Some("http://127.0.0.1:9/keys"));
    assert_eq!(decoded.typ, None);
    verify(&peer, &token, Algorithm::RS256).await.expect("the signature covers the changed header");
}

#[tokio::test]
async fn rotate_publishes_a_new_key_and_retire_drops_the_old() {
    let Some(shared) = OidcPeer::from_env() else { return };
    let peer = shared.new_issuer("RS256").await;
    assert_ne!(peer.url(), shared.url());

    let old_token = peer.token(AUDIENCE, json!({})).await;
    let old_kid = kid_of(&old_token);
    assert_eq!(published_kids(&peer).await, BTreeSet::from([old_kid.clone()]));

    let new_kid = peer.rotate().await;
    assert_ne!(new_kid, old_kid);
    let new_token = peer.token(AUDIENCE, json!({})).await;
    assert_eq!(kid_of(&new_token), new_kid, "the new key signs");
    assert_eq!(published_kids(&peer).await, BTreeSet::from([old_kid.clone(), new_kid.clone()]));
    verify(&peer, &old_token, Algorithm::RS256).await.expect("the old token still verifies");
    verify(&peer, &new_token, Algorithm::RS256).await.expect("the new token verifies");

    peer.retire_old_keys().await;
    assert_eq!(published_kids(&peer).await, BTreeSet::from([new_kid.clone()]));
    verify(&peer, &new_token, Algorithm::RS256).await.expect("the new token still verifies");
    let error = verify(&peer, &old_token, Algorithm::RS256).await.expect_err("the old key is gone");
    assert!(error.contains("not in the JWKS"), "{error}");
}

#[tokio::test]
async fn an_es256_issuer_signs_with_es256() {
    let Some(shared) = OidcPeer::from_env() else { return };
    let peer = shared.new_issuer("ES256").await;
    let token = peer.token(AUDIENCE, json!({})).await;
    assert_eq!(decode_header(&token).expect("header").alg, Algorithm::ES256);
    verify(&peer, &token, Algorithm::ES256).await.expect("the ES256 token verifies");
    verify(&peer, &token, Algorithm::RS256).await.expect_err("and only as ES256");
}
