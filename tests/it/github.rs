//! The `github` backend against the GitHub API double (`support/github.rs`), whose traffic is
//! checked against GitHub's own OpenAPI description in every test.

use std::time::{Duration, Instant};

use chrono::Utc;
use latchkey::app::ManualClock;
use latchkey::policy::BackendKind;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::github::{Fault, GithubDouble, Installation, OTHER_APP_ID};
use crate::support::peers::OidcPeer;
use crate::support::store::contains;
use crate::support::test_app::{AUDIENCE, Answer, Builder, TestApp, policy_head};

/// The GitHub grant of the tests' main policy, `pr-review-gh`.
const GRANT: &str = "owner = \"acme\"\nrepositories = [\"widgets\", \"gadgets\"]\npermissions = { contents = \"read\", pull_requests = \"write\" }";

/// A policy for `pr-reviewer` with a 1-minute TTL and one GitHub grant named `code`, whose
/// fields are `grant`.
fn policy_with(grant: &str) -> String {
    format!("{}[[grant]]\nname = \"code\"\nbackend = \"github\"\n{grant}\n", policy_head("pr-reviewer", "1m"))
}

struct Setup {
    t: TestApp,
    gh: GithubDouble,
}

/// A broker with the double as its GitHub, sharing one clock; `None` when the double's OpenAPI
/// description is missing (the test skips).
async fn setup(configure: impl FnOnce(Builder, &GithubDouble) -> Builder) -> Option<Setup> {
    let clock = ManualClock::new(Utc::now());
    let gh = GithubDouble::start(clock.clone()).await?;
    let builder =
        TestApp::builder().clock(clock).config(&gh.config("default")).policy("pr-review-gh.toml", &policy_with(GRANT));
    let t = configure(builder, &gh).start().await;
    Some(Setup { t, gh })
}

fn token_of(a: &Answer) -> String {
    a.body["credentials"][0]["token"].as_str().unwrap_or_else(|| panic!("no token in {}", a.text)).to_owned()
}

/// `GET /installation/repositories` at the double with the token, as a CI job would use it.
async fn repositories_seen_with(gh: &GithubDouble, token: &str) -> (StatusCode, Vec<String>) {
    let r = reqwest::Client::new()
        .get(format!("{}/installation/repositories", gh.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let mut names: Vec<String> = body["repositories"]
        .as_array()
        .map(|a| a.iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    names.sort();
    (status, names)
}

#[tokio::test]
async fn the_token_has_exactly_the_policys_repositories_and_permissions() {
    let Some(Setup { t, gh }) = setup(|b, _| b).await else { return };
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let token = token_of(&a);
    assert!(token.starts_with("ghs_") && token.len() > 500, "GitHub's long stateless token form comes through whole");

    // At GitHub: exactly the policy's scope.
    let issued = gh.token(&token).expect("the double issued it");
    assert_eq!(issued.repositories, ["widgets", "gadgets"]);
    assert_eq!(
        issued.permissions,
        [("contents", "read"), ("pull_requests", "write")].map(|(k, v)| (k.into(), v.into())).into()
    );
    assert_eq!(repositories_seen_with(&gh, &token).await, (StatusCode::OK, vec!["gadgets".into(), "widgets".into()]));

    // In the answer: the credential object DESIGN names, ending at the policy TTL, not GitHub's hour.
    let c = &a.body["credentials"][0];
    assert_eq!(c["backend"], "github");
    assert_eq!(c["name"], "code");
    assert_eq!(c["repositories"], json!(["widgets", "gadgets"]));
    assert_eq!(c["permissions"], json!({ "contents": "read", "pull_requests": "write" }));
    assert_eq!(c["fingerprint"], latchkey::backend::fingerprint(token.as_bytes()));
    assert_eq!(a.body["access_token"], token.as_str());
    assert_eq!(a.body["issued_token_type"], "urn:latchkey:token-type:github-installation");
    assert_eq!(a.body["token_type"], "Bearer");
    let expires_in = a.body["expires_in"].as_i64().unwrap();
    assert!((59..=60).contains(&expires_in), "the policy's 1m TTL, not GitHub's hour: {expires_in}");
    assert_eq!(a.headers["cache-control"], "no-store");

    // The token is nowhere in the audit trail, and at rest only sealed.
    let audit = serde_json::to_string(&t.audit().await).unwrap();
    assert!(!audit.contains(&token[4..40]));
    let at_rest = t.store().dump().await;
    assert!(!contains(&at_rest, &token.as_bytes()[4..40]), "the token is stored in plain text");
    gh.assert_conforms();
}

#[tokio::test]
async fn a_narrowed_request_gets_less_and_a_wider_one_is_refused() {
    let Some(Setup { t, gh }) = setup(|b, _| b).await else { return };
    let narrow = r#"{"code": {"repositories": ["widgets"], "permissions": {"contents": "read"}}}"#;
    let a = t.exchange_narrowed(&t.token(json!({})), "pr-review-gh", narrow).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let issued = gh.token(&token_of(&a)).unwrap();
    assert_eq!(issued.repositories, ["widgets"]);
    assert_eq!(issued.permissions, [("contents".to_owned(), "read".to_owned())].into());

    let live = gh.live_tokens();
    for wider in [
        r#"{"code": {"repositories": ["secrets"]}}"#,
        r#"{"code": {"permissions": {"contents": "write"}}}"#,
        r#"{"code": {"permissions": {"issues": "read"}}}"#,
    ] {
        let a = t.exchange_narrowed(&t.token(json!({})), "pr-review-gh", wider).await;
        assert_eq!((a.status, a.body["error"].as_str()), (StatusCode::FORBIDDEN, Some("access_denied")), "{wider}");
        assert!(a.body["request_id"].is_string());
    }
    assert_eq!(gh.live_tokens(), live, "a refused narrowing mints nothing");
    gh.assert_conforms();
}

#[tokio::test]
async fn the_token_stops_working_when_the_policy_ttl_ends_even_across_a_restart() {
    let Some(Setup { t, gh }) = setup(|b, _| b.no_background()).await else { return };
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let token = token_of(&a);
    assert_eq!(repositories_seen_with(&gh, &token).await.0, StatusCode::OK);

    // The broker restarts before the TTL ends; the revocation job is in the store.
    let t = t.restart().await;
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert_eq!(repositories_seen_with(&gh, &token).await.0, StatusCode::OK, "not before the TTL ends");

    t.clock.advance(chrono::Duration::seconds(61));
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(gh.token(&token).unwrap().revoked, "revoked at the policy TTL, long before GitHub's hour");
    assert_eq!(repositories_seen_with(&gh, &token).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(t.credential_states().await, [("expired".to_owned(), 1)]);
    assert_eq!(t.events("credential.expired").await.len(), 1);
    let id = a.body["credentials"][0]["id"].as_str().unwrap().parse().unwrap();
    let row = t.app.ledger.credential(id).await.unwrap().unwrap();
    assert_eq!(row.handle, None, "the sealed token is erased once the credential has ended");
    assert!(gh.log().contains(&"apps/revoke-installation-access-token 204".to_owned()));
    gh.assert_conforms();
}

#[tokio::test]
async fn revoking_a_revoked_or_expired_token_counts_as_done() {
    let Some(Setup { t, gh }) = setup(|b, _| b.no_background()).await else { return };
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    let token = token_of(&a);
    let id = a.body["credentials"][0]["id"].as_str().unwrap().parse().unwrap();
    let credential = t.app.ledger.credential(id).await.unwrap().unwrap();
    let backend = t.app.backends.get(&BackendKind::Github).unwrap();
    backend.revoke(&credential, Some(token.as_bytes())).await.unwrap();
    backend.revoke(&credential, Some(token.as_bytes())).await.expect("already revoked is done");
    assert_eq!(gh.log().iter().filter(|l| l.starts_with("apps/revoke")).count(), 2);
    assert!(gh.log().contains(&"apps/revoke-installation-access-token 401".to_owned()));
    gh.assert_conforms();
}

#[tokio::test]
async fn installations_are_found_by_owner_cached_and_checked_against_the_owner_id() {
    let Some(Setup { t, gh }) = setup(|b, _| {
        b.policy(
            "user-gh.toml",
            &policy_with("owner = \"octocat\"\nowner_id = 583231\nrepositories = [\"hello\"]\npermissions = { contents = \"read\" }"),
        )
        .policy(
            "renamed-gh.toml",
            &policy_with("owner = \"acme\"\nowner_id = 999\nrepositories = [\"widgets\"]\npermissions = { contents = \"read\" }"),
        )
        .policy(
            "absent-gh.toml",
            &policy_with("owner = \"nobody\"\nrepositories = [\"x\"]\npermissions = { contents = \"read\" }"),
        )
    })
    .await
    else {
        return;
    };
    gh.install(Installation {
        id: 777,
        owner: "octocat".into(),
        owner_id: 583231,
        owner_type: "User",
        repositories: vec![(201, "hello".into())],
        permissions: [("contents".to_owned(), "write".to_owned())].into(),
    });
    let lookups = |gh: &GithubDouble| gh.log().iter().filter(|l| l.contains("-installation ")).count();

    // An organization, twice: one lookup. The token's own repository_owner_id is checked.
    for _ in 0..2 {
        assert_eq!(t.exchange(&t.token(json!({})), "pr-review-gh").await.status, StatusCode::OK);
    }
    assert_eq!(lookups(&gh), 1, "{:?}", gh.log());

    // A user account: /orgs answers 404, /users finds it.
    let a = t.exchange(&t.token(json!({})), "user-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(gh.token(&token_of(&a)).unwrap().installation, 777);

    // The owner id pinned in the grant differs from the installation's account: refused.
    let a = t.exchange(&t.token(json!({})), "renamed-gh").await;
    assert_eq!((a.status, a.body["error"].as_str()), (StatusCode::FORBIDDEN, Some("access_denied")), "{}", a.text);
    let denied = t.events("exchange.denied").await;
    let reason = denied.last().unwrap()["reason"].as_str().unwrap();
    assert!(reason.contains("account id 1234567, not the owner id 999"), "{reason}");

    // Not installed: refused, and the miss is cached briefly.
    let before = lookups(&gh);
    for _ in 0..2 {
        let a = t.exchange(&t.token(json!({})), "absent-gh").await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    }
    assert_eq!(lookups(&gh) - before, 2, "/orgs and /users once, then the cached miss: {:?}", gh.log());
    t.clock.advance(chrono::Duration::seconds(31));
    t.exchange(&t.token(json!({})), "absent-gh").await;
    assert_eq!(lookups(&gh) - before, 4, "the miss is cached only briefly");

    // An uninstalled-then-reinstalled app: the cached id answers 404, a fresh lookup finds the new one.
    let mut moved = Installation::acme();
    moved.id = 5555556;
    gh.uninstall(5555555);
    gh.install(moved);
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(gh.token(&token_of(&a)).unwrap().installation, 5555556);
    gh.assert_conforms();
}

#[tokio::test]
async fn the_app_jwt_is_reused_until_close_to_its_end_and_apps_are_chosen_by_name() {
    let Some(Setup { t, gh }) = setup(|b, gh| {
        b.config(&gh.app_config("writer", OTHER_APP_ID, "github-app-other.pem")).policy(
            "writer-gh.toml",
            &policy_with("app = \"writer\"\nowner = \"acme\"\nrepositories = [\"widgets\"]\npermissions = { contents = \"write\" }"),
        )
    })
    .await
    else {
        return;
    };
    for _ in 0..3 {
        assert_eq!(t.exchange(&t.token(json!({})), "pr-review-gh").await.status, StatusCode::OK);
    }
    assert_eq!(gh.app_jwts_seen(), 1, "one app JWT for three exchanges");
    t.clock.advance(chrono::Duration::minutes(8));
    let now = latchkey::app::Clock::now(&*t.clock).timestamp();
    let later = || t.token(json!({ "iat": now, "nbf": now, "exp": now + 300 }));
    assert_eq!(t.exchange(&later(), "pr-review-gh").await.status, StatusCode::OK);
    assert_eq!(gh.app_jwts_seen(), 2, "a new JWT once the old one is close to its end");

    let a = t.exchange(&later(), "writer-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(gh.token(&token_of(&a)).unwrap().app_id, OTHER_APP_ID, "the grant's `app` chose the writer app");
    gh.assert_conforms();
}

/// The denial's or failure's audit reason for the last refused exchange.
async fn last_reason(t: &TestApp, event: &str) -> String {
    t.events(event).await.last().unwrap_or_else(|| panic!("no {event}"))["reason"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn githubs_refusals_and_failures_become_clear_answers_and_leave_nothing_issued() {
    let Some(Setup { t, gh }) = setup(|b, _| {
        b.config("[limits]\noutbound_timeout = \"1s\"\n").policy(
            "admin-gh.toml",
            &policy_with(
                "owner = \"acme\"\nrepositories = [\"widgets\"]\npermissions = { administration = \"write\" }",
            ),
        )
    })
    .await
    else {
        return;
    };
    // A permission the installation lacks: GitHub's 422 is the caller's 403.
    let a = t.exchange(&t.token(json!({})), "admin-gh").await;
    assert_eq!((a.status, a.body["error"].as_str()), (StatusCode::FORBIDDEN, Some("access_denied")), "{}", a.text);
    assert!(last_reason(&t, "exchange.denied").await.contains("not granted to this installation"));

    // A short secondary rate limit is waited out.
    gh.set_fault(Fault::RateLimited { retry_after: 1, times: 1 });
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);

    // A long one is a 503, not a hung exchange.
    gh.set_fault(Fault::RateLimited { retry_after: 600, times: 1 });
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(a.body["error"], "temporarily_unavailable");
    assert!(last_reason(&t, "exchange.failed").await.contains("rate limit"));

    // A 5xx is retried a bounded number of times.
    gh.set_fault(Fault::ServerError { times: 2 });
    assert_eq!(t.exchange(&t.token(json!({})), "pr-review-gh").await.status, StatusCode::OK);
    gh.set_fault(Fault::ServerError { times: 50 });
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert!(last_reason(&t, "exchange.failed").await.contains("(502)"));
    gh.set_fault(Fault::None);

    // A GitHub that hangs: the outbound timeout ends the exchange.
    gh.set_fault(Fault::Hang);
    let started = Instant::now();
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert!(started.elapsed() < Duration::from_secs(8), "bounded by the timeout: {:?}", started.elapsed());
    gh.set_fault(Fault::None);

    // Nothing failed is left active.
    let active = t.credential_states().await.into_iter().find(|(s, _)| s == "active").map_or(0, |(_, n)| n);
    assert_eq!(active, 2, "only the two exchanges that succeeded: {:?}", t.credential_states().await);
    gh.assert_conforms();
}

#[tokio::test]
async fn a_wrong_app_key_is_a_503_with_the_reason_in_the_audit_trail() {
    let clock = ManualClock::new(Utc::now());
    let Some(gh) = GithubDouble::start(clock.clone()).await else { return };
    // App 424242 configured with the other app's key: GitHub cannot verify its JWT.
    let t = TestApp::builder()
        .clock(clock)
        .config(&gh.app_config("default", crate::support::github::APP_ID, "github-app-other.pem"))
        .policy("pr-review-gh.toml", &policy_with(GRANT))
        .start()
        .await;
    let a = t.exchange(&t.token(json!({})), "pr-review-gh").await;
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("temporarily_unavailable"))
    );
    assert!(!a.text.contains("JSON web token"), "GitHub's detail stays in the audit trail: {}", a.text);
    let reason = last_reason(&t, "exchange.failed").await;
    assert!(reason.contains("refused the app's credentials"), "{reason}");
    gh.assert_conforms();
}

#[tokio::test]
async fn end_to_end_a_token_from_the_real_oidc_issuer_becomes_a_scoped_github_token() {
    let Some(shared) = OidcPeer::from_env() else { return };
    let peer = shared.new_issuer("RS256").await;
    let policy = policy_with(GRANT).replace("issuer = \"github-actions\"", "issuer = \"peer-actions\"");
    let Some(Setup { t, gh }) = setup(|b, _| {
        b.policy("peer-gh.toml", &policy).config(&format!(
            "[[issuer]]\nid = \"peer-actions\"\nkind = \"github\"\nurl = \"{}\"\nalgorithms = [\"RS256\"]\n",
            peer.url()
        ))
    })
    .await
    else {
        return;
    };
    let a = t.exchange(&peer.token(AUDIENCE, json!({})).await, "peer-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let token = token_of(&a);
    assert_eq!(repositories_seen_with(&gh, &token).await, (StatusCode::OK, vec!["gadgets".into(), "widgets".into()]));
    let a = t.exchange(&peer.token(AUDIENCE, json!({ "repository": "acme/gadgets" })).await, "peer-gh").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "another repository's job gets nothing");
    gh.assert_conforms();
}

#[tokio::test]
async fn the_openapi_check_refuses_what_github_would_not_send_or_accept() {
    let Some(spec) = crate::support::openapi::GithubOpenApi::get() else { return };
    let op = "apps/create-installation-access-token";
    let example = spec.example("installation-token");
    spec.check_response(op, 201, Some(&example)).expect("GitHub's own example passes");
    assert!(spec.check_response(op, 201, Some(&json!({ "token": 1, "expires_at": "x" }))).is_err());
    assert!(spec.check_response(op, 201, Some(&json!({ "expires_at": "2030-01-01T00:00:00Z" }))).is_err());
    assert!(spec.check_response(op, 201, None).is_err(), "a 201 has a body");
    assert!(spec.check_response(op, 302, None).is_err(), "a status GitHub never answers");
    spec.check_request(op, Some(&json!({ "repositories": ["a"], "permissions": { "contents": "read" } }))).unwrap();
    assert!(spec.check_request(op, Some(&json!({ "permissions": { "contents": "execute" } }))).is_err());
    assert!(spec.check_request(op, Some(&json!({ "repository_ids": ["not-a-number"] }))).is_err());
    // `nullable` fields accept null, as GitHub sends them.
    let mut installation = spec.example("installation");
    installation["suspended_at"] = Value::Null;
    spec.check_response("apps/get-org-installation", 200, Some(&installation)).unwrap();
    installation["suspended_at"] = json!(5);
    assert!(spec.check_response("apps/get-org-installation", 200, Some(&installation)).is_err());
}

#[tokio::test]
async fn the_permission_table_of_the_loader_is_githubs() {
    let Some(spec) = crate::support::openapi::GithubOpenApi::get() else { return };
    let schema = spec.schema("app-permissions");
    let mut from_github: Vec<(String, Vec<String>)> = schema["properties"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, p)| {
            let levels = p["enum"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect();
            (name.clone(), levels)
        })
        .collect();
    from_github.sort();
    let ours: Vec<(String, Vec<String>)> = latchkey::policy::github_permission_table()
        .into_iter()
        .map(|(n, l)| (n.to_owned(), l.into_iter().map(str::to_owned).collect()))
        .collect();
    assert_eq!(ours, from_github, "src/policy/github_permissions.rs must list GitHub's app-permissions exactly");
}

#[tokio::test]
async fn a_token_minted_but_never_recorded_is_reported_possibly_issued_with_its_end() {
    let Some(Setup { t, gh: _gh }) = setup(|b, _| b.no_background()).await else { return };
    let credential = t.record_crashed_intent(BackendKind::Github).await;
    t.clock.advance(chrono::Duration::minutes(3));
    assert_eq!(latchkey::worker::reconcile(&t.app).await.unwrap(), 1);
    assert_eq!(t.credential_states().await, [("failed".to_owned(), 1)]);
    let alerts = t.events("credential.possibly_issued").await;
    assert_eq!(alerts.len(), 1, "an alert event");
    let dead_at = latchkey::audit::format_time(credential.created_at + chrono::Duration::hours(1));
    assert_eq!(alerts[0]["expiry"], dead_at.as_str());
    assert!(alerts[0]["reason"].as_str().unwrap().contains("possibly issued"), "{}", alerts[0]);
    assert!(t.app.metrics.encode().contains("latchkey_credentials_possibly_issued_total 1"));
}

#[tokio::test]
async fn a_grant_by_repository_ids_gets_those_repositories_and_narrows_by_id() {
    let Some(Setup { t, gh }) = setup(|b, _| {
        b.policy(
            "ids-gh.toml",
            &policy_with("owner = \"acme\"\nowner_id = 1234567\nrepository_ids = [101, 102]\npermissions = { contents = \"read\" }"),
        )
    })
    .await
    else {
        return;
    };
    let a = t.exchange(&t.token(json!({})), "ids-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(gh.token(&token_of(&a)).unwrap().repositories, ["widgets", "gadgets"]);
    assert_eq!(a.body["credentials"][0]["repositories"], json!(["widgets", "gadgets"]), "names, as GitHub answered");

    let a = t.exchange_narrowed(&t.token(json!({})), "ids-gh", r#"{"code": {"repositories": ["102"]}}"#).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(gh.token(&token_of(&a)).unwrap().repositories, ["gadgets"]);
    let a = t.exchange_narrowed(&t.token(json!({})), "ids-gh", r#"{"code": {"repositories": ["103"]}}"#).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "an id outside the policy: {}", a.text);
    gh.assert_conforms();
}

#[tokio::test]
async fn a_replayed_token_calls_no_backend() {
    let Some(Setup { t, gh }) = setup(|b, _| b).await else { return };
    let token = t.token(json!({}));
    let a = t.exchange(&token, "pr-review-gh").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let calls = gh.log().len();
    let replay = t.exchange(&token, "pr-review-gh").await;
    assert_eq!((replay.status, replay.body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    assert_eq!(gh.log()[calls..], [] as [String; 0], "the replay reached GitHub");
    assert_eq!(gh.live_tokens(), 1);
    gh.assert_conforms();
}
