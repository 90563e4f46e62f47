//! Policies' `[limits]` and `[limits] per_ip`: refusals are `429 slow_down` with `Retry-After`,
//! an audit event and a metric; nothing is issued past a limit, even to concurrent exchanges.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::test_app::{AUDITOR_KEY, TestApp};

/// A jwt-only policy for `limited-agent` on two repositories of the test owner, with `limits`.
fn limited(limits: &str) -> String {
    format!(
        "agent = \"limited-agent\"\nissuer = \"github-actions\"\nttl = \"10m\"\n\n\
         [match]\nrepository_owner_id = \"1234567\"\nrepository = [\"acme/widgets\", \"acme/gadgets\"]\n\n\
         [limits]\n{limits}\n\n[[grant]]\nbackend = \"jwt\"\naudience = \"https://svc.test\"\n"
    )
}

fn on(repository: &str) -> Value {
    json!({ "repository": repository })
}

async fn metric(t: &TestApp, line_start: &str) -> Option<f64> {
    let text = t.client.get(format!("{}/metrics", t.url)).send().await.unwrap().text().await.unwrap();
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn an_identity_over_its_rate_waits_as_told_and_others_do_not() {
    let t =
        TestApp::builder().no_background().policy("limited.toml", &limited("per_identity = \"3/hour\"")).start().await;
    for _ in 0..3 {
        let a = t.exchange(&t.token(on("acme/widgets")), "limited").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let refused = t.exchange(&t.token(on("acme/widgets")), "limited").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.text);
    assert_eq!(refused.body["error"], "slow_down");
    // 3 an hour in a burst of 3: the next place comes 20 minutes after the first.
    assert_eq!(refused.headers["retry-after"], "1200");
    let description = refused.body["error_description"].as_str().unwrap();
    assert!(
        !description.contains("per_identity") && !description.contains("3/hour"),
        "no policy detail: {description}"
    );

    // The same agent on another repository is another identity.
    let other = t.exchange(&t.token(on("acme/gadgets")), "limited").await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text);

    // The refusal is on the audit trail with the limit that hit, and counted.
    let denied = t.events("exchange.denied").await;
    let last = denied.last().expect("the refusal is audited");
    assert_eq!(last["detail"]["error"], "slow_down");
    assert!(last["reason"].as_str().unwrap().contains("per_identity 3/hour"), "{last}");
    let hits = metric(&t, "latchkey_limits_hit_total{capability=\"limited\",limit=\"per_identity\"}").await;
    assert_eq!(hits, Some(1.0));

    // After the wait, one more goes through, and only one.
    t.clock.advance(chrono::Duration::minutes(20));
    assert_eq!(t.exchange(&t.token(on("acme/widgets")), "limited").await.status, StatusCode::OK);
    assert_eq!(t.exchange(&t.token(on("acme/widgets")), "limited").await.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn a_capability_rate_counts_every_identity_together() {
    let t = TestApp::builder()
        .no_background()
        .policy("limited.toml", &limited("per_capability = \"2/minute\"\nburst = 1"))
        .start()
        .await;
    assert_eq!(t.exchange(&t.token(on("acme/widgets")), "limited").await.status, StatusCode::OK);
    // Burst 1: the steady rate at once, whoever asks.
    let refused = t.exchange(&t.token(on("acme/gadgets")), "limited").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.text);
    assert_eq!(refused.headers["retry-after"], "30");
    t.clock.advance(chrono::Duration::seconds(30));
    assert_eq!(t.exchange(&t.token(on("acme/gadgets")), "limited").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_replayed_token_is_refused_without_charging_the_rate() {
    let t =
        TestApp::builder().no_background().policy("limited.toml", &limited("per_identity = \"2/hour\"")).start().await;
    let token = t.token(on("acme/widgets"));
    assert_eq!(t.exchange(&token, "limited").await.status, StatusCode::OK);
    for _ in 0..3 {
        let replay = t.exchange(&token, "limited").await;
        assert_eq!((replay.status, replay.body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")));
    }
    // The replays took none of the two places: a fresh token still gets the second.
    let second = t.exchange(&t.token(on("acme/widgets")), "limited").await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    assert_eq!(t.exchange(&t.token(on("acme/widgets")), "limited").await.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn max_active_counts_live_exchanges_and_a_release_frees_a_place() {
    let t = TestApp::builder().no_background().policy("limited.toml", &limited("max_active = 2")).start().await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let a = t.exchange(&t.token(on("acme/widgets")), "limited").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        held.push(a.body);
    }
    let refused = t.exchange(&t.token(on("acme/widgets")), "limited").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{}", refused.text);
    // The first live exchange ends with its TTL, 10 minutes from now.
    assert_eq!(refused.headers["retry-after"], "600");

    let first = &held[0];
    let released = t
        .post_json(
            "/v1/release",
            None,
            &json!({ "exchange_id": first["exchange_id"], "release_token": first["release_token"] }),
        )
        .await;
    assert_eq!(released.status, StatusCode::OK, "{}", released.text);
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert_eq!(t.exchange(&t.token(on("acme/widgets")), "limited").await.status, StatusCode::OK);
    let hits = metric(&t, "latchkey_limits_hit_total{capability=\"limited\",limit=\"max_active\"}").await;
    assert_eq!(hits, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_exchanges_cannot_together_pass_max_active() {
    let t = TestApp::builder().no_background().policy("limited.toml", &limited("max_active = 3")).start().await;
    let tokens: Vec<String> = (0..12).map(|_| t.token(on("acme/widgets"))).collect();
    let answers = futures_util::future::join_all(tokens.iter().map(|tok| t.exchange(tok, "limited"))).await;
    let ok = answers.iter().filter(|a| a.status == StatusCode::OK).count();
    let limited = answers.iter().filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((ok, limited), (3, 9), "{:?}", answers.iter().map(|a| a.status).collect::<Vec<_>>());
    let live = t.get("/v1/credentials?agent=limited-agent&state=live", Some(AUDITOR_KEY)).await;
    assert_eq!(live.body["items"].as_array().unwrap().len(), 3, "{}", live.text);
}

#[tokio::test]
async fn a_flood_from_one_address_is_refused_before_it_is_read_and_audited_once() {
    let t = TestApp::builder().config("[limits]\nper_ip = \"4/minute\"\n").start().await;
    for _ in 0..4 {
        let a = t.exchange("not-a-token", "pr-review").await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text);
    }
    for _ in 0..5 {
        let a = t.exchange(&t.token(json!({})), "pr-review").await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.text);
        assert_eq!(a.body["error"], "slow_down");
        assert_eq!(a.headers["retry-after"], "15");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let audited = t.events("limit.per_ip").await;
        if !audited.is_empty() || std::time::Instant::now() > deadline {
            assert_eq!(audited.len(), 1, "one event a minute per address, not one per refusal: {audited:?}");
            assert_eq!(audited[0]["detail"]["address"], "127.0.0.1");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let hits = metric(&t, "latchkey_limits_hit_total{capability=\"\",limit=\"per_ip\"}").await;
    assert_eq!(hits, Some(5.0));
}
