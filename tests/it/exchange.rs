//! The token exchange through HTTP: what a CI job and an auditor see.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::test_app::{ADMIN_KEY, AUDITOR_KEY, SERVICE_KEY, TestApp, b64};

/// Verifies a latchkey JWT against the broker's JWKS, as an internal service would.
async fn verify_with_jwks(t: &TestApp, token: &str) -> Value {
    let jwks = t.get("/.well-known/jwks.json", None).await.body;
    let header: Value = serde_json::from_slice(&base64_decode(token.split('.').next().unwrap())).unwrap();
    let jwk = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == header["kid"]).expect("kid in JWKS");
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["https://review.internal.example"]);
    jsonwebtoken::decode::<Value>(token, &key, &validation).expect("the JWT verifies against the JWKS").claims
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap()
}

fn pr_claims() -> Value {
    json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" })
}

#[tokio::test]
async fn an_allowed_exchange_returns_a_verifiable_jwt_that_introspects_active() {
    // The test runs the TTL job itself: a background job loop could take it first and leave the
    // credential still active when the test looks.
    let t = TestApp::builder().no_background().start().await;
    let a = t.exchange(&t.token(pr_claims()), "pr-review").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.headers["cache-control"], "no-store");
    let b = &a.body;
    assert_eq!(b["issued_token_type"], "urn:ietf:params:oauth:token-type:jwt");
    assert_eq!(b["token_type"], "Bearer");
    assert_eq!(b["capability"], "pr-review");
    assert_eq!(b["agent"], "pr-reviewer");
    assert_eq!(b["expires_in"], 900);
    assert!(b["release_token"].as_str().unwrap().len() >= 43);
    let cred = &b["credentials"][0];
    assert_eq!(cred["backend"], "jwt");
    assert_eq!(cred["token"], b["access_token"]);
    assert_eq!(cred["fingerprint"], latchkey::backend::fingerprint(b["access_token"].as_str().unwrap().as_bytes()));

    let claims = verify_with_jwks(&t, b["access_token"].as_str().unwrap()).await;
    assert_eq!(claims["jti"], cred["id"]);
    assert_eq!(claims["sub"], "repo:acme/widgets:ref:refs/heads/main");
    assert_eq!(claims["latchkey"]["capability"], "pr-review");

    let token = b["access_token"].as_str().unwrap();
    let i = t.post_form("/v1/introspect", Some(SERVICE_KEY), &[("token", token)]).await;
    assert_eq!(i.status, StatusCode::OK);
    assert_eq!(i.body["active"], true, "{}", i.text);
    assert_eq!(i.body["scope"], "pr-review");
    assert_eq!(t.credential_states().await, [("active".to_string(), 1)]);

    // Expired by the clock: inactive, and the TTL job marks the credential expired.
    t.clock.advance(chrono::Duration::minutes(16));
    let i = t.post_form("/v1/introspect", Some(SERVICE_KEY), &[("token", token)]).await;
    assert_eq!(i.body, json!({ "active": false }));
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert_eq!(t.credential_states().await, [("expired".to_string(), 1)]);
    assert_eq!(t.events("credential.expired").await.len(), 1);
}

#[tokio::test]
async fn a_revoked_jwt_introspects_inactive() {
    let t = TestApp::start().await;
    let a = t.exchange(&t.token(pr_claims()), "pr-review").await;
    let id: uuid::Uuid = a.body["credentials"][0]["id"].as_str().unwrap().parse().unwrap();
    let event = latchkey::audit::AuditEvent::new("credential.revoked", latchkey::app::Clock::now(&*t.clock));
    let moved = t
        .app
        .ledger
        .transition_credential(
            id,
            &[latchkey::ledger::CredentialState::Active],
            latchkey::ledger::CredentialState::Revoked,
            event,
        )
        .await
        .unwrap();
    assert!(moved);
    let token = a.body["access_token"].as_str().unwrap();
    let i = t.post_form("/v1/introspect", Some(SERVICE_KEY), &[("token", token)]).await;
    assert_eq!(i.body, json!({ "active": false }));
}

#[tokio::test]
async fn json_requests_and_narrowing_work() {
    let t = TestApp::start().await;
    let a = t
        .exchange_json(&json!({
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
            "subject_token": t.token(pr_claims()),
            "scope": "pr-review",
            "narrow": { "jwt": { "ttl": "5m" } },
        }))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["expires_in"], 300);

    // The same narrowing as a form field holding JSON.
    let token = t.token(pr_claims());
    let a = t.exchange_narrowed(&token, "pr-review", r#"{"jwt":{"ttl":"2m"}}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["expires_in"], 120);
}

#[tokio::test]
async fn a_denial_tells_the_caller_little_and_the_audit_trail_everything() {
    let t = TestApp::start().await;
    let evil = json!({ "repository": "acme/widgets-evil", "event_name": "pull_request", "ref": "refs/pull/7/merge" });
    let a = t.exchange(&t.token(evil), "pr-review").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.body["error"], "access_denied");
    let request_id = a.body["request_id"].as_str().unwrap();
    assert_eq!(a.headers["x-request-id"], request_id);
    let keys: Vec<&String> = a.body.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["error", "error_description", "request_id"]);
    assert!(!a.text.contains("repository") && !a.text.contains("acme"), "the body maps the policy: {}", a.text);
    assert_eq!(t.credential_count().await, 0);

    let denied = t.events("exchange.denied").await;
    let e = denied.iter().find(|e| e["request_id"] == request_id).expect("the denial is audited");
    assert_eq!(e["decision"], "denied");
    assert_eq!(e["repository"], "acme/widgets-evil");
    assert_eq!(e["policy_hash"].as_str().unwrap().len(), 64);
    let trace = e["detail"]["trace"].as_array().unwrap();
    let failed = trace.iter().find(|s| s["passed"] == false).expect("a failed step");
    assert_eq!(failed["rule"], "match.repository");
    assert_eq!(failed["claim"], "repository");
    assert_eq!(failed["value"], "acme/widgets-evil");
}

/// Each hostile or malformed request: its status, its error code, and no credential row.
#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let t = TestApp::start().await;
    let iss = t.issuer.url.clone();
    let claims = |o: Value| Value::Object(t.issuer.claims(o));
    let es256 = |extra: Value| {
        let mut h = json!({ "alg": "ES256", "typ": "JWT", "kid": t.issuer.kid });
        for (k, v) in extra.as_object().unwrap() {
            h[k] = v.clone();
        }
        h
    };
    let hs256 = {
        use aws_lc_rs::hmac;
        let header = json!({ "alg": "HS256", "typ": "JWT", "kid": t.issuer.kid });
        let input = format!("{}.{}", b64(header.to_string()), b64(claims(json!({})).to_string()));
        let key = hmac::Key::new(hmac::HMAC_SHA256, &t.issuer.public_key_bytes());
        format!("{input}.{}", b64(hmac::sign(&key, input.as_bytes())))
    };
    let none =
        format!("{}.{}.", b64(json!({ "alg": "none", "typ": "JWT" }).to_string()), b64(claims(json!({})).to_string()));
    let imposter = crate::support::test_app::TestIssuer::start_with_kid(&t.issuer.kid).await;
    let imposter_token = imposter.token(json!({ "iss": iss }));
    let now = chrono::Utc::now().timestamp();
    let cases: Vec<(&str, String)> = vec![
        ("alg none", none),
        ("HS256 with the public key as secret", hs256),
        ("signature by an unconfigured issuer reusing the kid", imposter_token),
        ("jku header", t.issuer.sign(&es256(json!({ "jku": "https://evil.example/jwks" })), &claims(json!({})))),
        ("x5u header", t.issuer.sign(&es256(json!({ "x5u": "https://evil.example/cert" })), &claims(json!({})))),
        ("jwk header", t.issuer.sign(&es256(json!({ "jwk": { "kty": "EC" } })), &claims(json!({})))),
        ("unknown crit", t.issuer.sign(&es256(json!({ "crit": ["exp-ext"], "exp-ext": 1 })), &claims(json!({})))),
        ("wrong aud", t.token(json!({ "aud": "https://other.example" }))),
        ("missing aud", t.token(json!({ "aud": null }))),
        ("expired", t.token(json!({ "exp": now - 120, "iat": now - 400, "nbf": now - 400 }))),
        ("nbf in the future", t.token(json!({ "nbf": now + 600 }))),
        ("iat far in the future", t.token(json!({ "iat": now + 600 }))),
        ("no exp", t.token(json!({ "exp": null }))),
        ("no jti under single use", t.token(json!({ "jti": null }))),
        ("unknown kid", t.issuer.sign(&json!({ "alg": "ES256", "kid": "nope" }), &claims(json!({})))),
        ("unknown issuer", t.token(json!({ "iss": "https://token.actions.githubusercontent.com" }))),
        ("malformed base64", "!!!.###.$$$".to_string()),
        ("malformed JSON", format!("{}.{}.{}", b64("{not json"), b64("{\"a\":"), b64("sig"))),
        ("not a JWT", "just-a-string".to_string()),
    ];
    for (name, token) in &cases {
        let a = t.exchange(token, "pr-review").await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{name}: {}", a.text);
        assert_eq!(a.body["error"], "invalid_grant", "{name}: {}", a.text);
        assert!(a.body["request_id"].as_str().is_some_and(|r| !r.is_empty()), "{name}");
    }
    assert_eq!(t.credential_count().await, 0);
    assert_eq!(t.events("exchange.denied").await.len(), cases.len(), "every refusal is audited");

    // Requests malformed before any token is looked at.
    let big_token = "a".repeat(16 * 1024 + 1);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, StatusCode);
    let malformed: Vec<Case> = vec![
        (
            "token over 16 KiB",
            vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("subject_token", &big_token),
                ("scope", "pr-review"),
            ],
            StatusCode::BAD_REQUEST,
        ),
        ("no grant_type", vec![("subject_token", "x"), ("scope", "pr-review")], StatusCode::BAD_REQUEST),
        (
            "no scope",
            vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("subject_token", "x"),
            ],
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad narrow",
            vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("subject_token", "x"),
                ("scope", "pr-review"),
                ("narrow", "{not json"),
            ],
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (name, form, status) in malformed {
        let a = t.exchange_form(&form).await;
        assert_eq!(a.status, status, "{name}: {}", a.text);
        assert_eq!(a.body["error"], "invalid_request", "{name}: {}", a.text);
    }
    let huge = "x".repeat(64 * 1024 + 1);
    let r = t.client.post(format!("{}/v1/token", t.url)).body(huge).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = t
        .client
        .post(format!("{}/v1/token", t.url))
        .header("content-type", "application/json")
        .body("{[")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Authorization refusals.
    let a = t.exchange(&t.token(pr_claims()), "no-such-capability").await;
    assert_eq!((a.status, a.body["error"].as_str()), (StatusCode::FORBIDDEN, Some("access_denied")));
    let token = t.token(pr_claims());
    let a = t.exchange_narrowed(&token, "pr-review", r#"{"jwt":{"ttl":"2h"}}"#).await;
    assert_eq!((a.status, a.body["error"].as_str()), (StatusCode::FORBIDDEN, Some("access_denied")), "{}", a.text);
    assert_eq!(t.credential_count().await, 0);
}

#[tokio::test]
async fn a_token_is_spent_once_per_capability_and_only_on_success() {
    let t = TestApp::start().await;
    let token = t.token(pr_claims());
    // A denied use does not spend it...
    let a = t.exchange_narrowed(&token, "pr-review", r#"{"jwt":{"ttl":"2h"}}"#).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // ...a successful one does.
    assert_eq!(t.exchange(&token, "pr-review").await.status, StatusCode::OK);
    let replay = t.exchange(&token, "pr-review").await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert_eq!(replay.body["error"], "invalid_grant");
    assert_eq!(t.credential_states().await, [("active".to_string(), 1)]);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_does_not_flood_the_issuer() {
    let t = TestApp::start().await;
    let claims = Value::Object(t.issuer.claims(json!({})));
    // Warm the cache with one good exchange.
    assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
    let before = t.issuer.jwks_fetches();
    for i in 0..200 {
        let token = t.issuer.sign(&json!({ "alg": "ES256", "kid": format!("unknown-{i}") }), &claims);
        assert_eq!(t.exchange(&token, "pr-review").await.status, StatusCode::BAD_REQUEST);
    }
    assert!(t.issuer.jwks_fetches() - before <= 1, "{} JWKS fetches", t.issuer.jwks_fetches() - before);
}

#[tokio::test]
async fn admin_calls_need_a_key_of_a_high_enough_role_and_are_audited() {
    let t = TestApp::start().await;
    let a = t.post_form("/v1/introspect", None, &[("token", "x")]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.headers["www-authenticate"], "Bearer");
    let a = t.post_form("/v1/introspect", Some("lk_wrong"), &[("token", "x")]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = t.get("/v1/audit", Some(SERVICE_KEY)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = t.post_json("/v1/explain", Some(AUDITOR_KEY), &json!({ "capability": "pr-review", "claims": {} })).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let calls = t.events("admin.call").await;
    let outcomes: Vec<&str> = calls.iter().map(|e| e["decision"].as_str().unwrap()).collect();
    assert!(outcomes.starts_with(&["unauthenticated", "unauthenticated", "forbidden", "forbidden"]), "{outcomes:?}");
    assert_eq!(calls[2]["actor"], "admin-key:test-service");
    assert!(!serde_json::to_string(&calls).unwrap().contains("lk_wrong"), "a presented key reached the audit trail");
}

#[tokio::test]
async fn explain_gives_the_full_trace_without_minting() {
    let t = TestApp::start().await;
    let claims = t.issuer.claims(json!({ "repository": "acme/widgets-evil" }));
    let a = t.post_json("/v1/explain", Some(ADMIN_KEY), &json!({ "capability": "pr-review", "claims": claims })).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["decision"], "deny");
    assert!(
        a.body["trace"].as_array().unwrap().iter().any(|s| s["rule"] == "match.repository" && s["passed"] == false)
    );
    assert_eq!(t.credential_count().await, 0);
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi_answer() {
    let t = TestApp::start().await;
    assert_eq!(t.get("/healthz", None).await.status, StatusCode::OK);
    let r = t.get("/readyz", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["ready"], true);
    assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
    let m = t.get("/metrics", None).await;
    assert!(m.text.contains(r#"latchkey_exchanges_total{capability="pr-review",decision="allowed"} 1"#), "{}", m.text);
    assert!(m.text.contains("latchkey_exchange_duration_seconds_bucket"));
    assert!(m.text.contains("latchkey_job_queue_depth"));
    let o = t.get("/openapi.json", None).await;
    assert_eq!(o.status, StatusCode::OK);
    for path in ["/v1/token", "/v1/introspect", "/.well-known/jwks.json", "/v1/audit", "/v1/explain"] {
        assert!(o.body["paths"].get(path).is_some(), "{path} missing from openapi.json");
    }
}

#[tokio::test]
async fn tls_is_served_when_a_certificate_is_configured() {
    let t = TestApp::builder().tls().start().await;
    assert!(t.url.starts_with("https://"), "{}", t.url);
    assert_eq!(t.get("/healthz", None).await.status, StatusCode::OK);
    let a = t.exchange(&t.token(pr_claims()), "pr-review").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let plain = t.url.replace("https://", "http://");
    assert!(reqwest::get(format!("{plain}/healthz")).await.is_err(), "plain HTTP answered on the TLS port");
}

#[tokio::test]
async fn operations_endpoints_move_to_admin_listen() {
    let t = TestApp::builder().server("admin_listen = \"127.0.0.1:0\"").start().await;
    let admin = t.admin_url.clone().expect("an admin listener");
    assert_eq!(t.get("/metrics", None).await.status, StatusCode::NOT_FOUND);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = reqwest::get(format!("{admin}{path}")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let r = reqwest::get(format!("{admin}/v1/token")).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "the exchange is not on the admin listener");
}

/// Serves `router` on a free loopback port; returns its URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

#[tokio::test]
async fn issuers_whose_discovery_lies_or_redirects_are_refused() {
    use axum::routing::get;
    let real = crate::support::test_app::TestIssuer::start().await;
    let liar = serve(axum::Router::new().route(
        "/.well-known/openid-configuration",
        get(|| async {
            axum::Json(json!({ "issuer": "https://elsewhere.example", "jwks_uri": "https://elsewhere.example/jwks" }))
        }),
    ))
    .await;
    let target = format!("{}/.well-known/openid-configuration", real.url);
    let redirector = serve(axum::Router::new().route(
        "/.well-known/openid-configuration",
        get(move || async move { axum::response::Redirect::temporary(&target) }),
    ))
    .await;
    let issuers: String = [("liar", &liar), ("redirector", &redirector)]
        .iter()
        .map(|(id, url)| {
            format!("[[issuer]]\nid = \"{id}\"\nkind = \"generic\"\nurl = \"{url}\"\nalgorithms = [\"ES256\"]\n")
        })
        .collect();
    let t = TestApp::builder().config(&issuers).start().await;
    for url in [&liar, &redirector] {
        let claims = Value::Object(real.claims(json!({ "iss": url })));
        let token = real.sign(&json!({ "alg": "ES256", "kid": real.kid }), &claims);
        let a = t.exchange(&token, "pr-review").await;
        assert_eq!(
            (a.status, a.body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_grant")),
            "{url}: {}",
            a.text
        );
    }
    assert_eq!(real.jwks_fetches(), 0, "keys were fetched through a lying or redirecting discovery");
    assert_eq!(t.credential_count().await, 0);
}
