//! Exchanges of tokens from a real, independent OIDC issuer (npm `oauth2-mock-server`, started by
//! `scripts/test.sh`), including key rotation at the issuer.

use reqwest::StatusCode;
use serde_json::json;

use crate::support::peers::OidcPeer;
use crate::support::test_app::{AUDIENCE, TestApp};

/// A `jwt` grant for pull requests and pushes of `acme/widgets`, through the issuer `peer-actions`.
pub(crate) const PEER_POLICY: &str = r#"
description = "pr review through the peer issuer"
agent = "peer-reviewer"
issuer = "peer-actions"
ttl = "10m"

[match]
repository_owner_id = "1234567"
repository = "acme/widgets"
ref = ["refs/heads/main", "refs/pull/*/merge"]

[[grant]]
backend = "jwt"
audience = "https://review.internal.example"
"#;

async fn app_for(peer: &OidcPeer, alg: &str) -> TestApp {
    TestApp::builder()
        .policy("peer-review.toml", PEER_POLICY)
        .config(&format!(
            "[[issuer]]\nid = \"peer-actions\"\nkind = \"github\"\nurl = \"{}\"\nalgorithms = [\"{alg}\"]\nmax_token_age = \"10m\"\n",
            peer.url()
        ))
        .start()
        .await
}

#[tokio::test]
async fn tokens_from_the_peer_issuer_are_exchanged_and_hostile_ones_refused() {
    let Some(shared) = OidcPeer::from_env() else { return };
    for alg in ["RS256", "ES256"] {
        let peer = shared.new_issuer(alg).await;
        let t = app_for(&peer, alg).await;
        let ok = t.exchange(&peer.token(AUDIENCE, json!({})).await, "peer-review").await;
        assert_eq!(ok.status, StatusCode::OK, "{alg}: {}", ok.text);
        assert_eq!(ok.body["agent"], "peer-reviewer");

        let cases = [
            ("wrong audience", peer.token("https://someone-else.example", json!({})).await),
            (
                "jku header",
                peer.token_with_header(AUDIENCE, json!({}), json!({ "jku": "http://127.0.0.1:1/jwks" })).await,
            ),
            ("unpublished kid", peer.token_with_header(AUDIENCE, json!({}), json!({ "kid": "never-published" })).await),
            ("no jti", peer.token(AUDIENCE, json!({ "jti": null })).await),
        ];
        for (name, token) in cases {
            let a = t.exchange(&token, "peer-review").await;
            assert_eq!(
                (a.status, a.body["error"].as_str()),
                (StatusCode::BAD_REQUEST, Some("invalid_grant")),
                "{alg} {name}: {}",
                a.text
            );
        }
        let denied =
            t.exchange(&peer.token(AUDIENCE, json!({ "repository": "acme/widgets-evil" })).await, "peer-review").await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN, "{}", denied.text);
        assert_eq!(t.credential_count().await, 1);
    }
}

#[tokio::test]
async fn key_rotation_at_the_issuer() {
    let Some(shared) = OidcPeer::from_env() else { return };
    let peer = shared.new_issuer("RS256").await;
    let t = app_for(&peer, "RS256").await;
    assert_eq!(t.exchange(&peer.token(AUDIENCE, json!({})).await, "peer-review").await.status, StatusCode::OK);
    let old_key_token = peer.token(AUDIENCE, json!({})).await;
    let second_old_key_token = peer.token(AUDIENCE, json!({})).await;

    // A token under a new key verifies after one refresh.
    let fetches = |t: &TestApp| t.app.verifier.health().iter().find(|h| h.id == "peer-actions").unwrap().refreshes;
    let before = fetches(&t);
    peer.rotate().await;
    let a = t.exchange(&peer.token(AUDIENCE, json!({})).await, "peer-review").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(fetches(&t), before + 1, "exactly one refresh for the new key");

    // A token under the old key keeps verifying while the old key is published.
    let a = t.exchange(&old_key_token, "peer-review").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);

    // Once the issuer unpublishes it and latchkey refreshes, the old key is gone.
    peer.retire_old_keys().await;
    t.clock.advance(chrono::Duration::seconds(31));
    let unknown = peer.token_with_header(AUDIENCE, json!({}), json!({ "kid": "never-published" })).await;
    assert_eq!(t.exchange(&unknown, "peer-review").await.status, StatusCode::BAD_REQUEST);
    let a = t.exchange(&second_old_key_token, "peer-review").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "a retired key still verifies: {}", a.text);
    let denied = t.events("exchange.denied").await;
    let reason = denied.last().unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(!reason.contains("replay"), "refused for the wrong reason: {reason}");
}
